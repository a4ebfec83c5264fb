"""``adapterkit verify``: every path against plain PEFT, drift detected, refusals named."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from adapterkit.cli import build_cli
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.plugin_api.testing import make_peft_adapter

pytestmark = pytest.mark.slow


def _run(home, *args):
    cli = build_cli(get_plugin_manager(entry_points=False, env=False))
    return CliRunner().invoke(cli, ["--home", str(home), *args])


def test_verify_reports_every_path_exact_and_records_it(tmp_path, tiny_base, home):
    folder = make_peft_adapter(tiny_base, tmp_path / "a", alpha_pattern={"q_proj": 3})
    assert _run(home, "import", str(folder), "--name", "a", "--base", str(tiny_base)).exit_code == 0
    result = _run(home, "verify", "a", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert set(report["paths"]) == {"session swap", "session stack", "stack --flatten",
                                    "export --merged"}
    for path, cell in report["paths"].items():
        assert cell["max_logit_diff"] < 1e-4, path
    meta = json.loads(next(home.rglob("adapterkit.json")).read_text())
    assert meta["verification"]["ok"] is True
    assert meta["verification"]["versions"]["peft"]
    card = next(home.rglob("README.md")).read_text()
    assert "exact on the 4 path(s)" in card and "export --merged: max logit" in card


def test_verify_catches_drift_in_our_own_math(tmp_path, tiny_base, home, monkeypatch):
    folder = make_peft_adapter(tiny_base, tmp_path / "a")
    _run(home, "import", str(folder), "--name", "a", "--base", str(tiny_base))
    from adapterkit.lora import factors

    real = factors.scale_of
    monkeypatch.setattr(factors, "scale_of", lambda config, module: real(config, module) * 1.5)
    result = _run(home, "verify", "a")
    assert result.exit_code == 1
    assert "DRIFT" in result.output


def test_verify_names_what_a_path_refuses(tmp_path, tiny_base, home):
    folder = make_peft_adapter(tiny_base, tmp_path / "d", use_dora=True)
    _run(home, "import", str(folder), "--name", "d", "--base", str(tiny_base))
    result = _run(home, "verify", "d")
    assert result.exit_code == 0, result.output
    assert result.output.count("refused:") == 4
    assert "DoRA" in result.output
    assert "not verified: every adapterkit path refuses it" in result.output
    card = next(home.rglob("README.md")).read_text()
    assert "not verified" in card and "exact on" not in card


def test_export_merged_refuses_when_our_math_is_wrong(tmp_path, tiny_base, library,
                                                      monkeypatch):
    """The merged model is checked against plain PEFT, not against our own factor reading:
    a wrong scale in our math makes the export refuse, and leaves nothing behind."""
    from adapterkit.lora import factors
    from adapterkit.runtime.export import MergeCheckFailed, export_merged

    folder = make_peft_adapter(tiny_base, tmp_path / "a")
    library.import_peft(folder, "a", base=str(tiny_base))
    real = factors.scale_of
    monkeypatch.setattr(factors, "scale_of", lambda config, module: real(config, module) * 1.5)
    with pytest.raises(MergeCheckFailed, match="differ from plain PEFT"):
        export_merged(library, "a", tmp_path / "merged")
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())
    monkeypatch.setattr(factors, "scale_of", real)
    report = export_merged(library, "a", tmp_path / "merged")
    assert report.max_logit_diff < 1e-4


def test_verify_keeps_an_imported_card_and_replaces_only_its_own_section(tmp_path, tiny_base,
                                                                         home):
    folder = make_peft_adapter(tiny_base, tmp_path / "a")
    (folder / "README.md").write_text("# My adapter\n\nWritten by its author.\n")
    _run(home, "import", str(folder), "--name", "a", "--base", str(tiny_base))
    for _ in range(2):
        assert _run(home, "verify", "a").exit_code == 0
    card = next(home.rglob("README.md")).read_text()
    assert card.startswith("# My adapter\n\nWritten by its author.")
    assert card.count("<!-- adapterkit:verification -->") == 1
    assert "exact on the 4 path(s)" in card


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_a_tolerance_that_bounds_nothing_is_refused_before_any_work(value, tmp_path,
                                                                    tiny_base, home):
    """``--tolerance nan`` failed every comparison and recorded DRIFT in the metadata and
    card; ``export --merged --tolerance nan`` merged and wrote the whole model first."""
    folder = make_peft_adapter(tiny_base, tmp_path / "a")
    _run(home, "import", str(folder), "--name", "a", "--base", str(tiny_base))
    for args in (("verify", "a"), ("export", "a", str(tmp_path / "out"), "--merged")):
        result = _run(home, *args, "--tolerance", value)
        assert result.exit_code == 1 and "--tolerance must be a finite number ≥ 0" in \
            result.output and "Loading base" not in result.output, result.output
    assert "verification" not in json.loads(next(home.rglob("adapterkit.json")).read_text()) \
        or not json.loads(next(home.rglob("adapterkit.json")).read_text())["verification"]
    assert not (tmp_path / "out").exists()


def test_verify_prints_its_figures_when_they_cannot_be_recorded(tmp_path, tiny_base, home,
                                                                monkeypatch):
    """A read-only home: the comparisons ran, then only "nothing was saved" was shown."""
    import errno

    from adapterkit.library.store import Library

    folder = make_peft_adapter(tiny_base, tmp_path / "a")
    _run(home, "import", str(folder), "--name", "a", "--base", str(tiny_base))

    def read_only(self, ref, change):
        raise OSError(errno.EROFS, "Read-only file system", str(self.root))

    monkeypatch.setattr(Library, "update_meta", read_only)
    result = _run(home, "verify", "a")
    assert result.exit_code == 1
    assert "session swap" in result.output and "max |logit diff| vs PEFT" in result.output
    assert "Not recorded in a@1's metadata and card: the file system is read-only" \
        in result.output


def test_verify_records_the_precision_it_checked_a_4bit_trained_book_on(tmp_path, tiny_base,
                                                                        home):
    """The card said "exact" for a qlora book checked on the float32 base, without a word."""
    from adapterkit.library.store import Library

    folder = make_peft_adapter(tiny_base, tmp_path / "a")
    _run(home, "import", str(folder), "--name", "a", "--base", str(tiny_base))
    Library(home).update_meta("a", lambda meta: setattr(meta, "method", "qlora"))
    cli = build_cli(get_plugin_manager(env=False))  # with the built-in qlora method
    result = CliRunner().invoke(cli, ["--home", str(home), "verify", "a", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["checked_on"] == "float32 base (trained on a 4bit one)"
    card = next(home.rglob("README.md")).read_text()
    assert "on the float32 base (trained on a 4bit one)" in card


def test_verify_says_logits_that_are_not_finite_are_not_finite(tmp_path, tiny_base, home):
    """A pocket book whose factors overflow the logits (inf, then NaN) in plain PEFT too was
    labelled DRIFT, as if adapterkit's math disagreed with PEFT's."""
    from safetensors.torch import load_file, save_file

    folder = make_peft_adapter(tiny_base, tmp_path / "big")
    state = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: v * 1e25 if "lora_" in k else v for k, v in state.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    result = _run(home, "import", str(folder), "--name", "big", "--base", str(tiny_base))
    assert result.exit_code == 0, result.output
    result = _run(home, "verify", "big")
    assert result.exit_code == 1
    assert "DRIFT" not in result.output, result.output
    assert "NOT FINITE (plain PEFT's and this path's logits hold NaN or inf)" in result.output
    assert "plain PEFT's are not finite either" in result.output
    card = next(home.rglob("README.md")).read_text()
    assert "logits not finite" in card and "DRIFT" not in card
    as_json = _run(home, "verify", "big", "--json")  # strict JSON: no NaN/Infinity
    paths = json.loads(as_json.stdout, parse_constant=lambda c: pytest.fail(c))["paths"]
    assert all(cell.get("max_logit_diff") is None for cell in paths.values() if
               "refused" not in cell), paths
