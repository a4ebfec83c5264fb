"""The PEFT parity matrix: every PEFT LoRA variant × every adapterkit path.

Each cell is either exact — logits equal plain PEFT's (``PeftModel.from_pretrained`` on the
same folder: the independent reference) within float tolerance — or refused with an error that
names the feature in the way. No cell may silently differ. Adding a variant is one line in
``VARIANTS``; adding a path is one function in ``PATHS``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adapterkit import AdapterkitError

pytestmark = pytest.mark.slow

TOL = 1e-4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: name → (PEFT LoraConfig arguments, what the paths must do). The second item is None when
#: every path must be exact; a feature name the factor paths (session, flatten, merges, export)
#: must name when they refuse; or ``{path: expectation}`` per path ("exact", a feature name, or
#: "n/a" where a path does not concern the variant). ``"import:<text>"``: import itself refuses.
#: Arguments starting with ``_`` are ours: ``_base`` picks the base (see ``BASES``).
VARIANTS: dict[str, tuple[dict[str, Any], Any]] = {
    "plain": ({"target_modules": ALL}, None),
    "q_v_only": ({}, None),
    "rslora": ({"target_modules": ALL, "use_rslora": True}, None),
    "alpha_pattern_overlap": ({"alpha_pattern": {"q_proj": 4,
                                                 "model.layers.0.self_attn.q_proj": 64}}, None),
    "alpha_pattern_overlap_reversed": ({"alpha_pattern": {"model.layers.0.self_attn.q_proj": 64,
                                                          "q_proj": 4}}, None),
    "rank_pattern": ({"target_modules": ALL, "rank_pattern": {"q_proj": 8, "down_proj": 2},
                      "alpha_pattern": {"v_proj": 3}}, None),
    "layers_to_transform": ({"layers_to_transform": [0]}, None),
    "regex_targets": ({"target_modules": r".*\.(q_proj|o_proj)"}, None),
    "gaussian_init": ({"init_lora_weights": "gaussian"}, None),
    "lm_head": ({"target_modules": ["q_proj", "lm_head"]}, None),
    "missing_target_name": ({"target_modules": ["q_proj", "not_a_layer"]}, None),
    "bias_all_no_biases": ({"bias": "all"}, None),  # nothing to save: exactly plain LoRA
    # saved biases equal to the base's change nothing (every path checks them against the base,
    # resident or as stored); PEFT's own merges load only one adapter with biases at a time
    "bias_all": ({"_base": "llama_bias", "bias": "all"}, {
        **dict.fromkeys(["session", "session_stack", "underlay", "flatten", "merge_exact_svd",
                         "export_merged"], "exact"),
        "merge_cat": "only one", "merge_svd": "only one"}),
    "bias_lora_only": ({"_base": "llama_bias", "bias": "lora_only"}, {
        **dict.fromkeys(["session", "session_stack", "underlay", "flatten", "merge_exact_svd",
                         "export_merged"], "exact"),
        "merge_cat": "only one", "merge_svd": "only one"}),
    "dora": ({"use_dora": True}, "DoRA"),
    "embedding": ({"target_modules": ["q_proj", "embed_tokens"]}, "embedding LoRA"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    "lora_bias": ({"lora_bias": True}, "lora_bias"),
    "trainable_tokens": ({"trainable_token_indices": [1, 2, 3]}, "trainable tokens"),
    # GPT-2's Conv1D: the factors are the same, only merging into the weight transposes; the
    # saved adapters (flatten, merges) keep fan_in_fan_out and PEFT applies them exactly.
    "gpt2_conv1d": ({"_base": "gpt2", "target_modules": ["c_attn", "c_proj"],
                     "fan_in_fan_out": True},
                    {"session": "fan_in_fan_out", "session_stack": "fan_in_fan_out",
                     "underlay": "fan_in_fan_out",
                     "export_merged": "fan_in_fan_out", "flatten": "exact", "merge_cat": "exact",
                     "merge_svd": "exact", "merge_exact_svd": "exact"}),
    # A 4-bit NF4 base: the session against PEFT on the same 4-bit base; the saved paths do not
    # depend on the base's precision (they are the plain rows above).
    "nf4_base": ({"_base": "llama_4bit", "target_modules": ALL},
                 {"session": "exact", "session_stack": "exact", "underlay": "exact",
                  "flatten": "n/a",
                  "merge_cat": "n/a", "merge_svd": "n/a", "merge_exact_svd": "n/a",
                  "export_merged": "n/a"}),
    # activated LoRA: the delta acts only after the invocation tokens — not W x + s·B A x
    "alora": ({"alora_invocation_tokens": [5, 9]}, "alora_invocation_tokens"),
    # PEFT saves lm_head's weight beside its LoRA; changed, PEFT loads it over the base's
    "lm_head_changed_copy": ({"target_modules": ["q_proj", "lm_head"], "_perturb": "lm_head"},
                             "differs from this base"),
    "bias_trained": ({"_base": "llama_bias", "bias": "all", "_perturb": "bias"},
                     "differs from this base"),
    # a base whose lm_head shares the input embeddings' weight (as SmolLM2's does)
    "lm_head_tied": ({"_base": "llama_tied", "target_modules": ["q_proj", "lm_head"]}, {
        "session": "exact", "session_stack": "exact", "underlay": "exact",
        "flatten": "no separate lm_head.weight", "merge_cat": "no separate lm_head.weight",
        "merge_svd": "no separate lm_head.weight",
        "merge_exact_svd": "no separate lm_head.weight", "export_merged": "no separate"}),
    "pissa_unconverted": ({"init_lora_weights": "pissa"}, "import:path_initial_model"),
    "olora_unconverted": ({"init_lora_weights": "olora"}, "import:path_initial_model"),
}


def _expect(variant: str, path: str) -> str:
    expect = VARIANTS[variant][1]
    if isinstance(expect, dict):
        return expect[path]
    return "exact" if expect is None else expect


IDS = [[1, 5, 9, 17, 33, 65, 100, 3], [2, 40, 41, 42, 7, 8, 200, 11]]


def _logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.float()


def _plain_base(base: Path, *, nf4: bool = False) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32) if nf4 else None
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                quantization_config=quant).eval()


def _peft(base: Path, folder: Path, *, nf4: bool = False) -> Any:
    """Plain PEFT on plain transformers: the reference no adapterkit code touches."""
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(_plain_base(base, nf4=nf4), str(folder)).eval())


def _gpt2_base(folder: Path) -> Path:
    """A tiny random GPT-2 (Conv1D layers) with the tiny tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from adapterkit.plugin_api.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=2, initializer_range=0.2)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base):
    """The bases, a library, one imported pocket book per variant, PEFT's logits for each."""
    from adapterkit import Library
    from adapterkit.plugin_api.testing import make_peft_adapter, make_tiny_base

    root = tmp_path_factory.mktemp("parity")
    bases = {"llama": tiny_base, "llama_4bit": tiny_base, "gpt2": _gpt2_base(root / "gpt2"),
             "llama_bias": make_tiny_base(root / "llama-bias", attention_bias=True,
                                          mlp_bias=True),
             "llama_tied": make_tiny_base(root / "llama-tied", tie_word_embeddings=True)}
    library = Library(root / "home")
    books: dict[str, str | Exception] = {}
    reference: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for name, (kwargs, _) in VARIANTS.items():
        kind = kwargs.get("_base", "llama")
        base = bases[kind]
        folder = make_peft_adapter(base, root / name,
                                   **{k: v for k, v in kwargs.items() if k[0] != "_"})
        if "_perturb" in kwargs:
            _perturb(folder, kwargs["_perturb"])
        nf4 = kind == "llama_4bit"
        reference[name] = _peft(base, folder, nf4=nf4)
        plain[name] = _logits(_plain_base(base, nf4=nf4))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                books[name] = library.import_peft(folder, name, base=str(base)).ref
        except AdapterkitError as exc:
            books[name] = exc
    return {"bases": bases, "library": library, "books": books, "ref": reference,
            "root": root, "plain": plain}


