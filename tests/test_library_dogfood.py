"""What a user found dogfooding the library: a base recorded under two names, a stack left
naming a removed member, ``rm`` naming versions nothing needs, a merge of one pocket book with
itself, and files other accounts could not read."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapterkit.errors import ConfigError
from adapterkit.plugin_api.testing import make_peft_adapter


@pytest.fixture
def books(library, tiny_base, peft_adapter, tmp_path):
    """``pe@1``, ``pe@2`` and ``pe2@1`` on the tiny base."""
    second = make_peft_adapter(tiny_base, tmp_path / "second", seed=7)
    library.import_peft(peft_adapter, "pe", base=str(tiny_base))
    library.import_peft(peft_adapter, "pe@2", base=str(tiny_base))
    library.import_peft(second, "pe2", base=str(tiny_base))
    return library


@pytest.fixture
def umask() -> Iterator[None]:
    """The test sets its own umask; the one before is put back."""
    before = os.umask(0o022)
    yield
    os.umask(before)


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}


# -- 1: one base, one name ------------------------------------------------------------------

@pytest.fixture
def alias_base(home, tiny_base, monkeypatch) -> Path:
    """An alias ``tiny-alias`` whose GGUF "converts" to a folder under ``<home>/bases`` (the
    tiny base, recorded as a converted GGUF), as ``smollm2-135m`` does."""
    from adapterkit.base import resolve

    converted = home / "bases" / "tiny.Q4_1-0123456789ab"
    shutil.copytree(tiny_base, converted)
    provenance = {"kind": "gguf", "file": "tiny.Q4_1.gguf", "sha256": "0" * 64, "size": 1}
    (converted / resolve.BASE_INFO_FILE).write_text(
        json.dumps({"name": "tiny.Q4_1.gguf", "provenance": provenance}), encoding="utf-8")
    monkeypatch.setitem(resolve.ALIASES, "tiny-alias", resolve.Alias(
        distribution="tiny-dist", filename="tiny.Q4_1.gguf", derived_from="tiny/tiny",
        description="a test alias"))
    monkeypatch.setattr(resolve, "alias_file",
                        lambda alias: (home / "nowhere" / "tiny.Q4_1.gguf", "tiny-dist==1"))
    monkeypatch.setattr(resolve, "convert_gguf", lambda path, home, progress=None:
                        resolve.BaseSource(path.name, converted, dict(provenance)))
    return converted


def test_an_import_pointed_at_an_aliases_folder_records_the_alias(library, alias_base,
                                                                  peft_adapter, tmp_path,
                                                                  adapterkit_cli):
    library.import_peft(peft_adapter, "trained", base="tiny-alias")
    plain = tmp_path / "plain"
    shutil.copytree(peft_adapter, plain)
    config = json.loads((plain / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(alias_base)
    (plain / "adapter_config.json").write_text(json.dumps(config))

    result = adapterkit_cli("import", plain, "--name", "pplain")
    assert result.exit_code == 0, result.output
    assert "Imported pplain@1 (base tiny-alias," in result.output
    book = library.get("pplain")
    assert book.meta.base["name"] == "tiny-alias"
    assert book.meta.base["provenance"]["alias"] == "tiny-alias"
    assert {b.name: b.base_name for b in library.list()} == {"trained": "tiny-alias",
                                                             "pplain": "tiny-alias"}


def test_list_by_base_name_keeps_every_book_of_that_fingerprint(library):
    """Books already recorded under the file name (by an earlier import) are still found by
    the alias the other books of the same base carry, and the other way round."""
    from tests.test_library import save

    save(library, "trained", base="smollm2-135m")
    save(library, "pplain", base="x")
    library.update_meta("pplain", lambda m: m.base.update(
        name="SmolLM2-135M-Instruct.Q4_1.gguf", fingerprint="fp-smollm2-135m"))
    save(library, "other", base="b2")
    for name in ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"):
        assert {b.name for b in library.list(base=name)} == {"trained", "pplain"}
    assert {b.name for b in library.list(base="b2")} == {"other"}


# -- 2: doctor and a stack whose member was removed -----------------------------------------

def test_doctor_finds_and_quarantines_a_stack_whose_member_was_removed(books, adapterkit_cli,
                                                                       home):
    from adapterkit.lora.combine import stack

    stack(books, ["pe@1", "pe2"], [1.0, 0.5], name="st1")
    stack(books, ["pe@2", "pe2"], None, name="whole")
    assert adapterkit_cli("rm", "pe@1", "--force").exit_code == 0

    dry = adapterkit_cli("doctor", "--dry-run")
    assert dry.exit_code == 1, dry.output
    assert "dangling  st1@1: a stack of pe@1, which the library no longer holds" in dry.output
    assert "whole" not in dry.output
    assert books.exists("st1")  # --dry-run changed nothing

    fixed = adapterkit_cli("doctor")
    assert fixed.exit_code == 0, fixed.output
    assert not books.exists("st1")
    assert [p.name.split("-")[0] for p in (home / "quarantine").iterdir()] == ["st1@1"]
    assert books.exists("whole")
    again = adapterkit_cli("doctor", "--dry-run")
    assert again.exit_code == 0 and "healthy" in again.output


def test_doctor_says_a_stack_member_is_damaged_not_gone(books, adapterkit_cli, home):
    """The dry run said a damaged member was one "the library no longer holds" (it still
    did; the damaged folder moves to quarantine only on repair)."""
    from adapterkit.lora.combine import stack

    stack(books, ["pe@1", "pe2"], None, name="st2")
    stack(books, ["pe@1", "pe@2"], None, name="st3")
    weights = books.get("pe2").path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert adapterkit_cli("rm", "pe@2", "--force").exit_code == 0
    dry = adapterkit_cli("doctor", "--dry-run")
    assert dry.exit_code == 1, dry.output
    assert ("dangling  st2@1: a stack of pe2@1, which is damaged (it fails on every use)"
            in dry.output), dry.output
    assert ("dangling  st3@1: a stack of pe@2, which the library no longer holds (it fails on "
            "every use)") in dry.output, dry.output


def test_doctor_quarantines_a_stack_whose_member_was_replaced_under_its_name(
        books, adapterkit_cli, home, tiny_base, tmp_path):
    """`rm --force pe2`, then another pocket book imported as pe2@1 (asked for by number): the
    stack saved with the first pe2 fails on every use (its member hashes), so doctor treats it
    as it treats a stack whose member is gone — it used to call the library healthy."""
    from adapterkit.lora.combine import stack

    stack(books, ["pe@1", "pe2"], [1.0, 0.5], name="st1")
    stack(books, ["pe@1", "pe@2"], None, name="intact")
    books.remove("pe2@1", force=True)
    other = make_peft_adapter(tiny_base, tmp_path / "other", seed=9)
    assert books.import_peft(other, "pe2@1", base=str(tiny_base)).ref == "pe2@1"

    dry = adapterkit_cli("doctor", "--dry-run")
    assert dry.exit_code == 1, dry.output
    assert ("dangling  st1@1: a stack of pe2@1 with other weights than this library's pe2@1 "
            "now holds") in dry.output
    assert "intact" not in dry.output
    fixed = adapterkit_cli("doctor")
    assert fixed.exit_code == 0, fixed.output
    assert not books.exists("st1") and books.exists("intact") and books.exists("pe2")
    assert [p.name.split("-")[0] for p in (home / "quarantine").iterdir()] == ["st1@1"]


def test_doctor_reports_a_book_trained_on_one_replaced_under_its_name(
        books, adapterkit_cli, home, tiny_base, tmp_path):
    """A pocket book trained ``--on`` pe2@1, after `rm --force pe2` and another import as
    pe2@1: every use refuses it (its underlay hashes), and doctor called the library healthy.
    It is reported — and left where it is: a whole trained book, usable again once the one
    it was trained on is back under its name."""
    from adapterkit.library.integrity import held_weights

    def on_pe2(meta):
        meta.stacked_on = ["pe2@1"]
        meta.stacked_on_sha256 = {"pe2@1": held_weights(books.get("pe2@1"))}

    books.import_peft(make_peft_adapter(tiny_base, tmp_path / "top", seed=11), "top",
                      base=str(tiny_base))
    books.update_meta("top@1", on_pe2)  # as `train ... --on pe2` records it
    assert adapterkit_cli("doctor", "--dry-run").exit_code == 0  # its underlay is as trained
    books.remove("pe2@1", force=True)
    # a plain "pe2" is pe2@2 now (numbers are not given out again); pe2@1 must be asked for
    assert books.import_peft(make_peft_adapter(tiny_base, tmp_path / "other", seed=9), "pe2@1",
                             base=str(tiny_base)).ref == "pe2@1"
    refused = adapterkit_cli("generate", "hi", "--adapter", "top", "--max-new-tokens", "1")
    assert refused.exit_code != 0 and "other weights" in refused.output, refused.output

    dry = adapterkit_cli("doctor", "--dry-run")
    assert dry.exit_code == 1, dry.output
    assert ("replaced  top@1: trained on top of pe2@1 with other weights than this library's "
            "pe2@1 (every use refuses it) — left as it is: it works again with the pocket book "
            "it was trained on back as pe2@1; `adapterkit rm top@1` removes it") in dry.output
    assert "without --dry-run to repair" not in dry.output  # nothing a repair would do
    fixed = adapterkit_cli("doctor", "--json")
    assert fixed.exit_code == 1, fixed.output
    report = json.loads(fixed.stdout)
    assert report["repaired"] is False and [p["kind"] for p in report["problems"]] == ["replaced"]
    assert books.exists("top@1") and not (home / "quarantine").exists()


# -- 3: rm names what is needed, and by what ------------------------------------------------

def test_rm_all_versions_names_only_the_versions_needed(books, adapterkit_cli):
    from adapterkit.lora.combine import stack

    stack(books, ["pe@1", "pe2"], None, name="st1")
    result = adapterkit_cli("rm", "pe", "--all-versions")
    assert result.exit_code == 1
    line = result.output.strip()
    assert line.startswith("Error: pe@1 is needed by st1@1 (") and "\n" not in line
    assert "pe@2" not in line
    assert books.exists("pe@1") and books.exists("pe@2")
    with pytest.raises(ConfigError, match=r"^pe2@1 is needed by st1@1 \("):
        books.remove("pe2")


# -- 4: a stack names each pocket book once (a merge may name one twice: the parity suite's
# exactness check merges a pocket book with itself at 0.5 + 0.5) ---------------------------

def test_stack_already_refuses_a_pocket_book_named_twice(books):
    from adapterkit.lora.combine import stack

    with pytest.raises(ConfigError, match=r"^pe2@1 is named 2 times"):
        stack(books, ["pe2", "pe2@1"], None, name="x7")


# -- 5: files get the permissions the umask gives ---------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_library_and_export_files_get_the_umask_permissions(books, pm, tmp_path, umask, mask):
    from adapterkit.lora.combine import merge

    os.umask(mask)
    expected = 0o666 & ~mask
    merged = merge(books, ["pe", "pe2"], [1.0, 0.5], method="cat", name="snd-pc", plugins=pm)
    assert _modes(merged.path) == dict.fromkeys(
        ["adapter_config.json", "adapter_model.safetensors", "README.md", "adapterkit.json"],
        expected)
    books.tag("snd-pc", "prod")  # rewrites adapterkit.json and README.md
    assert set(_modes(merged.path).values()) == {expected}

    os.chmod(merged.path / "adapter_model.safetensors", 0o600)  # as earlier versions saved it
    out = books.export("snd-pc", tmp_path / "out" / "snd-pc")
    modes = _modes(out)
    assert "adapter_model.safetensors" in modes and set(modes.values()) == {expected}
