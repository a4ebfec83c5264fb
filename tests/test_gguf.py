"""``export --format gguf``: pocket books for llama.cpp and Ollama, checked by llama.cpp itself.

The fast tests read the written files back with the ``gguf`` package's own reader and compare
them with references that do not go through adapterkit's factor code: plain PEFT's
``get_delta_weight`` for every layer (with ``rank_pattern``/``alpha_pattern``/rsLoRA and stack
weights), tensor names written out by hand, and transformers' GGUF loader's own inverse of
llama.cpp's q/k permutation. The slow ones run llama.cpp itself (``llama-cpp-python``, built
by scripts/bootstrap.sh): tiny random Llama, Qwen2 and Qwen3 bases converted to F32 GGUFs by
llama.cpp's own converter, with our LoRA GGUF, against plain PEFT's logits; and the embedded
base's original Q4_1 GGUF with the exported LoRA GGUF, or the merged GGUF alone, against
``adapterkit generate``'s greedy tokens (the base plus plain PEFT) on the same prompt tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterkit.plugin_api.testing import make_peft_adapter

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: llama.cpp's names for the Llama layers (its llama-arch.cpp), written out by hand.
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
              "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
              "down_proj": "ffn_down"}


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: numpy array in torch's row-major shape}) of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    return meta, tensors


def one_file(folder: Path, suffix: str = ".gguf") -> Path:
    files = [p for p in folder.iterdir() if p.name.endswith(suffix)]
    assert len(files) == 1, files
    return files[0]


def gguf_deltas(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """module path → ΔW as llama.cpp computes it from the file (``alpha / rank · B A``, rank
    from the tensor's shape), with the q/k rows put back in transformers' order by
    transformers' own GGUF loader code."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    meta, tensors = read_gguf(path)
    alpha = float(meta["adapter.lora.alpha"])
    unpermute = LlamaTensorProcessor(config=config)._reverse_permute_weights
    back = {v: k for k, v in GGUF_NAMES.items()}
    out = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        b = tensors[name.replace(".lora_a", ".lora_b")]
        delta = (alpha / b.shape[1]) * (b.double() @ a.double())
        _, block, kind, _, _ = name.split(".")
        if kind == "attn_q":
            delta = torch.from_numpy(unpermute(delta.numpy(), config["num_attention_heads"],
                                               config["num_attention_heads"]))
        elif kind == "attn_k":
            delta = torch.from_numpy(unpermute(delta.numpy(), config["num_attention_heads"],
                                               config["num_key_value_heads"]))
        part = back[kind]
        where = "self_attn" if part.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        out[f"model.layers.{block}.{where}.{part}"] = delta
    return out


def peft_deltas(base: Path, folders: dict[str, Path], weights: dict[str, float]
                ) -> dict[str, torch.Tensor]:
    """module path → Σ wᵢ ΔWᵢ from plain PEFT's own ``get_delta_weight``."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    out: dict[str, torch.Tensor] = {}
    for name, folder in folders.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                          str(folder))
        for path, module in model.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                d = module.get_delta_weight("default").double() * weights[name]
                out[path] = out[path] + d if path in out else d
    return out


def assert_same_deltas(ours: dict, reference: dict) -> None:
    assert set(ours) == set(reference) and reference
    for module, delta in reference.items():
        torch.testing.assert_close(ours[module], delta, rtol=1e-5, atol=1e-6, msg=module)


@pytest.fixture
def cli(adapterkit_cli):
    return adapterkit_cli


# -- the file, read back -----------------------------------------------------------------------

def test_lora_gguf_has_llama_cpp_metadata_names_and_peft_tensors(tiny_base, cli, tmp_path):
    folder = make_peft_adapter(tiny_base, tmp_path / "pe", target_modules=TARGETS, r=4,
                               lora_alpha=8)
    assert cli("import", folder, "--name", "pe", "--base", tiny_base).exit_code == 0
    result = cli("export", "pe", tmp_path / "out", "--format", "gguf")
    assert result.exit_code == 0, result.output
    path = one_file(tmp_path / "out")
    assert path.name == "pe-v1-lora.gguf"
    meta, tensors = read_gguf(path)
    assert meta["general.architecture"] == "llama"
    assert meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(8.0)
    expected = {f"blk.{i}.{GGUF_NAMES[t]}.weight.lora_{ab}" for i in range(2) for t in TARGETS
                for ab in "ab"}
    assert set(tensors) == expected
    # a plain pocket book (scale alpha / r) is written as PEFT saved it: A as is, B as is but
    # for llama.cpp's q/k row order
    from safetensors.torch import load_file

    saved = load_file(str(folder / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0"
    a_v, b_v = (saved[f"{prefix}.self_attn.v_proj.lora_{x}.weight"] for x in "AB")
    assert torch.equal(tensors["blk.0.attn_v.weight.lora_a"], a_v)  # r x in
    assert torch.equal(tensors["blk.0.attn_v.weight.lora_b"], b_v)  # out x r
    b_q = saved[f"{prefix}.self_attn.q_proj.lora_B.weight"]
    assert not torch.equal(tensors["blk.0.attn_q.weight.lora_b"], b_q)  # permuted rows
    assert sorted(tensors["blk.0.attn_q.weight.lora_b"].flatten().tolist()) == \
        sorted(b_q.flatten().tolist())
    config = json.loads((tiny_base / "config.json").read_text())
    assert_same_deltas(gguf_deltas(path, config), peft_deltas(tiny_base, {"pe": folder},
                                                              {"pe": 1.0}))
    # the Ollama lines: this base is no GGUF file, so FROM says what to put there and no
    # Modelfile is written with a placeholder in it
    assert "ADAPTER ./pe-v1-lora.gguf" in result.output
    assert "FROM <the base as a GGUF file" in result.output
    assert not (tmp_path / "out" / "Modelfile").exists()


def test_per_layer_scales_and_stacks_are_exact_in_llama_cpp_terms(tiny_base, library,
                                                                  tmp_path):
    """llama.cpp has one alpha per file; rank_pattern, alpha_pattern, rsLoRA and a stack's
    weights must still give PEFT's ΔW for every layer."""
    from adapterkit.lora.combine import stack
    from adapterkit.runtime.gguf import export_gguf_lora

    a = make_peft_adapter(tiny_base, tmp_path / "a", seed=3, target_modules=TARGETS, r=4,
                          lora_alpha=8, rank_pattern={"q_proj": 2, "down_proj": 6},
                          alpha_pattern={"v_proj": 3, "k_proj": 20})
    b = make_peft_adapter(tiny_base, tmp_path / "b", seed=4, target_modules=("q_proj", "o_proj"),
                          r=8, lora_alpha=4, use_rslora=True)
    library.import_peft(a, "a", base=str(tiny_base))
    library.import_peft(b, "b", base=str(tiny_base))
    config = json.loads((tiny_base / "config.json").read_text())

    report = export_gguf_lora(library, "a", tmp_path / "ga")
    assert_same_deltas(gguf_deltas(report.path, config),
                       peft_deltas(tiny_base, {"a": a}, {"a": 1.0}))
    report = export_gguf_lora(library, "b", tmp_path / "gb")
    assert_same_deltas(gguf_deltas(report.path, config),
                       peft_deltas(tiny_base, {"b": b}, {"b": 1.0}))

    stack(library, ["a", "b"], [0.7, -0.3], name="ab")
    report = export_gguf_lora(library, "ab", tmp_path / "gab")
    assert report.path.name == "ab-v1-lora.gguf"
    assert_same_deltas(gguf_deltas(report.path, config),
                       peft_deltas(tiny_base, {"a": a, "b": b}, {"a": 0.7, "b": -0.3}))


# -- bad input: one line, exit != 0, nothing written -------------------------------------------

def assert_refused(result, *words: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def imported(tiny_base, cli, tmp_path):
    folder = make_peft_adapter(tiny_base, tmp_path / "pe", target_modules=("q_proj", "v_proj"))
    assert cli("import", folder, "--name", "pe", "--base", tiny_base).exit_code == 0
    return "pe"


def test_non_empty_destination_is_refused_and_left_alone(imported, cli, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    for extra in ([], ["--merged"]):
        assert_refused(cli("export", imported, busy, "--format", "gguf", *extra), "not empty")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert (busy / "keep.txt").read_text() == "mine"


def test_quantize_options_are_checked_before_any_work(imported, cli, tmp_path):
    assert_refused(cli("export", imported, tmp_path / "a", "--quantize", "q4_0"),
                   "--merged --format gguf")
    assert_refused(cli("export", imported, tmp_path / "b", "--format", "gguf", "--quantize",
                       "q8_0"), "--merged --format gguf")
    assert_refused(cli("export", imported, tmp_path / "c", "--merged", "--format", "gguf",
                       "--quantize", "q3_xyz"), "q3_xyz", "q4_k_m")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_merged_gguf_without_llama_cpp_converter_says_where_to_get_it(imported, cli,
                                                                      tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_LLAMA_CPP", str(tmp_path / "no-llama.cpp"))
    assert_refused(cli("export", imported, tmp_path / "out", "--merged", "--format", "gguf"),
                   "convert_hf_to_gguf.py", "ADAPTERKIT_LLAMA_CPP")
    assert not (tmp_path / "out").exists()


def test_reward_head_has_no_gguf_name(tiny_base, cli, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    peft = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4,
                                            target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(str(tmp_path / "rw"))
    with pytest.warns(Warning):  # untrained: every lora_B is zero
        assert cli("import", tmp_path / "rw", "--name", "rw", "--base", tiny_base).exit_code == 0
    for extra in ([], ["--merged"]):
        assert_refused(cli("export", "rw", tmp_path / "out", "--format", "gguf", *extra),
                       "no GGUF tensor name", "score")
    assert not (tmp_path / "out").exists()


def test_architecture_llama_cpp_cannot_map_is_named(cli, tmp_path):
    """OPT has no llama.cpp support at all: refused by name, nothing written."""
    from transformers import AutoModelForCausalLM, OPTConfig

    from adapterkit.plugin_api.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    config = OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64,
                       word_embed_proj_dim=32, pad_token_id=0, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    base = tmp_path / "opt"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tok.save_pretrained(base)
    folder = make_peft_adapter(base, tmp_path / "opt-pe", target_modules=("q_proj", "v_proj"))
    assert cli("import", folder, "--name", "opt", "--base", base).exit_code == 0
    for extra in ([], ["--merged"]):
        assert_refused(cli("export", "opt", tmp_path / "out", "--format", "gguf", *extra),
                       "OPTForCausalLM")
    assert not (tmp_path / "out").exists()


def test_lm_head_lora_on_a_tied_base_is_refused(cli, tmp_path):
    from adapterkit.plugin_api.testing import make_tiny_base

    base = make_tiny_base(tmp_path / "tied", tie_word_embeddings=True)
    folder = make_peft_adapter(base, tmp_path / "head", target_modules=("q_proj", "lm_head"))
    assert cli("import", folder, "--name", "head", "--base", base).exit_code == 0
    assert_refused(cli("export", "head", tmp_path / "out", "--format", "gguf"),
                   "lm_head", "ties")
    assert not (tmp_path / "out").exists()


# -- llama.cpp itself, on tiny random bases of each mapped architecture --------------------------

@pytest.fixture(scope="module")
def real_tokenizer(embedded_gguf):
    """SmolLM2's tokenizer (read from the embedded GGUF): one llama.cpp's converter knows, so
    it converts tiny random bases built around it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_gguf.parent),
                                         gguf_file=embedded_gguf.name)


def tiny_real_base(folder: Path, arch: str, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    kind = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    config = kind(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_llama_cpp_logits_with_the_lora_gguf_equal_peft(arch, real_tokenizer, library,
                                                         tmp_path):
    """A tiny random base converted by llama.cpp's own converter to an F32 GGUF, our LoRA GGUF
    on it in llama.cpp: the logits are plain PEFT's (float32 on both sides, so to rounding) —
    tensor names, q/k permutation (Llama, with grouped-query attention), Qwen2's attention
    biases left alone, and per-layer scales included."""
    import shutil
    import subprocess
    import sys

    from gguf import GGUFReader
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    llama_cpp = pytest.importorskip("llama_cpp")
    from adapterkit.runtime.gguf import export_gguf_lora, find_converter

    base = tiny_real_base(tmp_path / arch, arch, real_tokenizer)
    source = base
    if arch == "qwen2":  # transformers gives a qwen2 folder Qwen2's own tokenizer class, whose
        # pre-tokenizer hides SmolLM2's from llama.cpp's converter: it reads a copy saying
        # "llama" where only the tokenizer class is picked (the architecture stays Qwen2's)
        source = Path(shutil.copytree(base, tmp_path / "for-converter"))
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    base_gguf = tmp_path / f"{arch}.gguf"
    subprocess.run([sys.executable, str(find_converter() / "convert_hf_to_gguf.py"),
                    str(source), "--outfile", str(base_gguf), "--outtype", "f32"], check=True,
                   capture_output=True)
    assert GGUFReader(base_gguf).fields["general.architecture"].contents() == arch
    folder = make_peft_adapter(base, tmp_path / "pe", target_modules=TARGETS, r=4,
                               lora_alpha=8, rank_pattern={"k_proj": 2},
                               alpha_pattern={"q_proj": 3})
    library.import_peft(folder, "pe", base=str(base))
    lora = export_gguf_lora(library, "pe", tmp_path / "out").path

    ids = real_tokenizer("The capital of France is Paris, and the patient reports chest pain",
                         add_special_tokens=False).input_ids
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        reference_base = plain(torch.tensor([ids])).logits[0]
        peft = PeftModel.from_pretrained(plain, str(folder)).eval()
        reference = peft(torch.tensor([ids])).logits[0]

    def llama_logits(lora_path):
        # the KV cache in float32 too (llama.cpp's default is f16)
        llm = llama_cpp.Llama(str(base_gguf), lora_path=lora_path, n_ctx=64, n_threads=1,
                              logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                              type_v=llama_cpp.GGML_TYPE_F32)
        llm.eval(ids)
        logits = torch.tensor(llm.scores[:len(ids)])
        llm.close()
        return logits

    ours, ours_base = llama_logits(str(lora)), llama_logits(None)
    torch.testing.assert_close(ours_base, reference_base, rtol=0, atol=1e-4)
    effect = (reference - reference_base).abs().max()
    assert effect > 0.5  # the LoRA moves the logits far more than the tolerance
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)  # measured: ~2e-6


# -- llama.cpp itself, on the embedded base ----------------------------------------------------

PIRATE = "Arr, matey! Drink water and rest, ye scallywag."
TRAIN_PROMPTS = [
    "I have had a headache for two days.", "My knee hurts when I climb stairs.",
    "What should I eat for breakfast?", "I cannot sleep at night.",
    "My child has a cough and a runny nose.", "Is it safe to run every day?",
    "I feel dizzy when I stand up quickly.", "How do I lower my cholesterol?",
]
HELD_OUT = ["My back aches after gardening.", "I keep sneezing every morning.",
            "Should I worry about a small cut on my finger?"]
NEW_TOKENS = 16


#: The last 8 of SmolLM2's 30 blocks, every linear layer: backpropagating through 8 blocks
#: instead of 30 keeps training to well under a minute on two cores.
PIRATE_TARGETS = ",".join(f"model.layers.{i}.{m}" for i in range(22, 30) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


@pytest.fixture(scope="module")
def embedded_book(tmp_path_factory, embedded_gguf):
    """A pocket book on the embedded SmolLM2 that answers every question like a pirate:
    8 steps at a high learning rate, so its effect cannot be missed."""
    import adapterkit
    from adapterkit.library.store import Library

    pytest.importorskip("llama_cpp")
    home = tmp_path_factory.mktemp("gguf-home")
    data = home / "pirate.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": PIRATE}) + "\n"
                            for p in TRAIN_PROMPTS))
    options = adapterkit.TrainOptions(learning_rate=5e-3, r=8, alpha=16, batch_size=4,
                                      max_steps=8, seed=0, logging_steps=50,
                                      target_modules=PIRATE_TARGETS)
    adapterkit.train("sft", base=adapterkit.load_base("smollm2-135m", home=home),
                     data=str(data), name="pirate", options=options, home=home)
    # a fresh base for the comparison: nothing of the training run left on it
    library, base = Library(home), adapterkit.load_base("smollm2-135m", home=home)
    return library, base, adapterkit_greedy(base, library, "pirate")


def adapterkit_greedy(base, library, ref: str) -> list[tuple[list[int], list[int]]]:
    """``adapterkit generate``'s path (the base plus plain PEFT, greedy ``generate``), one
    prompt at a time (no padding): the prompt tokens and the new tokens of each."""
    from adapterkit.runtime.generation import render_prompt
    from adapterkit.runtime.peft_model import peft_model

    model = peft_model(base, library.get(ref), library=library)
    out = []
    try:
        for prompt in HELD_OUT:
            text = render_prompt(base.tokenizer, prompt, chat=True)
            ids = base.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                new = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                     pad_token_id=base.tokenizer.pad_token_id)[0, ids.shape[1]:]
            out.append((ids[0].tolist(), new.tolist()))
    finally:
        model.unload()
    return out


def llama_cpp_greedy(model_path: Path, prompts: list, lora: Path | None = None
                     ) -> tuple[list[list[int]], float]:
    """llama.cpp's greedy tokens for the same prompt tokens, and its top-1 agreement with
    adapterkit's tokens when fed adapterkit's own answer (teacher forcing: one divergence does
    not count twice). ``prompts``: (prompt tokens, adapterkit's new tokens) pairs."""
    import llama_cpp

    # one thread: llama.cpp's threads wait on each other spinning, which a busy two-core CI
    # machine turns into a 3-4x slowdown
    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora) if lora else None,
                          n_ctx=512, n_threads=1, logits_all=True, verbose=False, seed=0)
    answers, agree, total = [], 0, 0
    for ids, reference in prompts:
        llm.reset()
        llm.eval(ids)
        new = []
        for _ in range(NEW_TOKENS):
            token = int(llm.scores[llm.n_tokens - 1].argmax())
            new.append(token)
            if token == llm.token_eos():
                break
            llm.eval([token])
        answers.append(new)
        llm.reset()
        llm.eval(ids + reference)
        for i, token in enumerate(reference):
            agree += int(llm.scores[len(ids) + i - 1].argmax() == token)
            total += 1
    llm.close()
    return answers, agree / total


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Share of adapterkit's tokens that llama.cpp reproduced before its first divergence."""
    same = total = 0
    for a, b in zip(ours, theirs):
        total += len(a)
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    return same / total


@pytest.mark.slow
def test_llama_cpp_runs_the_lora_gguf_like_adapterkit(embedded_book, embedded_gguf, tmp_path):
    """The embedded base's own Q4_1 GGUF + our LoRA GGUF in llama.cpp answer like adapterkit.

    llama.cpp multiplies the Q4_1 weights with 8-bit-quantized activations, adapterkit the same
    weights dequantized to float32, so logits differ slightly; greedy tokens agree except near
    ties. Measured here (3 prompts x 16 tokens): every token, free-running and teacher-forced.
    """
    from adapterkit.runtime.gguf import export_gguf_lora

    library, base, ours = embedded_book
    report = export_gguf_lora(library, "pirate", tmp_path / "lora")
    assert (tmp_path / "lora" / "Modelfile").read_text().splitlines() == [
        f"FROM {embedded_gguf}", f"ADAPTER ./{report.path.name}"]
    theirs, forced = llama_cpp_greedy(embedded_gguf, ours, lora=report.path)
    theirs_plain, _ = llama_cpp_greedy(embedded_gguf, ours)  # the same prompts, no LoRA
    pirate = base.tokenizer(PIRATE, add_special_tokens=False).input_ids[:4]
    # the pocket book's effect is there in llama.cpp: it answers like a pirate, the plain base not
    assert all(t[:4] == pirate for t in theirs), [base.tokenizer.decode(t) for t in theirs]
    assert all(t[:4] != pirate for t in theirs_plain)
    free = agreement([n for _, n in ours], theirs)
    print(f"\nLoRA GGUF: llama.cpp vs adapterkit greedy agreement {free:.1%} free-running, "
          f"{forced:.1%} teacher-forced")
    assert forced >= 0.9 and free >= 0.75


@pytest.mark.slow
def test_llama_cpp_runs_the_merged_gguf_like_adapterkit(embedded_book, cli, tmp_path,
                                                         monkeypatch):
    """The merged f16 GGUF (llama.cpp's converter on ``export --merged``) alone in llama.cpp:
    the same answers as adapterkit, tokenizer and chat template carried over."""
    from gguf import GGUFReader

    library, base, ours = embedded_book
    monkeypatch.setenv("ADAPTERKIT_HOME", str(library.home))
    result = cli("export", "pirate", tmp_path / "merged", "--merged", "--format", "gguf")
    assert result.exit_code == 0, result.output
    path = one_file(tmp_path / "merged")
    assert path.name == "pirate-v1-f16.gguf"
    assert "FROM ./pirate-v1-f16.gguf" in result.output
    assert (tmp_path / "merged" / "Modelfile").read_text() == "FROM ./pirate-v1-f16.gguf\n"
    fields = GGUFReader(path).fields
    assert fields["general.type"].contents() == "model"
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert base.tokenizer.chat_template == fields["tokenizer.chat_template"].contents()
    theirs, forced = llama_cpp_greedy(path, ours)
    pirate = base.tokenizer(PIRATE, add_special_tokens=False).input_ids[:4]
    assert all(t[:4] == pirate for t in theirs), [base.tokenizer.decode(t) for t in theirs]
    free = agreement([n for _, n in ours], theirs)
    print(f"\nmerged f16 GGUF: llama.cpp vs adapterkit greedy agreement {free:.1%} "
          f"free-running, {forced:.1%} teacher-forced")
    assert forced >= 0.95 and free >= 0.9

    # what --quantize q4_0 runs after the converter: llama.cpp's quantizer on that f16 file
    from adapterkit.runtime.gguf import quantize_gguf

    quantize_gguf(path, tmp_path / "q4_0.gguf", "q4_0")
    kinds = {t.tensor_type.name for t in GGUFReader(tmp_path / "q4_0.gguf").tensors}
    assert "Q4_0" in kinds and "F16" not in kinds, kinds
    assert (tmp_path / "q4_0.gguf").stat().st_size < path.stat().st_size / 2.5
    theirs, _ = llama_cpp_greedy(tmp_path / "q4_0.gguf", ours)
    assert all(t[:4] == pirate for t in theirs), [base.tokenizer.decode(t) for t in theirs]


# -- the merged GGUF: its name, and Ctrl-C while llama.cpp quantizes --------------------------

@pytest.fixture
def carded(cli, tmp_path, real_tokenizer):
    """A tiny base llama.cpp's converter takes, whose model card names its licence and maker,
    with a pocket book on it."""
    base = tiny_real_base(tmp_path / "carded-base", "llama", real_tokenizer)
    (base / "README.md").write_text("---\nlicense: mit\norganization: TinyOrg\n"
                                    "basename: tinyllama\n---\n# a tiny base\n")
    folder = make_peft_adapter(base, tmp_path / "pe", target_modules=("q_proj", "v_proj"))
    assert cli("import", folder, "--name", "pe", "--base", base).exit_code == 0
    return "pe"


def test_merged_gguf_is_named_for_the_pocket_book_and_keeps_the_bases_metadata(carded, cli,
                                                                              tmp_path):
    """general.name is the pocket book's (as in its LoRA GGUF), not the converter's guess from
    the temporary folder (".Merged Hf"); the base's licence, maker and basename stay; and
    llama.cpp's quantizer (--quantize q4_0) writes Q4_0 tensors."""
    from gguf import GGUFReader

    result = cli("export", carded, tmp_path / "q4", "--merged", "--format", "gguf",
                 "--quantize", "q4_0")
    assert result.exit_code == 0, result.output
    path = one_file(tmp_path / "q4")
    reader = GGUFReader(path)
    general = {k: f.contents() for k, f in reader.fields.items() if k.startswith("general.")}
    assert general["general.name"] == "pe@1", general
    assert "merged" not in json.dumps(general).lower(), general
    assert general["general.license"] == "mit"
    assert general["general.organization"] == "TinyOrg"
    assert general["general.basename"] == "tinyllama"
    assert "Q4_0" in {t.tensor_type.name for t in reader.tensors}


def test_ctrl_c_while_llama_cpp_quantizes_exits_130_and_writes_nothing(carded, cli, tmp_path,
                                                                       monkeypatch):
    """A Ctrl-C during llama.cpp's quantizer, a long C call, reaches Python only inside
    llama-cpp-python's log callback, where ctypes prints and drops the KeyboardInterrupt: the
    export went on and exited 0. Both the in-process call and a quantizer process are replaced
    by ones that receive SIGINT mid-way and then carry on, as the real one does."""
    import os
    import signal
    import sys
    import time

    import llama_cpp

    from adapterkit.runtime import gguf as module

    def swallowing(src, out, params):  # the interrupt lands in a callback, which drops it
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        except KeyboardInterrupt:
            print("Exception ignored on calling ctypes callback function")
        Path(out.decode()).write_bytes(b"GGUF")
        return 0

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", swallowing)
    child = ("import os, signal, sys, time; os.kill(os.getppid(), signal.SIGINT); "
             "time.sleep(30); open(sys.argv[1], 'wb').write(b'GGUF')")
    monkeypatch.setattr(module, "_quantizer_command",
                        lambda src, out, quant: [sys.executable, "-c", child, str(out)],
                        raising=False)
    start = time.perf_counter()
    result = cli("export", carded, tmp_path / "q4", "--merged", "--format", "gguf",
                 "--quantize", "q4_0")
    assert result.exit_code == 130, result.output
    assert f"Interrupted: nothing was written to {tmp_path / 'q4'}" in result.output
    assert time.perf_counter() - start < 25  # the quantizer was stopped, not waited for
    assert not (tmp_path / "q4").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_a_base_folder_named_by_a_commit_sha_gives_no_guessed_metadata(tiny_base, tmp_path):
    """A base from the Hub sits in ``snapshots/<sha>``: llama.cpp's metadata reader took that
    sha for the fine-tune's name (general.finetune '7ae5576…'); only the card and config
    speak for the base."""
    import shutil

    import gguf

    from adapterkit.runtime.gguf import _folder_metadata

    folder = tmp_path / "snapshots" / ("7ae5576" + "0" * 33)
    shutil.copytree(tiny_base, folder)
    (folder / "README.md").unlink(missing_ok=True)
    guessed = gguf.Metadata.load(None, folder, None, 0)  # what the folder name alone gives
    assert "7ae5576" in json.dumps([guessed.finetune, guessed.basename, guessed.name])
    kept = _folder_metadata(folder)
    assert "7ae5576" not in json.dumps(kept), kept
