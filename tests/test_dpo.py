"""The dpo trainer on a tiny random base: preferences are learned, the result reloads in PEFT."""

import json

import pytest
import torch

from adapterkit import ConfigError, DataFormatError, TrainOptions, train
from adapterkit.training.metrics import completion_logprob
from adapterkit.plugin_api.manager import get_plugin_manager


@pytest.mark.slow
def test_dpo_learns_preferences_and_reloads(tiny_base, home, adapterkit_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = get_plugin_manager(env=False)
    result = train("dpo", base=str(tiny_base), data=str(adapterkit_data["preference"]),
                   name="polite", home=home, plugins=pm,
                   options=TrainOptions(max_steps=20, batch_size=4, learning_rate=3e-2, r=8,
                                        alpha=16, dropout=0.0, logging_steps=2,
                                        trainer_options={"beta": 0.1}))
    assert result.metrics["train_loss_final"] < result.metrics["train_loss_first"]
    from adapterkit import load_base

    model = result.model
    tok = load_base(str(tiny_base), home=home).tokenizer
    rows = [json.loads(line) for line in adapterkit_data["preference"].read_text().splitlines()]
    margins = []
    for row in rows[:4]:
        reward = {}
        for key in ("chosen", "rejected"):
            on = completion_logprob(model, tok, row["prompt"], row[key])
            with model.disable_adapter():
                off = completion_logprob(model, tok, row["prompt"], row[key])
            reward[key] = 0.1 * (on - off)
        margins.append(reward["chosen"] - reward["rejected"])
    assert all(m > 0 for m in margins), margins  # implicit reward margin grew from 0
    from adapterkit.training.metrics import preference_accuracy

    acc = preference_accuracy(model, tok, rows[:4])
    assert acc["implicit"] == 1.0 and acc["pairs"] == 4
    assert acc["likelihood_after"] >= acc["likelihood_before"]

    ids = torch.tensor([[3, 50, 60, 70, 80]])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                         result.pocket_book.path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert result.pocket_book.meta.trainer == "dpo"


def test_dpo_refuses_bad_pairs_and_options(tiny_base, home, tmp_path, adapterkit_data):
    pm = get_plugin_manager(env=False)
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}) + "\n")
    with pytest.raises(DataFormatError, match="chosen and rejected are identical in row"):
        train("dpo", base=str(tiny_base), data=str(same), name="x", home=home, plugins=pm)
    with pytest.raises(DataFormatError, match="this trainer reads preference"):
        train("dpo", base=str(tiny_base), data=str(adapterkit_data["text"]), name="x",
              home=home, plugins=pm)
    with pytest.raises(ConfigError, match="unknown dpo option.*gamma"):
        train("dpo", base=str(tiny_base), data=str(adapterkit_data["preference"]), name="x",
              home=home, plugins=pm,
              options=TrainOptions(max_steps=1, trainer_options={"gamma": 1}))


@pytest.mark.slow
def test_reference_logps_are_cached_on_disk_per_reference(tiny_base, home, adapterkit_data):
    from safetensors.torch import load_file

    pm = get_plugin_manager(env=False)
    data = str(adapterkit_data["preference"])

    def run(name, steps=4, **kwargs):  # 4 steps of 4 cover the 16 pairs
        options = TrainOptions(max_steps=steps, batch_size=4, learning_rate=1e-2, r=4, alpha=8,
                               dropout=0.0, trainer_options=kwargs.pop("sets", {}))
        return train("dpo", base=str(tiny_base), data=data, name=name, home=home, plugins=pm,
                     options=options, **kwargs)

    first = run("a")
    assert first.metrics["reference_cache"] == {"train": "computed"}
    cache = home / "cache" / "dpo-ref"
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 1
    # a rerun and a beta sweep read it back, and train exactly as with a fresh computation
    again = run("b")
    swept = run("c", sets={"beta": 0.5})
    assert again.metrics["reference_cache"] == {"train": "hit"}
    assert swept.metrics["reference_cache"] == {"train": "hit"}
    w = [load_file(str(r.pocket_book.path / "adapter_model.safetensors")) for r in (first, again)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    # the cache holds what an uncached run uses as its reference
    uncached = run("d", sets={"precompute_ref_log_probs": False})
    assert "reference_cache" not in uncached.metrics
    # another reference (a pocket book underneath) is another cache entry; a short run over
    # part of the data computes it alongside each step instead (auto), unless told to cache
    short = run("e", steps=1, on="a")
    assert short.metrics["reference_cache"] == {"train": "alongside"}
    assert len(sorted(cache.glob("*.safetensors"))) == 1
    on = run("f", steps=1, on="a", sets={"precompute_ref_log_probs": True})
    assert on.metrics["reference_cache"] == {"train": "computed"}
    assert len(sorted(cache.glob("*.safetensors"))) == 2
    again_short = run("g", steps=1, on="a")
    assert again_short.metrics["reference_cache"] == {"train": "hit"}
    entry = load_file(str(files[0]))
    assert entry["chosen"].shape == entry["rejected"].shape
    assert torch.isfinite(entry["chosen"]).all()


def test_dpo_refuses_bad_beta(tiny_base, home, adapterkit_data):
    pm = get_plugin_manager(env=False)
    for beta, match in ((0, "beta must be above 0"), ("x", "beta must be a number")):
        with pytest.raises(ConfigError, match=match):
            train("dpo", base=str(tiny_base), data=str(adapterkit_data["preference"]),
                  name="x", home=home, plugins=pm,
                  options=TrainOptions(max_steps=1, trainer_options={"beta": beta}))
    assert not (home / "runs" / "x@1").exists() or not any((home / "runs" / "x@1").iterdir())
