"""--precision: bfloat16 training where the hardware has it, float32 elsewhere — and the figures
a run reports, and the model it returns, taken on the exact float32 base either way."""

import json

import pytest
import torch

from adapterkit import ConfigError, TrainOptions, train
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.training import precision
from adapterkit.training.options import build_options


def fast(**kw):
    base = dict(max_steps=12, learning_rate=3e-2, batch_size=4, logging_steps=2, save_steps=100,
                r=8, alpha=16, dropout=0.0)
    base.update(kw)
    return TrainOptions(**base)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_auto_picks_bf16_only_where_the_hardware_computes_it(fast_bf16, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    expected = torch.bfloat16 if fast_bf16 else torch.float32
    assert precision.training_dtype("auto", "cpu") == expected
    assert precision.training_dtype("auto", "cpu", "4bit") == torch.float32  # bnb CPU: fp32
    assert precision.training_dtype("fp32", "cpu") == torch.float32
    assert precision.training_dtype("bf16", "cpu") == torch.bfloat16


def test_precision_is_checked_with_the_other_options(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("precision: fp16\n")
    with pytest.raises(ConfigError, match="precision: expected one of auto, bf16, fp32"):
        build_options(recipe)
    assert build_options(None, {"precision": "BF16"}).precision == "bf16"


def _tiny_llama(attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def test_fp32_attention_is_sdpa_in_float32_with_its_padding_mask():
    """An independent reference: transformers' own eager attention in float32."""
    eager = _tiny_llama("eager")
    ours = _tiny_llama("sdpa")
    ours.load_state_dict(eager.state_dict())
    ours.to(torch.bfloat16)
    precision.fp32_attention(ours)
    assert ours.config._attn_implementation == precision.FP32_ATTENTION
    ids = torch.tensor([[0, 0, 5, 9, 13, 7], [3, 4, 5, 9, 13, 7]])  # left padding on row 0
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real_sdpa(q, k, v, *args, **kwargs)

    with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention = recording
        try:
            got = ours(input_ids=ids, attention_mask=mask).logits.float()
        finally:
            torch.nn.functional.scaled_dot_product_attention = real_sdpa
        alone = ours(input_ids=ids[:1, 2:]).logits.float()
        unmasked = ours(input_ids=ids).logits.float()
        ref = eager.to(torch.bfloat16)(input_ids=ids, attention_mask=mask).logits.float()
    # attention itself ran in float32 on the bfloat16 model
    assert seen and set(seen) == {(torch.float32,) * 3}
    # the mask is applied: the padded row equals the same tokens alone, and without the mask
    # it would not (the tolerance below can tell a missing mask apart)
    torch.testing.assert_close(got[0, 2:], alone[0], atol=2e-2, rtol=0)
    assert (unmasked[0, 2:] - alone[0]).abs().max() > 0.1
    # and agrees with eager attention wherever a token is not padding
    torch.testing.assert_close(got[0, 2:], ref[0, 2:], atol=5e-2, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=5e-2, rtol=0)
    # in float32 it is exactly transformers' sdpa
    sdpa = _tiny_llama("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    ours32 = _tiny_llama("sdpa")
    ours32.load_state_dict(eager.state_dict())
    precision.fp32_attention(ours32)
    with torch.no_grad():
        assert torch.equal(ours32(input_ids=ids, attention_mask=mask).logits,
                           sdpa(input_ids=ids, attention_mask=mask).logits)


def _reload_logits(base_folder, adapter_path, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(plain, adapter_path).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("given", ["name", "resident"])
def test_bf16_run_learns_like_fp32_and_reports_figures_of_the_exact_base(
        given, tiny_base, home, data, pm):
    """``name``: the run loads the base in bf16; ``resident``: a float32 base the caller
    loaded is held in bf16 for the steps and given its exact weights back after them."""
    from adapterkit import load_base

    runs, logits = {}, {}
    ids = torch.tensor([[3, 50, 60, 70, 80, 90]])
    resident = load_base(str(tiny_base), home=home) if given == "resident" else None
    for p in ("bf16", "fp32"):
        runs[p] = train("sft", base=resident or str(tiny_base), data=str(data),
                        name=f"p-{p}", options=fast(precision=p, general="general"),
                        home=home, plugins=pm)
        with torch.no_grad():
            logits[p] = runs[p].model(input_ids=ids).logits
        if resident is not None:
            assert resident.model.dtype == torch.float32 and resident.rounded_from is None
            runs[p].model.unload()
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert bf16.metrics["precision"] == "bf16" and bf16.metrics["measured_in"] == "fp32"
    assert fp32.metrics["precision"] == "fp32" and "measured_in" not in fp32.metrics
    # learns as float32 does (the speed must not come from training less)
    first, last = bf16.metrics["train_loss_first"], bf16.metrics["train_loss_final"]
    assert last < 0.5 * first
    assert abs(last - fp32.metrics["train_loss_final"]) < 0.25 * fp32.metrics["train_loss_first"]
    # the pocket book on disk is float32, and the model the run returns is the exact float32
    # base + that book: plain PEFT on a fresh float32 load gives the same logits, bit for bit
    from safetensors.torch import load_file

    weights = load_file(str(bf16.pocket_book.path / "adapter_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert torch.equal(_reload_logits(tiny_base, bf16.pocket_book.path, ids), logits["bf16"])
    # and the forgetting figure is the one a fresh float32 load with plain PEFT gives
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterkit.training.data import read_rows
    from adapterkit.training.metrics import forgetting

    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.pad_token = tok.pad_token or tok.eos_token
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
        bf16.pocket_book.path).eval()
    general = [r["text"] for r in read_rows("general")[0]]
    assert bf16.metrics["forgetting"]["general_loss_change_pct"] == pytest.approx(
        forgetting(plain, tok, general)["general_loss_change_pct"], abs=1e-6)


def test_precision_flag_on_the_command_line(tiny_base, home, data):
    from click.testing import CliRunner

    from adapterkit.cli import build_cli

    cli = build_cli(get_plugin_manager(env=False))
    runner = CliRunner()
    bad = runner.invoke(cli, ["--home", str(home), "train", "sft", "--base", str(tiny_base),
                              "--data", str(data), "--name", "x", "--precision", "fp16"])
    assert bad.exit_code != 0 and "fp16" in bad.output and "Traceback" not in bad.output
    ok = runner.invoke(cli, ["--home", str(home), "train", "sft", "--base", str(tiny_base),
                             "--data", str(data), "--name", "x", "--precision", "fp32",
                             "--max-steps", "2", "--batch-size", "4", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output[ok.output.index("{"):])["metrics"]["precision"] == "fp32"


def test_resume_in_another_precision_is_refused_and_the_callers_base_comes_back(
        tiny_base, home, data, pm):
    """A run interrupted in bf16 resumes only in bf16; the interrupted and the refused run both
    give a base passed in from Python back exactly as it came (float32, same weights)."""
    from transformers import TrainerCallback

    from adapterkit import load_base

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise KeyboardInterrupt

    base = load_base(str(tiny_base), home=home)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}

    def unchanged():
        assert base.model.dtype == torch.float32 and base.rounded_from is None
        # (a run that stopped leaves PEFT's wrapped layers in place: compare the base's own)
        after = {k.replace(".base_layer.", "."): v for k, v in base.model.state_dict().items()
                 if "lora_" not in k}
        assert all(torch.equal(before[k], after[k]) for k in before)

    with pytest.raises(KeyboardInterrupt):  # interrupted while held in bf16
        train("sft", base=base, data=str(data), name="r", home=home, plugins=pm,
              options=fast(precision="bf16", save_steps=5), callbacks=[Interrupt()])
    unchanged()
    with pytest.raises(ConfigError, match="trained in bf16 .* resume with --precision bf16"):
        train("sft", base=base, data=str(data), name="r", home=home, plugins=pm,
              options=fast(precision="fp32", save_steps=5), resume=True)
    unchanged()
    result = train("sft", base=base, data=str(data), name="r", home=home, plugins=pm,
                   options=fast(precision="bf16", save_steps=5), resume=True)
    assert result.metrics["steps"] == 12 and result.metrics["precision"] == "bf16"
    result.model.unload()
    unchanged()


def test_the_plain_base_general_loss_is_measured_once_per_reference(tiny_base, home, data, pm):
    """The "before" of the forgetting figure is the plain base's: cached under the library
    home, keyed by the reference, and read back by the next run on that base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterkit.training.data import read_rows
    from adapterkit.training.metrics import text_loss

    first = train("sft", base=str(tiny_base), data=str(data), name="g1", home=home, plugins=pm,
                  options=fast(precision="fp32", general="general", max_steps=2))
    general = [r["text"] for r in read_rows("general")[0]]
    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.pad_token = tok.pad_token or tok.eos_token
    plain = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    assert first.metrics["forgetting"]["general_loss_base"] == pytest.approx(
        text_loss(plain, tok, general), abs=1e-6)
    entries = list((home / "cache" / "general-loss").glob("*.json"))
    assert len(entries) == 1
    entries[0].write_text(json.dumps({"loss": 123.0}))  # proof of reading, not recomputing
    assert first.metrics["forgetting"]["base_loss_from"] == "this run"
    second = train("sft", base=str(tiny_base), data=str(data), name="g2", home=home,
                   plugins=pm, options=fast(precision="fp32", general="general", max_steps=2))
    assert second.metrics["forgetting"]["general_loss_base"] == 123.0
    assert second.metrics["forgetting"]["base_loss_from"] == "cache"  # and says so
    from adapterkit.training.metrics import base_loss_note

    assert "cache" in base_loss_note(second.metrics["forgetting"])
    assert base_loss_note(first.metrics["forgetting"]) == ""
    # another measurement (bf16 steps, then the exact base) has its own entries
    third = train("sft", base=str(tiny_base), data=str(data), name="g3", home=home,
                  plugins=pm, options=fast(precision="bf16", general="general",
                                           forgetting_budget=5, max_steps=2))
    assert len(list((home / "cache" / "general-loss").glob("*.json"))) == 2
    # the guard decides on the exact base, on the very figure the run reports, and says so
    guard = third.metrics["guard"]
    assert guard["measured_in"] == "fp32" and guard["base_loss_from"] == "this run"
    assert third.metrics["measured_in"] == "fp32"
    assert third.metrics["forgetting"]["base_loss_from"] == "this run"
    assert guard["checks"][-1]["general_loss"] == third.metrics["forgetting"]["general_loss"]


def test_a_base_that_cannot_be_given_back_exactly_is_not_rounded(tiny_base, home, data, pm,
                                                                  tmp_path, monkeypatch):
    """Its weights are not in safetensors files by their names: the run trains it in float32
    (and says so) rather than leave the caller a rounded base."""
    import shutil

    from adapterkit import load_base

    base = load_base(str(tiny_base), home=home)
    assert precision.restorable(base)
    copy = tmp_path / "renamed"
    shutil.copytree(base.source.folder, copy)
    for f in copy.glob("*.safetensors"):
        f.rename(f.with_suffix(".moved"))
    monkeypatch.setattr(base.source, "folder", copy)
    assert not precision.restorable(base)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    with pytest.raises(ConfigError, match="could not be given back exactly"):  # asked: refused
        train("sft", base=base, data=str(data), name="nr", home=home, plugins=pm,
              options=fast(precision="bf16", max_steps=2))
    result = train("sft", base=base, data=str(data), name="nr", home=home, plugins=pm,
                   options=fast(precision="auto", max_steps=2))
    assert result.metrics["precision"] == "fp32" and base.model.dtype == torch.float32
    result.model.unload()
    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_run_from_before_precision_was_recorded_resumes_only_in_fp32(tiny_base, home, data,
                                                                        pm):
    """Checkpoints without a record were trained in float32 (on a CPU): resuming them in bf16
    is refused, after the caller's base was rounded for it, and the base comes back exact."""
    from transformers import TrainerCallback

    from adapterkit import load_base

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("sft", base=str(tiny_base), data=str(data), name="old", home=home, plugins=pm,
              options=fast(precision="fp32", save_steps=5), callbacks=[Interrupt()])
    (home / "runs" / "old" / precision.PRECISION_FILE).unlink()  # as a run before this change
    base = load_base(str(tiny_base), home=home)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    with pytest.raises(ConfigError, match="trained in fp32 .* resume with --precision fp32"):
        train("sft", base=base, data=str(data), name="old", home=home, plugins=pm,
              options=fast(precision="bf16", save_steps=5), resume=True)
    assert base.model.dtype == torch.float32 and base.rounded_from is None
    after = {k.replace(".base_layer.", "."): v for k, v in base.model.state_dict().items()
             if "lora_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert base.model.config._attn_implementation == "sdpa"


def test_a_base_changed_in_memory_is_not_rounded(tiny_base, home, data, pm):
    """Its weights differ from its files, so a reload could not give them back: the run leaves
    it in float32 (auto) or refuses (bf16 asked)."""
    from adapterkit import load_base

    base = load_base(str(tiny_base), home=home)
    with torch.no_grad():
        next(p for n, p in base.model.named_parameters() if "q_proj" in n).add_(0.01)
    assert not precision.restorable(base)
    edited = {k: v.clone() for k, v in base.model.state_dict().items()}
    with pytest.raises(ConfigError, match="could not be given back exactly"):
        train("sft", base=base, data=str(data), name="m", home=home, plugins=pm,
              options=fast(precision="bf16", max_steps=2))
    result = train("sft", base=base, data=str(data), name="m", home=home, plugins=pm,
                   options=fast(max_steps=2))
    assert result.metrics["precision"] == "fp32"
    result.model.unload()
    after = base.model.state_dict()
    assert all(torch.equal(edited[k], after[k]) for k in edited)


@pytest.mark.parametrize("fast_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_end_to_end_follows_the_hardware(fast_bf16, expected, tiny_base, home, data, pm,
                                              monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    result = train("sft", base=str(tiny_base), data=str(data), name="auto", home=home,
                   plugins=pm, options=fast(max_steps=2))
    assert result.metrics["precision"] == expected
    assert result.metrics.get("measured_in") == ("fp32" if expected == "bf16" else None)


def test_a_qlora_run_in_bf16_records_and_says_its_figures_are_of_the_autocast(tiny_base, home,
                                                                              data, pm):
    """A 4-bit base is not held in bf16 (there is nothing to give back), but its steps ran
    under bf16 autocast, which was still on when the forgetting figure was measured: the run
    recorded neither ``measured_in`` nor the note the README promises for such figures."""
    pytest.importorskip("bitsandbytes")
    said: list[str] = []
    result = train("sft", base=str(tiny_base), data=str(data), name="q16", home=home,
                   plugins=pm, progress=said.append,
                   options=fast(method="qlora", precision="bf16", max_steps=2,
                                general="general"))
    assert result.metrics["precision"] == "bf16"
    assert result.metrics["measured_in"] == "bf16"
    assert any("measured under the run's bf16 autocast on the 4bit base" in s for s in said)
    assert result.pocket_book.meta.metrics["measured_in"] == "bf16"