def _perturb(folder: Path, what: str) -> None:
    """Change the base tensors PEFT saved with the adapter (as training them would)."""
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    state = load_file(str(path))
    hits = [k for k in state if ("base_layer" in k or k.endswith(".bias")) and what in k
            and "lora_" not in k]
    assert hits, f"nothing to perturb for {what}"
    for key in hits:
        state[key] = state[key] + 0.25
    save_file(state, str(path), metadata={"format": "pt"})


def _base_of(world: dict, ref: str) -> tuple[Path, str | None]:
    variant = ref.split("@")[0]
    kind = VARIANTS[variant][0].get("_base", "llama")
    return world["bases"][kind], ("4bit" if kind == "llama_4bit" else None)


# -- the paths ---------------------------------------------------------------------------------

def path_session(world: dict, ref: str) -> Any:
    from adapterkit import open_session

    base, quant = _base_of(world, ref)
    # (an adapter made on the 4-bit base, not by a qlora run: answered on it by request)
    session = open_session(str(base), quantization=quant, home=world["library"].home,
                           any_quantization=quant is not None)
    session.swap(ref)
    return _logits(session.model)


def path_session_stack(world: dict, ref: str) -> Any:
    from adapterkit import open_session

    base, quant = _base_of(world, ref)
    # (an adapter made on the 4-bit base, not by a qlora run: answered on it by request)
    session = open_session(str(base), quantization=quant, home=world["library"].home,
                           any_quantization=quant is not None)
    session.stack({ref: 1.0})
    return _logits(session.model)


def path_underlay(world: dict, ref: str) -> Any:
    """Frozen underneath a training run (``train --on``): folded in as forward hooks."""
    from adapterkit import load_base
    from adapterkit.lora.underlay import apply

    base, quant = _base_of(world, ref)
    loaded = load_base(str(base), quantization=quant, home=world["library"].home)
    apply(loaded.model, [world["library"].get(ref)])
    return _logits(loaded.model)


def _saved(world: dict, ref: str, make: Callable[[str], Any]) -> Any:
    world["saved"] = world.get("saved", 0) + 1
    book = make(f"out-{world['saved']}")
    return _peft(_base_of(world, ref)[0], book.path)


