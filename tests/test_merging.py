"""Merge strategies and stacks: PEFT's methods, the exact low-rank combination, flattening."""

import pytest
import torch

import adapterkit
from adapterkit.lora import combine as merging
from adapterkit import BaseMismatch, ConfigError
from adapterkit.lora.combine import lora_pairs, scale_of
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.plugin_api.testing import make_peft_adapter

IDS = torch.tensor([[5, 17, 42, 99, 3, 120, 7, 64]])


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(env=False)


@pytest.fixture
def books(library, tiny_base, tmp_path):
    for name, seed, r in (("a", 1, 4), ("b", 2, 4), ("c", 3, 8)):
        path = make_peft_adapter(tiny_base, tmp_path / name, seed=seed, r=r,
                                 target_modules=["q_proj", "v_proj", "down_proj"])
        library.import_peft(path, name, base=str(tiny_base))
    return library


def delta(book, path):
    import json

    config = json.loads((book.path / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    pair = lora_pairs(load_file(book.path / "adapter_model.safetensors"))[path]
    return (pair["B"].double() @ pair["A"].double()) * scale_of(config, pair["A"].shape[0])


PATH = "model.layers.1.mlp.down_proj"


def test_exact_svd_equals_peft_svd(books, tiny_base, pm, home):
    exact = merging.merge(books, ["a", "b", "c"], [1.0, 0.5, -0.3], method="exact_svd",
                                     name="exact", rank=6, plugins=pm)
    peft = merging.merge(books, ["a", "b", "c"], [1.0, 0.5, -0.3], method="svd",
                                    name="peftsvd", rank=6, plugins=pm)
    assert exact.meta.parents == ["a@1", "b@1", "c@1"]
    assert exact.meta.source == {"kind": "merge", "method": "exact_svd"}
    diff = (delta(exact, PATH) - delta(peft, PATH)).abs().max().item()
    assert diff < 1e-5, diff
    # at full rank (4 + 4 + 8) the combination is the exact weighted sum
    full = merging.merge(books, ["a", "b", "c"], [1.0, 0.5, -0.3], method="exact_svd",
                                    name="full", rank=16, plugins=pm)
    want = sum(w * delta(books.get(n), PATH) for n, w in (("a", 1.0), ("b", 0.5), ("c", -0.3)))
    assert (delta(full, PATH) - want).abs().max().item() < 1e-6


@pytest.mark.parametrize("method,kw", [
    ("linear", {}), ("cat", {}), ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.7}),
    ("dare_ties", {"density": 0.7}), ("magnitude_prune", {"density": 0.5}),
    ("ties_svd", {"density": 0.5}), ("dare_linear_svd", {"density": 0.7}),
    ("dare_ties_svd", {"density": 0.7}), ("magnitude_prune_svd", {"density": 0.5}),
])
def test_peft_methods_produce_loadable_adapters(books, tiny_base, pm, method, kw):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    book = merging.merge(books, ["a", "b"], [0.7, 0.3], method=method,
                                    name=f"m-{method}", plugins=pm, **kw)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), book.path)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()


