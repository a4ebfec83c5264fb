"""Merge strategies and stacks: PEFT's methods, the exact low-rank combination, flattening.

Every strategy is checked against a reference that does not go through adapterkit's LoRA code:
plain PEFT's ``add_weighted_adapter`` on the members' own PEFT folders (its ΔW read with PEFT's
``get_delta_weight``), or a ΔW computed by hand from the raw safetensors.
"""

import json
import re

import pytest
import torch

import adapterkit
from adapterkit import BaseMismatch, ConfigError
from adapterkit.lora import combine as merging
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.plugin_api.testing import make_peft_adapter

IDS = torch.tensor([[5, 17, 42, 99, 3, 120, 7, 64]])
TARGETS = ["q_proj", "v_proj", "down_proj"]
#: 2 layers x 3 targets: every module a merged pocket book must cover
MODULES = {f"model.layers.{i}.{part}" for i in range(2)
           for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(env=False)


@pytest.fixture
def folders(tiny_base, tmp_path):
    """The members as plain PEFT made them (the reference reads these, not the library)."""
    return {name: make_peft_adapter(tiny_base, tmp_path / name, seed=seed, r=r,
                                    target_modules=TARGETS)
            for name, seed, r in (("a", 1, 4), ("b", 2, 4), ("c", 3, 8))}


@pytest.fixture
def books(library, tiny_base, folders):
    for name, path in folders.items():
        library.import_peft(path, name, base=str(tiny_base))
    return library


def hand_factors(folder):
    """module path → (A, B, scale) read straight from a PEFT folder, in float64."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")
    assert not config.get("use_rslora")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[module] = (a.double(), b.double(), config["lora_alpha"] / config["r"])
    return out


def hand_delta(folder):
    """module path → ΔW = scale · B @ A, computed by hand from the saved tensors."""
    return {m: s * (b @ a) for m, (a, b, s) in hand_factors(folder).items()}


def plain_peft(tiny_base, folders):
    """A plain PEFT model with each folder loaded as an adapter of the same name."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(folders)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                      str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    return model.eval()


def peft_delta(model, adapter):
    """module path → ΔW of ``adapter`` as PEFT itself computes it."""
    from peft.tuners.lora import LoraLayer

    return {name: module.get_delta_weight(adapter).double()
            for name, module in model.base_model.model.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A}


def logits_of(model, adapter):
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_same_deltas(got, want, atol):
    assert set(got) == set(want) == MODULES
    for module in sorted(want):
        diff = (got[module] - want[module]).abs().max().item()
        assert diff < atol, (module, diff)
        assert want[module].abs().max().item() > 100 * atol, module  # not trivially zero


WEIGHTS3 = [1.0, 0.5, -0.3]


def test_exact_svd_equals_peft_svd(books, folders, tiny_base, pm):
    exact = merging.merge(books, ["a", "b", "c"], WEIGHTS3, method="exact_svd", name="exact",
                          rank=6, plugins=pm)
    assert exact.meta.parents == ["a@1", "b@1", "c@1"]
    assert exact.meta.source == {"kind": "merge", "method": "exact_svd"}
    plain = plain_peft(tiny_base, folders)
    plain.add_weighted_adapter(["a", "b", "c"], WEIGHTS3, "svd6", combination_type="svd",
                               svd_rank=6)
    assert_same_deltas(hand_delta(exact.path), peft_delta(plain, "svd6"), atol=1e-5)
    # at full rank (4 + 4 + 8) the combination is the exact weighted sum of the deltas
    full = merging.merge(books, ["a", "b", "c"], WEIGHTS3, method="exact_svd", name="full",
                         rank=16, plugins=pm)
    members = [hand_delta(folders[n]) for n in ("a", "b", "c")]
    want = {m: sum(w * d[m] for w, d in zip(WEIGHTS3, members)) for m in MODULES}
    assert_same_deltas(hand_delta(full.path), want, atol=1e-6)


PEFT_STRATEGIES = [
    ("linear", {}), ("cat", {}), ("svd", {}), ("ties", {"density": 0.5}),
    ("dare_linear", {"density": 0.7}), ("dare_ties", {"density": 0.7}),
    ("magnitude_prune", {"density": 0.5}), ("ties_svd", {"density": 0.5}),
    ("dare_linear_svd", {"density": 0.7}), ("dare_ties_svd", {"density": 0.7}),
    ("magnitude_prune_svd", {"density": 0.5}),
]


def seeded_random_pruning(monkeypatch):
    """Make DARE's random drop reproducible: the n-th call of a run draws from seed n.

    Returns the list of calls, to reset between runs (both runs prune the same tensors in the
    same order, so the same masks are drawn only if the plumbing is the same).
    """
    from peft.utils import merge_utils

    real = merge_utils.random_pruning
    calls = []

    def seeded(tensor, density, rescale):
        calls.append(density)
        torch.manual_seed(len(calls))
        return real(tensor, density, rescale)

    monkeypatch.setattr(merge_utils, "random_pruning", seeded)
    return calls


@pytest.mark.parametrize("method,kw", PEFT_STRATEGIES, ids=[m for m, _ in PEFT_STRATEGIES])
def test_peft_strategies_save_what_plain_peft_computes(books, folders, tiny_base, pm, method,
                                                       kw, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    calls = seeded_random_pruning(monkeypatch)
    book = merging.merge(books, ["a", "b"], [0.7, 0.3], method=method, name=f"m-{method}",
                         plugins=pm, **kw)
    ours_calls = list(calls)
    calls.clear()
    plain = plain_peft(tiny_base, {"a": folders["a"], "b": folders["b"]})
    plain.add_weighted_adapter(["a", "b"], [0.7, 0.3], "merged", combination_type=method, **kw)
    if method.startswith("dare"):  # both drew the same random masks, with the same density
        assert ours_calls == list(calls) and set(calls) == {kw["density"]}
    else:
        assert ours_calls == calls == []
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                     str(book.path), adapter_name="ours").eval()
    assert_same_deltas(peft_delta(ours, "ours"), peft_delta(plain, "merged"), atol=1e-6)
    torch.testing.assert_close(logits_of(ours, "ours"), logits_of(plain, "merged"),
                               rtol=1e-5, atol=1e-5)
    assert book.meta.hyperparameters["merge_method"] == method


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_a_dare_merge_gives_the_same_weights_every_time(books, folders, tiny_base, pm, method):
    """DARE drops entries at random: the same command twice saved weights whose logits were
    up to 1.08 apart (PEFT's masks drawn from torch's unseeded global generator). Seeded, both
    runs save bit-identical tensors, those of plain PEFT with torch seeded 0."""
    from safetensors.torch import load_file

    saved = []
    for run in range(2):
        torch.manual_seed(100 + run)  # whatever the caller's random state is
        book = merging.merge(books, ["a", "b"], [0.7, 0.3], method=method,
                             name=f"d{run}", plugins=pm, density=0.5)
        saved.append(load_file(str(book.path / "adapter_model.safetensors")))
    assert saved[0].keys() == saved[1].keys() and saved[0]
    for key in saved[0]:
        assert torch.equal(saved[0][key], saved[1][key]), key
    plain = plain_peft(tiny_base, {"a": folders["a"], "b": folders["b"]})
    torch.manual_seed(0)
    plain.add_weighted_adapter(["a", "b"], [0.7, 0.3], "merged", combination_type=method,
                               density=0.5)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                     str(books.get("d0").path), adapter_name="ours").eval()
    assert_same_deltas(peft_delta(ours, "ours"), peft_delta(plain, "merged"), atol=1e-6)


