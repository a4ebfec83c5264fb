"""Plain-PEFT adapters join the library only if they fit the base, and leave it unchanged."""

import json
import os
import shutil

import pytest
import torch

from adapterkit import BaseMismatch, InvalidAdapter, UnsafeWeights
from adapterkit.plugin_api.testing import make_peft_adapter, make_tiny_base


def logits(base_folder, adapter_folder=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder)
    if adapter_folder is not None:
        model = PeftModel.from_pretrained(model, adapter_folder)
    ids = torch.tensor([[5, 17, 42, 99, 3, 120, 7]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_import_list_export_round_trip_gives_identical_logits(library, tiny_base, peft_adapter,
                                                               tmp_path):
    book = library.import_peft(peft_adapter, "pe", base=str(tiny_base))
    assert book.meta.source["kind"] == "import"
    assert book.meta.hyperparameters["r"] == 4
    assert [s.name for s in library.list()] == ["pe"]
    out = library.export("pe", tmp_path / "exported")
    original = logits(tiny_base, peft_adapter)
    assert torch.equal(logits(tiny_base, out), original)
    assert not torch.allclose(logits(tiny_base), original)  # the adapter really does something


def test_base_defaults_to_the_adapter_config(library, peft_adapter):
    assert library.import_peft(peft_adapter, "pe").meta.base["provenance"]["kind"] == "folder"


def test_adapter_for_another_base_is_refused(library, tiny_base, other_base, tmp_path):
    foreign = make_peft_adapter(other_base, tmp_path / "foreign")
    with pytest.raises(BaseMismatch, match="does not fit in_features=64"):
        library.import_peft(foreign, "foreign", base=str(tiny_base))
    assert library.list() == []


def test_target_list_is_refused_only_when_no_name_exists(library, tiny_base, peft_adapter,
                                                         tmp_path):
    """As PEFT: one target list may serve several architectures, so a name the base lacks is
    fine as long as one exists; a list of which none exists would change nothing."""
    partly = tmp_path / "partly"
    shutil.copytree(peft_adapter, partly)
    config = json.loads((partly / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj", "qkv_proj"]
    (partly / "adapter_config.json").write_text(json.dumps(config))
    assert library.import_peft(partly, "partly", base=str(tiny_base)).ref == "partly@1"
    config["target_modules"] = ["qkv_proj", "wqkv"]
    (partly / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BaseMismatch, match="none of the target modules qkv_proj, wqkv exists"):
        library.import_peft(partly, "broken", base=str(tiny_base))


def edited(adapter, folder, **changes):
    """A copy of ``adapter`` whose adapter_config.json has ``changes``."""
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("changes,ignored", [
    ({"target_modules": ["q_proj"]}, "layers.0.self_attn.v_proj, model.layers.1.self_attn.v_proj"),
    ({"layers_to_transform": [0]}, "layers.1.self_attn.q_proj, model.layers.1.self_attn.v_proj"),
    ({"exclude_modules": ["v_proj"]}, "layers.0.self_attn.v_proj, model.layers.1.self_attn.v_proj"),
])
def test_factors_the_config_does_not_target_are_refused(library, tiny_base, peft_adapter,
                                                        tmp_path, changes, ignored):
    """PEFT builds LoRA layers only where the config targets and drops the other factors;
    sessions and merges read every factor, so such a file would give other answers there."""
    with pytest.raises(InvalidAdapter, match=f"factors for model.{ignored}, which its "
                                             "target_modules.* PEFT would ignore them"):
        library.import_peft(edited(peft_adapter, tmp_path / "a", **changes), "a",
                            base=str(tiny_base))
    assert library.list(all_versions=True) == []


@pytest.mark.parametrize("changes,said", [
    ({"r": 16}, "have factors of rank 8, but its config gives r=16"),
    ({"rank_pattern": {"v_proj": 2}}, "v_proj have factors of rank 8, but its config gives r=2"),
])
def test_factors_of_another_rank_than_the_config_are_refused(library, tiny_base, tmp_path,
                                                             changes, said):
    """PEFT refuses such a file (size mismatch); the scale would use the config's r."""
    adapter = make_peft_adapter(tiny_base, tmp_path / "r8", r=8)
    with pytest.raises(InvalidAdapter, match=f"{said} .*PEFT refuses to load it"):
        library.import_peft(edited(adapter, tmp_path / "a", **changes), "a",
                            base=str(tiny_base))
    assert library.list(all_versions=True) == []


def test_a_book_whose_config_was_changed_since_import_is_refused_on_load(library, tiny_base,
                                                                         peft_adapter):
    """A pocket book imported before these checks (or changed since) is refused when loaded."""
    import adapterkit

    library.import_peft(peft_adapter, "ok", base=str(tiny_base))
    book = library.import_peft(peft_adapter, "pe", base=str(tiny_base))
    book = library.update_meta("pe", lambda meta: setattr(meta, "files", {}))  # no hashes
    config = json.loads((book.path / "adapter_config.json").read_text())
    (book.path / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    session = adapterkit.open(str(tiny_base), home=library.home)
    assert session.attach("ok") == "ok@1"
    with pytest.raises(InvalidAdapter, match="pe@1: .*config gives r=16"):
        session.attach("pe")


def test_other_vocabulary_is_refused(library, tiny_base, tmp_path):
    big_vocab = make_tiny_base(tmp_path / "bigvocab", vocab_size=320)
    adapter = make_peft_adapter(big_vocab, tmp_path / "emb", target_modules=["embed_tokens"])
    with pytest.raises(BaseMismatch, match="vocabulary of 3.. tokens, the base has 2.."):
        library.import_peft(adapter, "emb", base=str(tiny_base))


def test_pickled_weights_need_explicit_trust(library, tiny_base, peft_adapter, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(peft_adapter / "adapter_config.json", pickled)
    torch.save(load_file(peft_adapter / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    with pytest.raises(UnsafeWeights, match="--trust-pickle"):
        library.import_peft(pickled, "p", base=str(tiny_base))
    assert library.list() == []
    book = library.import_peft(pickled, "p", base=str(tiny_base), trust_pickle=True)
    assert (book.path / "adapter_model.safetensors").is_file()
    assert not (book.path / "adapter_model.bin").exists()
    assert torch.equal(logits(tiny_base, book.path), logits(tiny_base, peft_adapter))


@pytest.mark.parametrize("setup,match", [
    (lambda d: None, "has no adapter_config.json"),
    (lambda d: (d / "adapter_config.json").write_text("{nope"), "not valid JSON"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "IA3"}'), "IA3 adapter"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA"}'),
     "has no adapter_model.safetensors"),
])
def test_not_a_peft_adapter(library, tiny_base, tmp_path, setup, match):
    folder = tmp_path / "x"
    folder.mkdir()
    setup(folder)
    with pytest.raises(InvalidAdapter, match=match):
        library.import_peft(folder, "x", base=str(tiny_base))


def test_truncated_adapter_weights(library, tiny_base, peft_adapter, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(peft_adapter, cut)
    w = cut / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(InvalidAdapter, match="adapter weights"):
        library.import_peft(cut, "cut", base=str(tiny_base))


def test_a_long_target_list_is_read_as_peft_shortens_it(library, tmp_path):
    """With 20 or more target modules (every linear layer of a base of 3 layers, by name: 21),
    PEFT's ``inject_adapter`` shortens the list to suffixes, and then ``layers_to_transform``
    filters the layers. Checked against PEFT itself: an adapter made on all layers whose config
    is then limited to layer 0 loads in PEFT with LoRA on layer 0 only, and is refused here;
    one PEFT made with that config is accepted."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_tiny_base(tmp_path / "three", num_hidden_layers=3)
    names = [n for n, m in AutoModelForCausalLM.from_pretrained(base).named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(names) >= 20
    whole = make_peft_adapter(base, tmp_path / "whole", target_modules=names)
    # (PEFT saves the list it shortened: put the long one back, as a hand-written config has it)
    limited = edited(whole, tmp_path / "limited", target_modules=names, layers_to_transform=[0])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), limited)
    wrapped = {n.split(".layers.")[1].split(".")[0] for n, m in peft.named_modules()
               if hasattr(m, "lora_A") and ".layers." in n}
    assert wrapped == {"0"}  # PEFT drops layers 1 and 2's factors
    with pytest.raises(InvalidAdapter, match="model.layers.1.* PEFT would ignore them"):
        library.import_peft(limited, "limited", base=str(base))
    made = make_peft_adapter(base, tmp_path / "made", target_modules=names,
                             layers_to_transform=[0])
    assert library.import_peft(made, "made", base=str(base)).ref == "made@1"


def test_the_finiteness_check_reads_float8_and_skips_integer_tensors(tmp_path):
    """torch has no isfinite for float8: the import check widens it rather than fail."""
    import torch
    from safetensors.torch import save_file

    from adapterkit.errors import InvalidAdapter
    from adapterkit.library.peft_folder import _refuse_non_finite

    weights = tmp_path / "adapter_model.safetensors"
    save_file({"a.lora_A.weight": torch.ones(2, 2).to(torch.float8_e4m3fn),
               "steps": torch.tensor([3], dtype=torch.int64)}, weights)
    _refuse_non_finite(weights, tmp_path)
    save_file({"a.lora_B.weight": torch.tensor([[float("nan")]]).to(torch.float8_e4m3fn)},
              weights)
    with pytest.raises(InvalidAdapter, match="not finite numbers .* first a.lora_B.weight"):
        _refuse_non_finite(weights, tmp_path)


def test_an_imported_book_names_its_base_as_a_trained_one_does(library, tiny_base, peft_adapter,
                                                               tmp_path):
    """Before: the config kept the absolute path the adapter was saved on (PEFT writes it)
    unless the base had a Hub id, so a converted GGUF base of a known model, or a local
    folder, was pushed as ``/home/.../bases/...``."""
    from adapterkit.base.resolve import BASE_INFO_FILE
    from adapterkit.library.card import base_id

    assert json.loads((peft_adapter / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(tiny_base)  # PEFT's: a local path
    folder = library.import_peft(peft_adapter, "local", base=str(tiny_base))
    config = json.loads((folder.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_base.name  # as train writes it

    converted = tmp_path / "bases" / "tiny.Q4_1-0123456789ab"  # a GGUF converted by adapterkit
    shutil.copytree(tiny_base, converted)
    (converted / BASE_INFO_FILE).write_text(json.dumps({"name": "tiny.Q4_1.gguf", "provenance": {
        "kind": "gguf", "file": "tiny.Q4_1.gguf", "sha256": "0" * 64,
        "derived_from": "someone/tiny-original"}}))
    gguf = library.import_peft(peft_adapter, "gguf", base=str(converted))
    config = json.loads((gguf.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "someone/tiny-original" == base_id(gguf.meta)


def test_an_imported_book_records_the_lora_settings_that_change_its_scale(
        library, tiny_base, tmp_path, adapterkit_cli):
    """Before: only r, lora_alpha, lora_dropout and target_modules were recorded, so the card
    and ``show`` gave every layer rank r and scale alpha/r."""
    from adapterkit.library.card import render_card

    adapter = make_peft_adapter(tiny_base, tmp_path / "patterned", r=4,
                                rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 16},
                                use_rslora=True)
    book = library.import_peft(adapter, "patterned", base=str(tiny_base))
    h = book.meta.hyperparameters
    assert h["rank_pattern"] == {"v_proj": 2} and h["alpha_pattern"] == {"v_proj": 16}
    assert h["use_rslora"] is True
    assert not {"use_dora", "bias", "layers_to_transform", "modules_to_save"} & set(h)  # defaults
    card = render_card(book.meta)
    assert '| rank_pattern | {"v_proj": 2} |' in card and "| use_rslora | True |" in card
    assert "`rank_pattern` / `alpha_pattern` give the modules they match their own" in card
    assert "lora_alpha / √r" in card
    shown = adapterkit_cli("show", "patterned")
    assert shown.exit_code == 0, shown.output
    assert "rank_pattern={'v_proj': 2}" in shown.output and "use_rslora=True" in shown.output


# -- an export's own record (adapterkit.json) comes back with it -------------------------------

def _trained_looking(library, peft_adapter, tiny_base, name="q4"):
    """A pocket book whose record says what a training run records (qlora, sft, data,
    metrics, a tag), as `adapterkit train --method qlora` leaves one."""
    library.import_peft(peft_adapter, name, base=str(tiny_base))

    def as_trained(meta):
        meta.method, meta.trainer, meta.tags = "qlora", "sft", ["prod"]
        meta.data = {"description": "notes.jsonl (16 rows)", "sha256": "ab" * 32, "rows": 16}
        meta.metrics = {"steps": 3, "forgetting": {
            "general_loss": 3.82, "general_loss_base": 3.81, "general_loss_change_pct": 0.26,
            "base_loss_from": "this run"}}
        meta.source = {}

    return library.update_meta(name, as_trained)


def test_an_export_imports_with_its_record_and_a_card_of_its_own(library, tiny_base,
                                                                  peft_adapter, tmp_path):
    """Before: the record was dropped (method "lora", no trainer, data or metrics) and the
    exported card, naming the old entry, was copied as it was; without --base the import
    looked for the base its config names instead of the one the record names."""
    book = _trained_looking(library, peft_adapter, tiny_base)
    out = library.export("q4", tmp_path / "exp_q4")
    moved = library.import_peft(out, "q4-moved")  # no --base: the recorded one is found
    meta = moved.meta
    assert (meta.method, meta.trainer, meta.data, meta.metrics) == (
        "qlora", "sft", book.meta.data, book.meta.metrics)
    assert meta.base == book.meta.base and meta.tags == []
    assert meta.source == {"kind": "import", "folder": "exp_q4", "recorded_as": "q4@1"}
    card = (moved.path / "README.md").read_text()
    assert "# q4-moved — adapterkit pocket book" in card and "`qlora`" in card
    assert "# q4 —" not in card and "prod" not in card
    assert (moved.path / "adapter_model.safetensors").read_bytes() == \
        (book.path / "adapter_model.safetensors").read_bytes()


def test_an_export_whose_weights_changed_is_refused(library, tiny_base, peft_adapter,
                                                    tmp_path):
    """A record is never attached to other weights: a changed file means an edited folder or
    a damaged copy, said with what to do; nothing joins the library."""
    _trained_looking(library, peft_adapter, tiny_base)
    out = library.export("q4", tmp_path / "exp_q4")
    other = make_peft_adapter(tiny_base, tmp_path / "other", seed=7)
    shutil.copy(other / "adapter_model.safetensors", out / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapter, match="adapter_model.safetensors differs from what was "
                                             "exported.*nothing was imported.*move "
                                             "adapterkit.json out of the folder"):
        library.import_peft(out, "changed", base=str(tiny_base))
    assert [s.name for s in library.list()] == ["q4"]


def test_a_book_whose_record_is_unreadable_is_not_exported(library, tiny_base, peft_adapter,
                                                           tmp_path):
    """``export`` copied an unreadable ``adapterkit.json`` as it was and said "Exported": no
    import could read the folder, and exporting again wrote the same. It is refused, naming
    the file and doctor; nothing is written."""
    _trained_looking(library, peft_adapter, tiny_base)
    (library.get("q4").path / "adapterkit.json").write_text("{bad")
    with pytest.raises(InvalidAdapter, match=r"q4@1 cannot be exported: .*adapterkit\.json.*"
                                             r"`adapterkit doctor` moves"):
        library.export("q4@1", tmp_path / "exp_bad")
    assert not (tmp_path / "exp_bad").exists()


def test_a_record_without_the_hashes_of_its_files_is_not_attached_to_them(
        library, tiny_base, peft_adapter, tmp_path):
    """It was imported with its whole record (method, metrics, base) and only a warning that
    nothing could be checked: a record that proves nothing about the files beside it."""
    import json

    _trained_looking(library, peft_adapter, tiny_base)
    out = library.export("q4", tmp_path / "exp_q4")
    record = json.loads((out / "adapterkit.json").read_text())
    del record["files"]
    (out / "adapterkit.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="records no SHA-256 of adapter_config.json and "
                                         "adapter_model.safetensors.*imported as a plain PEFT"):
        plain = library.import_peft(out, "unproven", base=str(tiny_base))
    assert (plain.meta.method, plain.meta.trainer, plain.meta.metrics) == ("lora", None, {})


def test_an_export_on_a_base_this_home_does_not_know_asks_for_it(tiny_base, peft_adapter,
                                                                  tmp_path):
    """In another home the recorded base is not found: refused saying to pass --base (not
    "cannot download" the base its config names); with --base the record is kept."""
    from adapterkit import BaseNotFound, Library

    library = Library(tmp_path / "first")
    book = _trained_looking(library, peft_adapter, tiny_base)
    out = library.export("q4", tmp_path / "exp_q4")
    elsewhere = Library(tmp_path / "second")
    with pytest.raises(BaseNotFound, match="was made on base tiny .*which this adapterkit home does not know .*: pass "
                                           "the base it was made on with --base"):
        elsewhere.import_peft(out, "q4")
    moved = elsewhere.import_peft(out, "q4", base=str(tiny_base))
    assert (moved.meta.method, moved.meta.base_fingerprint) == ("qlora", book.meta.base_fingerprint)


def test_export_destinations_that_cannot_be_folders_are_named_the_same_way_by_every_export(
        adapterkit_cli, tiny_base, peft_adapter, tmp_path):
    """A DEST that is a file was "not empty" to the GGUF and merged exports ("is a file" to the
    plain one); a DEST under a file leaked the export's hidden temporary path; a saved stack
    was "not a single adapter", with no word on what to do."""
    cli = adapterkit_cli
    assert cli("import", peft_adapter, "--name", "pe", "--base", tiny_base).exit_code == 0
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for extra in ([], ["--merged"], ["--format", "gguf"], ["--merged", "--format", "gguf"]):
        result = cli("export", "pe", afile, *extra)
        assert result.exit_code == 1 and f"{afile} is a file" in result.output, (extra,
                                                                               result.output)
        result = cli("export", "pe", afile / "sub", *extra)
        assert result.exit_code == 1, result.output
        assert f"inside {afile}, which is a file" in result.output, (extra, result.output)
        assert ".partial" not in result.output
    assert afile.read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]

    assert cli("import", peft_adapter, "--name", "pf", "--base", tiny_base).exit_code == 0
    assert cli("stack", "pe", "pf", "--weights", "1,0.5", "--name", "s_ab").exit_code == 0
    result = cli("export", "s_ab", tmp_path / "x")
    assert result.exit_code == 1
    assert ("`adapterkit stack pe@1 pf@1 --weights 1,0.5 --flatten --name NAME`"
            in result.output), result.output
    assert "--merged" in result.output and "--format gguf" in result.output
    assert cli("stack", "pe@1", "pf@1", "--weights", "1.0,0.5", "--flatten",
               "--name", "flat").exit_code == 0
    assert cli("export", "flat", tmp_path / "x").exit_code == 0


def test_no_export_writes_into_the_adapterkit_home(adapterkit_cli, home, tiny_base,
                                                    peft_adapter, tmp_path):
    """Found by a library-ops user: `export pe HOME/library/x/1` was accepted, and the folder
    it wrote (with its adapterkit.json) was then read as a pocket book of its own. Every
    export refuses a DEST inside the home, by any path to it (a link too), writing nothing."""
    from adapterkit import Library

    cli = adapterkit_cli
    assert cli("import", peft_adapter, "--name", "pe", "--base", tiny_base).exit_code == 0
    before = sorted(str(p.relative_to(home)) for p in home.rglob("*") if "tmp" not in p.parts)
    link = tmp_path / "to-home"
    link.symlink_to(home)
    into = tmp_path / "to-library"
    into.symlink_to(home / "library")
    for dest in (home / "library" / "x" / "1", home / "out", link / "library" / "y",
                 into / "z" / "1"):
        for extra in ([], ["--merged"], ["--format", "gguf"], ["--merged", "--format", "gguf"]):
            result = cli("export", "pe", dest, *extra)
            assert result.exit_code == 1, (dest, extra, result.output)
            assert (f"{dest} is inside the adapterkit home {home}, whose folders adapterkit "
                    "manages: export to a folder outside it") in result.output, result.output
    after = sorted(str(p.relative_to(home)) for p in home.rglob("*") if "tmp" not in p.parts)
    assert after == before
    assert [(s.name, s.version) for s in Library(home).list()] == [("pe", 1)]
    assert cli("export", "pe", tmp_path / "out").exit_code == 0  # outside: as before


def test_an_export_inside_the_home_by_another_spelling_is_refused(home, tiny_base,
                                                                   peft_adapter, tmp_path,
                                                                   monkeypatch):
    """Where no spelling of the two paths shows it — a case-insensitive file system, a bind
    mount — the file system's own identity of the folders does. Simulated: a link whose
    target ``realpath`` is made not to see (as on those systems), so only the walk up the
    destination's folders by device and inode can tell."""
    import adapterkit.library.store as store
    from adapterkit import ConfigError, Library

    library = Library(home)
    library.import_peft(peft_adapter, "pe", base=str(tiny_base))
    other = tmp_path / "other-spelling"
    other.symlink_to(home)
    monkeypatch.setattr(store.os.path, "realpath", lambda p: os.path.abspath(p))
    with pytest.raises(ConfigError, match="is inside the adapterkit home"):
        library.export("pe", other / "library" / "x" / "1")
    assert not (home / "library" / "x").exists()
    assert library.export("pe", tmp_path / "out").is_dir()  # outside: as before