def test_cat_merge_matches_the_session_stack(books, tiny_base, pm, home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    book = merging.merge(books, ["a", "c"], [1.0, 0.5], method="cat", name="cat",
                                    plugins=pm)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                      book.path).eval()
    session = adapterkit.open(str(tiny_base), home=home)
    session.stack({"a": 1.0, "c": 0.5})
    with torch.no_grad():
        torch.testing.assert_close(session.model(input_ids=IDS).logits,
                                   model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_stack_entry_and_flatten(books, tiny_base, home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    entry = merging.stack(books, ["a", "c"], [1.0, 0.5], name="ac")
    assert entry.meta.kind == "stack" and entry.meta.parents == ["a@1", "c@1"]
    assert not (entry.path / "adapter_model.safetensors").exists()
    flat = merging.stack(books, ["a", "c"], [1.0, 0.5], name="ac-flat", flatten=True)
    session = adapterkit.open(str(tiny_base), home=home)
    session.swap("ac")  # a saved stack activates its members
    assert session.active == {"a@1": 1.0, "c@1": 0.5}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                      flat.path).eval()
    with torch.no_grad():
        torch.testing.assert_close(session.model(input_ids=IDS).logits,
                                   model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("refs,weights,kw,error,match", [
    (["a", "b"], [1.0], {}, ConfigError, "2 pocket books but 1 weights"),
    (["a", "b"], [1.0, float("nan")], {}, ConfigError, "finite number"),
    (["a", "b"], [1.0, -1.0], {"method": "ties", "density": 0.5}, ConfigError,
     "does not accept negative weights"),
    (["a", "b"], [1.0, 1.0], {"method": "dare_ties", "density": 1.5}, ConfigError,
     "needs --density in \\(0, 1\\]"),
    (["a", "b"], [1.0, 1.0], {"method": "dare_linear"}, ConfigError, "needs --density"),
    (["a", "c"], [1.0, 1.0], {"method": "linear"}, ConfigError, "PEFT cannot merge these"),
    (["a", "b"], [1.0, 1.0], {"method": "nope"}, adapterkit.PluginError,
     "unknown merge strategy 'nope'; known: .*exact_svd"),
    (["a"], [1.0], {}, ConfigError, "at least two"),
])
def test_bad_merges(books, pm, refs, weights, kw, error, match):
    kw = {"method": "exact_svd", **kw}
    with pytest.raises(error, match=match):
        merging.merge(books, refs, weights, name="bad", plugins=pm, **kw)
    assert not books.exists("bad")


def test_members_of_different_bases_are_refused(books, other_base, tmp_path, pm):
    path = make_peft_adapter(other_base, tmp_path / "o")
    books.import_peft(path, "o", base=str(other_base))
    with pytest.raises(BaseMismatch, match="different bases"):
        merging.merge(books, ["a", "o"], None, method="exact_svd", name="x",
                                 plugins=pm)
    with pytest.raises(BaseMismatch, match="different bases"):
        merging.stack(books, ["a", "o"], None, name="x")


def test_export_merged_full_and_4bit(books, tiny_base, home, tmp_path, pm):
    from transformers import AutoModelForCausalLM

    from adapterkit.runtime.export import export_merged

    report = export_merged(books, "c", tmp_path / "merged", plugins=pm)
    assert report.max_logit_diff < 1e-4 and report.dequantized_from is None
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    session = adapterkit.open(str(tiny_base), home=home)
    session.swap("c")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits,
                                   session.model(input_ids=IDS).logits, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    # a stack folds too
    merging.stack(books, ["a", "c"], [1.0, 0.5], name="ac")
    assert export_merged(books, "ac", tmp_path / "stack-merged", plugins=pm).max_logit_diff < 1e-4

    pytest.importorskip("bitsandbytes")
    q = books.get("b")
    meta_path = q.path / "adapterkit.json"
    import json

    data = json.loads(meta_path.read_text())
    data["method"] = "qlora"  # as if trained on the 4-bit base
    meta_path.write_text(json.dumps(data))
    books.rebuild_catalog()
    report = export_merged(books, "b", tmp_path / "q-merged", plugins=pm)
    assert report.dequantized_from == "nf4" and report.max_logit_diff < 1e-3


def test_export_merged_refuses_divergence_and_busy_folders(books, tmp_path, pm):
    from adapterkit import NameTaken
    from adapterkit.runtime.export import MergeCheckFailed, export_merged

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("mine")
    with pytest.raises(NameTaken, match="not empty"):
        export_merged(books, "a", tmp_path / "busy", plugins=pm)
    with pytest.raises(MergeCheckFailed, match="differ from the unmerged session's by"):
        export_merged(books, "a", tmp_path / "strict", tolerance=0.0 - 1.0, plugins=pm)
    assert not (tmp_path / "strict").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".strict")] == []