def test_merge_seed_is_passed_recorded_and_checked(books, folders, tiny_base, pm,
                                                   adapterkit_cli, monkeypatch):
    """``merge --seed N`` (``adapterkit.merge(seed=N)``) draws DARE's drop from N: plain PEFT
    with torch seeded N gives the same deltas, and the seed is recorded; a strategy written
    before ``seed=`` (no ``**options``) is not handed it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM


    monkeypatch.setenv("ADAPTERKIT_HOME", str(books.home))
    out = adapterkit_cli("merge", "a", "b", "--method", "dare_linear", "--density", "0.5",
                         "--weights", "0.7,0.3", "--seed", "7", "--name", "s7")
    assert out.exit_code == 0, out.output
    book = books.get("s7")
    assert book.meta.hyperparameters["seed"] == 7
    plain = plain_peft(tiny_base, {"a": folders["a"], "b": folders["b"]})
    torch.manual_seed(7)
    plain.add_weighted_adapter(["a", "b"], [0.7, 0.3], "merged", combination_type="dare_linear",
                               density=0.5)
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                     str(book.path), adapter_name="ours").eval()
    assert_same_deltas(peft_delta(ours, "ours"), peft_delta(plain, "merged"), atol=1e-6)
    assert "seed" not in merging.merge(books, ["a", "b"], None, method="linear", name="lin0",
                                       plugins=pm).meta.hyperparameters
    assert merging.merge(books, ["a", "b"], None, method="dare_ties", density=0.5, name="d0",
                         plugins=pm).meta.hyperparameters["seed"] == 0  # the default, recorded
    for method, density in (("linear", None), ("ties", 0.5)):  # no random numbers: refused
        with pytest.raises(ConfigError, match=f"method {method} draws no random numbers, so "
                                              "--seed would do nothing; leave it out"):
            merging.merge(books, ["a", "b"], None, method=method, density=density, name="x",
                          plugins=pm, seed=5)
    for bad in (-1, True, 1.5):
        with pytest.raises(ConfigError, match="seed must be a non-negative integer"):
            merging.merge(books, ["a", "b"], None, method="dare_linear", density=0.5,
                          name="x", plugins=pm, seed=bad)
    assert merging._if_taken(lambda *, adapters, weights, rank=None: None, seed=1) == {}
    assert merging._if_taken(lambda **_: None, seed=1) == {"seed": 1}


def test_linear_and_cat_equal_the_hand_computed_delta(books, folders, pm):
    a, b = hand_factors(folders["a"]), hand_factors(folders["b"])
    w = {"a": 0.7, "b": 0.3}
    linear = merging.merge(books, ["a", "b"], [0.7, 0.3], method="linear", name="lin",
                           plugins=pm)
    # PEFT's linear merge combines the factors, not the deltas: A = Σ √(wᵢsᵢ)·Aᵢ,
    # B = Σ √(wᵢsᵢ)·Bᵢ (cross terms included), saved with scale 1
    want = {}
    for m in MODULES:
        ka, kb = (w["a"] * a[m][2]) ** 0.5, (w["b"] * b[m][2]) ** 0.5
        want[m] = (ka * a[m][1] + kb * b[m][1]) @ (ka * a[m][0] + kb * b[m][0])
    assert_same_deltas(hand_delta(linear.path), want, atol=1e-6)
    # cat is the exact weighted sum of the deltas, here across ranks 4 and 8 and a negative
    # weight
    cat = merging.merge(books, ["a", "c"], [1.0, -0.5], method="cat", name="cat", plugins=pm)
    da, dc = hand_delta(folders["a"]), hand_delta(folders["c"])
    assert_same_deltas(hand_delta(cat.path), {m: da[m] - 0.5 * dc[m] for m in MODULES},
                       atol=1e-6)


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
    (["a", "c"], [1.0, 1.0], {"method": "linear"}, ConfigError, "same rank"),
    (["a", "b"], [1.0, 1.0], {"method": "nope"}, adapterkit.PluginError,
     "unknown merge strategy 'nope'; known: .*exact_svd"),
    (["a"], [1.0], {}, ConfigError, "at least two"),
])
def test_bad_merges(books, pm, refs, weights, kw, error, match):
    kw = {"method": "exact_svd", **kw}
    with pytest.raises(error, match=match):
        merging.merge(books, refs, weights, name="bad", plugins=pm, **kw)
    assert not books.exists("bad")


def test_a_weight_the_factors_cannot_carry_is_refused_on_every_path(books, folders, tiny_base,
                                                                     pm, home, tmp_path):
    """``a*1e300``: a's scaled B times 1e300 is past float32's largest (checked by hand), so
    every path that would carry it refuses, saying so, instead of saving or applying
    infinities (every merge saved a pocket book of inf/NaN factors without a word; a session
    and plain PEFT generated from NaN logits). The largest weight that fits still works."""
    from adapterkit.runtime.peft_model import peft_model

    peak = max(s * b.abs().max().item() for _, b, s in hand_factors(folders["a"]).values())
    assert peak * 1e300 > torch.finfo(torch.float32).max
    limit = torch.finfo(torch.float32).max / peak
    overflow = r"weight 1e\+300 makes the largest LoRA factor of a@1 .* float32 holds"
    for kw in ({"method": "cat"}, {"method": "linear"}, {"method": "exact_svd"},
               {"method": "ties", "density": 0.5}):
        with pytest.raises(ConfigError, match=overflow):
            merging.merge(books, ["a", "b"], [1e300, 1.0], name="bad", plugins=pm, **kw)
    # linear scales A and B by √w each: finite factors whose product overflowed were saved
    with pytest.raises(ConfigError, match=r"weight 1e\+60 makes the largest LoRA factor of a@1"):
        merging.merge(books, ["a", "b"], [1e60, 1.0], name="bad", plugins=pm, method="linear")
    for flatten in (False, True):
        with pytest.raises(ConfigError, match=overflow):
            merging.stack(books, ["a", "b"], [1e300, 1.0], name="bad", flatten=flatten)
    assert not books.exists("bad")
    session = adapterkit.open(str(tiny_base), home=home)
    with pytest.raises(ConfigError, match=overflow):
        session.stack({"a": 1e300, "b": 1.0})
    base = adapterkit.load_base(str(tiny_base), home=home)
    with pytest.raises(ConfigError, match=overflow):
        peft_model(base, books.get("a"), library=books, weights=[(books.get("a"), 1e300)])
    fits = merging.stack(books, ["a", "b"], [limit * 0.99, 1.0], name="fits")
    assert fits.meta.hyperparameters["weights"]["a@1"] == limit * 0.99


def test_a_merge_refuses_a_result_that_is_not_finite_before_saving(books, pm, monkeypatch):
    """The last line of defence, for every strategy (a plugin's too): a result holding inf."""
    real = merging.concatenate

    def broken(inputs, weights, **kw):
        out = real(inputs, weights, **kw)
        first = next(iter(out.tensors))
        out.tensors[first] = out.tensors[first].clone().fill_(float("inf"))
        return out

    monkeypatch.setattr(merging, "concatenate", broken)
    with pytest.raises(ConfigError, match="factors are not finite numbers .* nothing was "
                                          "saved — give smaller weights"):
        merging.stack(books, ["a", "b"], [1.0, 1.0], name="bad", flatten=True)
    assert not books.exists("bad")


def test_a_saved_stack_weighs_a_book_only_peft_can_apply(library, tiny_base, tmp_path):
    """A DoRA member at weight 0.5 in a saved stack (PEFT applies and weighs it) was refused
    by the weight check's own reading of the factors in this change's first version."""
    dora = make_peft_adapter(tiny_base, tmp_path / "dora", target_modules=TARGETS,
                             use_dora=True)
    library.import_peft(dora, "dora", base=str(tiny_base))
    library.import_peft(make_peft_adapter(tiny_base, tmp_path / "p", target_modules=TARGETS),
                        "p", base=str(tiny_base))
    saved = merging.stack(library, ["dora", "p"], [0.5, 1.0], name="s")
    assert saved.meta.hyperparameters["weights"] == {"dora@1": 0.5, "p@1": 1.0}


def test_a_weighted_stack_member_with_an_unchanged_lm_head_copy_is_applied(
        books, folders, tiny_base, tmp_path):
    """PEFT saves ``lm_head.base_layer.weight`` beside an ``lm_head`` LoRA on an untied base:
    equal to the base's, it changes nothing at any weight, so the saved stack's PEFT path
    (``generate``/``eval``/``verify``/``export --merged``) applies ``head`` at 0.5, equal to the
    hand-computed ΔW; a changed copy is refused with advice that is not the refusing command."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from adapterkit import InexactAdapter
    from adapterkit.runtime.peft_model import peft_model

    head = make_peft_adapter(tiny_base, tmp_path / "head", seed=5,
                             target_modules=["q_proj", "lm_head"])
    assert "base_model.model.lm_head.base_layer.weight" in load_file(
        str(head / "adapter_model.safetensors"))
    books.import_peft(head, "head", base=str(tiny_base))
    stack = merging.stack(books, ["a", "head"], [1.0, 0.5], name="s")

    want_model = AutoModelForCausalLM.from_pretrained(tiny_base).double().eval()
    deltas = [(hand_delta(folders["a"]), 1.0), (hand_delta(head), 0.5)]
    with torch.no_grad():
        for delta, w in deltas:
            for module, dw in delta.items():
                want_model.get_submodule(module).weight += w * dw
        want = want_model(input_ids=IDS).logits.float()
    base = adapterkit.load_base(str(tiny_base), dtype=torch.float32)
    model = peft_model(base, stack, library=books)
    try:
        with torch.no_grad():
            got = model(input_ids=IDS).logits.float()
    finally:
        model.unload()
    assert (got - want).abs().max().item() < 1e-4

    changed = tmp_path / "changed"
    make_peft_adapter(tiny_base, changed, seed=5, target_modules=["q_proj", "lm_head"])
    state = load_file(str(changed / "adapter_model.safetensors"))
    state["base_model.model.lm_head.base_layer.weight"] += 0.25
    save_file(state, str(changed / "adapter_model.safetensors"), metadata={"format": "pt"})
    books.import_peft(changed, "changed", base=str(tiny_base))
    bad = merging.stack(books, ["a", "changed"], [1.0, 0.5], name="s2")
    with pytest.raises(InexactAdapter, match="differs from this base") as err:
        peft_model(base, bad, library=books)
    assert "give it weight 1" in str(err.value).lower() and "which can" not in str(err.value)


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


def test_export_merged_refuses_divergence_and_busy_folders(books, tmp_path, pm, monkeypatch):
    from safetensors.torch import load_file, save_file

    from adapterkit import NameTaken
    from adapterkit.runtime import export
    from adapterkit.runtime.export import MergeCheckFailed, export_merged

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("mine")
    with pytest.raises(NameTaken, match="not empty"):
        export_merged(books, "a", tmp_path / "busy", plugins=pm)

    # a real divergence: the merged weights come out with one matrix damaged after writing
    write_shards = export._write_shards
    damaged = []

    def write_then_damage(folder, out, *args, **kwargs):
        shards = write_shards(folder, out, *args, **kwargs)
        path = out / "model.safetensors"
        state = load_file(str(path))
        key = "model.layers.0.self_attn.q_proj.weight"
        state[key] = state[key] + 0.5
        save_file(state, str(path), metadata={"format": "pt"})
        damaged.append(key)
        return shards

    monkeypatch.setattr(export, "_write_shards", write_then_damage)
    with pytest.raises(MergeCheckFailed, match="nothing was written") as err:
        export_merged(books, "a", tmp_path / "strict", plugins=pm)  # default tolerance
    assert damaged  # the check ran on the damaged folder
    figure = float(re.search(r"differ from .* by ([0-9.e+-]+)", str(err.value)).group(1))
    assert figure > 1e-2, str(err.value)
    assert not (tmp_path / "strict").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".strict")] == []
    # the same export without the damage passes the same check
    monkeypatch.setattr(export, "_write_shards", write_shards)
    assert export_merged(books, "a", tmp_path / "strict", plugins=pm).max_logit_diff < 1e-4


def test_a_peft_merge_never_looks_the_base_up_on_the_hub(library, tiny_base, tmp_path,
                                                         monkeypatch):
    """PEFT's ``save_embedding_layers="auto"`` checked the Hub for a member's
    ``base_model_name_or_path`` (an adapter made elsewhere names a Hub id): a network call on
    every merge through PEFT, and a hang behind a firewall."""
    import peft.utils.save_and_load as peft_save

    def no_hub(*args, **kwargs):
        raise AssertionError(f"looked up the Hub: {args}")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_hub)
    for name, seed in (("a", 1), ("b", 2)):
        folder = make_peft_adapter(tiny_base, tmp_path / name, seed=seed)
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "someone/their-base"  # as made on another machine
        (folder / "adapter_config.json").write_text(json.dumps(config))
        library.import_peft(folder, name, base=str(tiny_base))
    book = merging.merge(library, ["a", "b"], [1.0, 1.0], method="linear", name="ab")
    assert book.ref == "ab@1"


def test_cards_of_merges_and_stacks_say_what_made_them(books, pm):
    """Their cards said "trainer: none (imported)", though nothing was imported."""
    merged = merging.merge(books, ["a", "b"], [0.5, 0.5], method="exact_svd", name="m",
                           plugins=pm)
    stacked = merging.stack(books, ["a", "b"], [1.0, 0.5], name="s")
    flat = merging.stack(books, ["a", "b"], [1.0, 0.5], name="f", flatten=True)
    cards = {b.name: (b.path / "README.md").read_text() for b in (merged, stacked, flat)}
    assert "- trainer: none (merge `exact_svd` of `a@1`, `b@1`)" in cards["m"]
    assert "- trainer: none (stack of `a@1`, `b@1`)" in cards["s"]
    assert "- trainer: none (flattened stack of `a@1`, `b@1`)" in cards["f"]
    assert not any("imported" in card for card in cards.values())


@pytest.mark.parametrize("method", ["svd", "exact_svd"])
def test_a_rank_no_layer_can_hold_is_refused_as_the_users_input(books, pm, method):
    """--rank 100 on layers whose ΔW has at most 32 directions (v_proj: 32 × 64): svd blamed
    its own plugin ("Fix the strategy"), exact_svd silently zero-padded to r=100."""
    with pytest.raises(ConfigError) as err:
        merging.merge(books, ["a", "b"], [0.5, 0.5], method=method, name="big", plugins=pm,
                      rank=100)
    assert "give --rank at most 32" in str(err.value) and "v_proj" in str(err.value)
    assert "strategy" not in str(err.value)
    assert not books.exists("big")
    book = merging.merge(books, ["a", "b"], [0.5, 0.5], method=method, name="ok", plugins=pm,
                         rank=32)
    assert book.meta.hyperparameters["rank"] == 32


def _replaced(library, tiny_base, tmp_path, ref):
    """``rm --force REF``, then another pocket book imported under that name (as a user
    re-importing, or pulling someone else's, does)."""
    library.remove(ref, force=True)
    other = make_peft_adapter(tiny_base, tmp_path / "other", seed=9, r=4, target_modules=TARGETS)
    return library.import_peft(other, ref, base=str(tiny_base))


def _refused_everywhere(library, tiny_base, tmp_path, adapterkit_cli, match, cli_match):
    """Every path that expands saved stack ``ac`` refuses it, naming ``match``."""
    import types

    from adapterkit import InvalidAdapter
    from adapterkit.runtime.export import export_merged
    from adapterkit.runtime.peft_model import members_of, peft_model
    from adapterkit.runtime.verify import verify
    from adapterkit.serving.names import resolve

    ac = library.get("ac")
    with pytest.raises(InvalidAdapter, match=match):
        members_of(library, ac)  # eval, generate, gguf
    with pytest.raises(InvalidAdapter, match=match):
        verify(library, "ac", record=False)  # never "exact" for another member
    with pytest.raises(InvalidAdapter, match=match):
        export_merged(library, "ac", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    base = adapterkit.load_base(str(tiny_base), home=library.home)
    with pytest.raises(InvalidAdapter, match=match):
        peft_model(base, ac, library=library)
    with pytest.raises(ConfigError, match=match):  # the server (and the vLLM resolver)
        resolve(library, types.SimpleNamespace(fingerprint=ac.meta.base_fingerprint), "ac",
                base_id="base")
    session = adapterkit.open(str(tiny_base), home=library.home)
    with pytest.raises(InvalidAdapter, match=match):
        session.swap("ac")  # sessions
    assert session.books == {} and session.active == {}
    for args in (("verify", "ac"), ("generate", "Hi", "--adapter", "ac")):
        result = adapterkit_cli(*args)
        assert result.exit_code == 1, (args, result.output)
        assert re.search(cli_match, result.output), (args, result.output)
        assert "Traceback" not in result.output and "exact" not in result.output


def test_a_saved_stack_refuses_a_member_replaced_under_its_name(books, tiny_base, tmp_path,
                                                                adapterkit_cli):
    """A stack recorded its members' names only: after `rm --force a@1` and another pocket
    book imported as a@1, model `ac` answered with the new weights and `verify ac` said
    "exact". It records each member's weights hash now, as `train --on` does, and every path
    that expands it refuses the namesake with both hashes."""
    from adapterkit.library.integrity import held_weights

    saved = {r: held_weights(books.get(r)) for r in ("a@1", "c@1")}
    ac = merging.stack(books, ["a", "c"], [1.0, 0.5], name="ac")
    assert ac.meta.stacked_on_sha256 == saved
    new = _replaced(books, tiny_base, tmp_path, "a@1")
    assert new.ref == "a@1" and held_weights(new) != saved["a@1"]
    match = (rf"^ac@1 is a stack of a@1 with weights {saved['a@1'][:12]}, and this library's "
             rf"a@1 holds other weights \({held_weights(new)[:12]}\): another pocket book under "
             r"that name\. Pull or import the one it was saved with as a@1 to use ac@1, or save "
             r"the stack again with what a@1 is now \(`adapterkit stack a@1 c@1 --weights "
             r"1,0\.5 --name NAME`\)$")
    _refused_everywhere(books, tiny_base, tmp_path, adapterkit_cli, match,
                        r"ac@1 is a stack of a@1 with weights")


def test_a_saved_stack_of_a_removed_member_is_refused_by_name(books, tiny_base, tmp_path,
                                                              adapterkit_cli):
    """`rm --force` of a member: its dependants "stop working" (rm's help), with a refusal
    naming the stack and the member, not a bare "no pocket book named 'a'"."""
    merging.stack(books, ["a", "c"], [1.0, 0.5], name="ac")
    books.remove("a@1", force=True)
    match = (r"^ac@1 is a stack of a@1, which this library no longer holds \(removed with "
             r"`rm --force`\?\): import or pull it again as a@1 to use ac@1$")
    _refused_everywhere(books, tiny_base, tmp_path, adapterkit_cli, match,
                        r"ac@1 is a stack of a@1, which this library no longer holds")


def test_a_stack_saved_before_member_hashes_keeps_working_as_before(books, tiny_base, tmp_path):
    """A stack saved by an earlier version recorded no hashes: it expands as saved, without
    a refusal or a warning (its members cannot be compared with anything)."""
    import warnings

    from adapterkit.runtime.peft_model import members_of

    merging.stack(books, ["a", "c"], [1.0, 0.5], name="ac")
    books.update_meta("ac@1", lambda meta: meta.stacked_on_sha256.clear())
    new = _replaced(books, tiny_base, tmp_path, "a@1")
    session = adapterkit.open(str(tiny_base), home=books.home)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        members = members_of(books, books.get("ac"))
        session.swap("ac")
    assert [(m.ref, w) for m, w in members] == [("a@1", 1.0), ("c@1", 0.5)]
    assert members[0][0].path == new.path and session.active == {"a@1": 1.0, "c@1": 0.5}