def path_flatten(world: dict, ref: str) -> Any:
    from adapterkit.lora.combine import stack

    return _saved(world, ref, lambda n: stack(world["library"], [ref], [1.0], name=n, flatten=True))


def _merge(method: str) -> Callable[[dict, str], Any]:
    def run(world: dict, ref: str) -> Any:
        from adapterkit.lora.combine import merge

        # the same pocket book twice at 0.5 + 0.5: exactly itself for every exact method
        return _saved(world, ref, lambda n: merge(world["library"], [ref, ref], [0.5, 0.5],
                                             method=method, name=n))
    return run


def path_export_merged(world: dict, ref: str) -> Any:
    from adapterkit.runtime.export import export_merged

    dest = world["root"] / f"merged-{ref.replace('@', '-')}"
    export_merged(world["library"], ref, dest)
    return _logits(_plain_base(dest))


PATHS = {
    "session": path_session,
    "session_stack": path_session_stack,
    "underlay": path_underlay,
    "flatten": path_flatten,
    "merge_cat": _merge("cat"),
    "merge_svd": _merge("svd"),
    "merge_exact_svd": _merge("exact_svd"),
    "export_merged": path_export_merged,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_accepts_or_refuses_truthfully(world, variant):
    expect = VARIANTS[variant][1]
    book = world["books"][variant]
    if isinstance(expect, str) and expect.startswith("import:"):
        assert isinstance(book, AdapterkitError), f"{variant} was imported"
        assert expect.split(":", 1)[1] in str(book)
    else:
        assert not isinstance(book, Exception), f"{variant} refused: {book}"
    # every variant really changes PEFT's answers: a cell can never pass by being a no-op
    assert float((world["ref"][variant] - world["plain"][variant]).abs().max()) > 1e-2


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity(world, variant, path):
    book = world["books"][variant]
    if isinstance(book, Exception):
        pytest.skip("refused at import (checked in test_import_accepts_or_refuses_truthfully)")
    expect = _expect(variant, path)
    if expect == "n/a":
        pytest.skip(f"{path} does not depend on what {variant} varies")
    if expect == "exact":
        got = PATHS[path](world, book)
        diff = float((got - world["ref"][variant]).abs().max())
        assert diff < TOL, f"{variant} × {path}: max |logit diff| vs PEFT {diff:.3g}"
    else:
        with pytest.raises(AdapterkitError) as info:
            PATHS[path](world, book)
        assert expect in str(info.value), str(info.value)


def test_untrained_adapter_warns_on_import(tmp_path, tiny_base, library):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "zero")
    with pytest.warns(UserWarning, match="untrained"):
        library.import_peft(tmp_path / "zero", "zero", base=str(tiny_base))


def test_import_with_another_base_than_the_config_names_says_so(tmp_path, tiny_base, library,
                                                                peft_adapter):
    folder = tmp_path / "copy"
    folder.mkdir()
    for item in peft_adapter.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/another-model"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="another-model"):
        library.import_peft(folder, "x", base=str(tiny_base))


def test_merge_linear_with_rank_pattern_is_refused_not_a_traceback(world):
    from adapterkit.lora.combine import merge

    with pytest.raises(AdapterkitError, match="same rank"):
        merge(world["library"], [world["books"]["rank_pattern"], world["books"]["plain"]],
              [0.5, 0.5], method="linear", name="lin")


def _peft_weighted(base: Path, folders: list[Path], weights: list[float]) -> Any:
    """Plain PEFT with several adapters active at once, each PEFT scale times its weight: the
    hand-built reference for a weighted combination."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = [f"a{i}" for i in range(len(folders))]
    model = PeftModel.from_pretrained(_plain_base(base), str(folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        model.load_adapter(str(folder), adapter_name=name)
    model.base_model.set_adapter(names)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, w in zip(names, weights):
                if name in module.scaling:
                    module.scaling[name] *= w
    return _logits(model.eval())


@pytest.mark.parametrize("method", ["cat", "svd", "exact_svd"])
@pytest.mark.parametrize("members", [("layers_to_transform", "plain"),
                                     ("rslora", "alpha_pattern_overlap"),
                                     ("rank_pattern", "q_v_only")])
def test_merging_different_adapters_is_their_weighted_sum(world, members, method):
    """The first member's config (use_rslora, layers_to_transform, patterns) must not leak
    into the result: cat is exact, svd/exact_svd at a rank that holds the sum are too."""
    from adapterkit.lora.combine import merge

    weights = [0.7, -0.4]
    refs = [world["books"][m] for m in members]
    world["saved"] = world.get("saved", 0) + 1
    book = merge(world["library"], refs, weights, method=method, name=f"mix-{world['saved']}",
                 rank=None if method == "cat" else 24)
    got = _peft(world["bases"]["llama"], book.path)
    want = _peft_weighted(world["bases"]["llama"],
                          [world["root"] / m for m in members], weights)
    diff = float((got - want).abs().max())
    assert diff < TOL, f"{members} {method}: max |logit diff| {diff:.3g}"
