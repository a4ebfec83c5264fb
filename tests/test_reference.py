"""The DPO/GRPO reference of a pocket book that starts at zero is the model with it switched
off (TRL's copy of it dropped), and TRL's copy stays where the start is not zero."""

import pytest
import torch

from adapterkit import TrainOptions, train
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.training.reference import COPY, drop_zero_start_copy, starts_at_zero

IDS = torch.tensor([[3, 50, 60, 70, 80, 90, 11, 12], [3, 40, 41, 42, 43, 44, 45, 46]])


def _peft(tiny_base, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                        task_type="CAUSAL_LM", **lora)
    return get_peft_model(base, config)


def _copy_as_trl_does(model):
    """What TRL's DPOTrainer does to a PeftModel it is handed (trl dpo_trainer.py, 1.16)."""
    model.add_adapter(COPY, model.peft_config["default"])
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", f".{COPY}.")).data.copy_(param.data)


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("autocast", [False, True])
def test_copy_of_a_zero_start_gives_the_logits_of_the_book_switched_off(tiny_base, autocast):
    model = _peft(tiny_base)
    _copy_as_trl_does(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model.set_adapter(COPY)
        through_copy = model(input_ids=IDS).logits
        model.set_adapter("default")
        with model.disable_adapter():
            switched_off = model(input_ids=IDS).logits
    assert torch.equal(through_copy, switched_off)  # bit for bit: the copy adds exactly 0

    trainable = _trainable(model)
    assert COPY not in model.active_adapters and starts_at_zero(model)
    assert drop_zero_start_copy(model)
    assert COPY not in model.peft_config and model.active_adapter == "default"
    assert _trainable(model) == [n for n in trainable if f".{COPY}." not in n]
    assert not drop_zero_start_copy(model)  # nothing left to drop


def test_copy_of_a_non_zero_start_is_kept(tiny_base):
    model = _peft(tiny_base)
    with torch.no_grad():  # a trained (or --from) pocket book: one lora_B not zero
        next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = 1e-3
    _copy_as_trl_does(model)
    assert not starts_at_zero(model)
    assert not drop_zero_start_copy(model) and COPY in model.peft_config

    dora = _peft(tiny_base, use_dora=True)  # zero B, but DoRA's output is not the base's bits
    _copy_as_trl_does(dora)
    assert not starts_at_zero(dora) and not drop_zero_start_copy(dora)

    # an adapter named "ref" that is not TRL's copy of a zero start: it holds weights
    mine = _peft(tiny_base)
    _copy_as_trl_does(mine)
    with torch.no_grad():
        next(p for n, p in mine.named_parameters() if f"lora_B.{COPY}" in n)[0, 0] = 1e-3
    assert starts_at_zero(mine) and not starts_at_zero(mine, COPY)
    assert not drop_zero_start_copy(mine) and COPY in mine.peft_config


@pytest.mark.slow
def test_dpo_takes_its_reference_with_the_book_switched_off(tiny_base, home, adapterkit_data,
                                                             monkeypatch):
    from trl import DPOTrainer

    # what each reference forward of the run went through
    through = []
    real = DPOTrainer._compute_loss

    def recording(self, model, inputs, return_outputs):
        through.append(COPY in self.accelerator.unwrap_model(self.model).peft_config)
        return real(self, model, inputs, return_outputs)

    monkeypatch.setattr(DPOTrainer, "_compute_loss", recording)
    pm = get_plugin_manager(env=False)
    options = dict(max_steps=2, batch_size=4, learning_rate=1e-2, r=4, alpha=8, dropout=0.0,
                   trainer_options={"precompute_ref_log_probs": "false"})
    fresh = train("dpo", base=str(tiny_base), data=str(adapterkit_data["preference"]),
                  name="fresh", home=home, plugins=pm, options=TrainOptions(**options))
    assert through == [False, False]
    assert not (fresh.pocket_book.path / COPY).exists()

    # --from a trained pocket book: the reference is that book, so TRL's copy of it is used,
    # and it is not saved with the new one
    through.clear()
    again = train("dpo", base=str(tiny_base), data=str(adapterkit_data["preference"]),
                  name="again", home=home, plugins=pm, start_from="fresh",
                  options=TrainOptions(**options))
    assert through == [True, True]
    assert not (again.pocket_book.path / COPY).exists()
    assert sorted(p.name for p in again.pocket_book.path.iterdir() if p.is_dir()) == []


@pytest.mark.slow
def test_dpo_does_not_hash_the_model_for_a_cache_it_does_not_use(tiny_base, home,
                                                                  adapterkit_data, monkeypatch):
    from trl.trainer import dpo_trainer

    hashed = []

    def counting(module):
        hashed.append(module)
        return "h"

    monkeypatch.setattr(dpo_trainer, "hash_module", counting)
    pm = get_plugin_manager(env=False)
    result = train("dpo", base=str(tiny_base), data=str(adapterkit_data["preference"]),
                   name="unhashed", home=home, plugins=pm,
                   options=TrainOptions(max_steps=1, batch_size=4, r=4, alpha=8))
    # the default (auto) mode: TRL would hash every weight in its constructor
    assert result.metrics["reference_cache"] == {"train": "alongside"}
    assert hashed == []


def _dpo(tiny_base, home, adapterkit_data, name, steps=2, sets=None, **kwargs):
    options = TrainOptions(max_steps=steps, batch_size=4, learning_rate=1e-2, r=4, alpha=8,
                           dropout=0.0, trainer_options=sets or {}, precision="fp32")
    return train("dpo", base=str(tiny_base), data=str(adapterkit_data["preference"]), name=name,
                 home=home, plugins=get_plugin_manager(env=False), options=options, **kwargs)


@pytest.mark.slow
def test_dpo_trains_the_same_pocket_book_with_the_copy_dropped_or_kept(tiny_base, home,
                                                                        adapterkit_data,
                                                                        monkeypatch):
    """The whole of TRL's loop, the reference alongside each step: bit for bit the same
    weights whether the reference goes through TRL's copy or the book switched off."""
    from peft import get_peft_model_state_dict

    from adapterkit.training import reference

    sets = {"precompute_ref_log_probs": "false"}
    dropped = _dpo(tiny_base, home, adapterkit_data, "dropped", steps=4, sets=sets)
    monkeypatch.setattr(reference, "drop_zero_start_copy", lambda model: False)
    kept = _dpo(tiny_base, home, adapterkit_data, "kept", steps=4, sets=sets)
    assert COPY in kept.model.peft_config and COPY not in dropped.model.peft_config
    a = get_peft_model_state_dict(dropped.model)
    b = get_peft_model_state_dict(kept.model, adapter_name="default")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert dropped.metrics["train_loss_final"] == kept.metrics["train_loss_final"]
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it trained


@pytest.mark.slow
def test_precomputed_reference_skips_the_copy_and_is_keyed_by_the_start(tiny_base, home,
                                                                         adapterkit_data,
                                                                         monkeypatch):
    """The reference log-probs computed before training go through the switched-off book too,
    and a run ``--from`` a trained book (whose copy is its reference) has a cache entry of its
    own, never a fresh run's."""
    from trl import DPOTrainer

    through = []
    real = DPOTrainer.compute_ref_log_probs

    def recording(self, model, inputs):
        through.append(COPY in self.accelerator.unwrap_model(self.model).peft_config)
        return real(self, model, inputs)

    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", recording)
    sets = {"precompute_ref_log_probs": "true"}
    fresh = _dpo(tiny_base, home, adapterkit_data, "pre-fresh", sets=sets)
    assert fresh.metrics["reference_cache"] == {"train": "computed"}
    assert through and not any(through)
    through.clear()
    again = _dpo(tiny_base, home, adapterkit_data, "pre-again", sets=sets,
                 start_from="pre-fresh")
    assert again.metrics["reference_cache"] == {"train": "computed"}  # not the fresh run's
    assert through and all(through)
    assert len(list((home / "cache" / "dpo-ref").glob("*.safetensors"))) == 2
    third = _dpo(tiny_base, home, adapterkit_data, "pre-third", sets=sets,
                 start_from="pre-fresh")
    assert third.metrics["reference_cache"] == {"train": "hit"}


def test_a_run_writes_no_trl_model_card_at_its_checkpoints(tiny_base, home, data):
    """TRL's trainers write a draft README into the run folder at every checkpoint (importing
    trackio to tag it), inside the loop; the run folder goes when the run ends and the pocket
    book gets adapterkit's own card, so ``job.configure`` turns it off (0.44 s of a run's
    first checkpoint on 2 cores)."""
    from pathlib import Path

    from transformers import TrainerCallback

    seen: list[tuple[int, bool]] = []

    class AtSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen.append((state.global_step, (Path(args.output_dir) / "README.md").exists()))

    import time

    called = time.perf_counter()
    result = train("sft", base=str(tiny_base), data=str(data), name="t", home=home,
                   plugins=get_plugin_manager(env=False), callbacks=[AtSave()],
                   options=TrainOptions(max_steps=2, save_steps=1, batch_size=4, general="off",
                                        forgetting_budget=0))
    wall = time.perf_counter() - called
    assert seen == [(1, False), (2, False)]
    # where the run's time went besides the loop (bench_train_wall.py prints it)
    m = result.metrics
    assert 0 < m["prepare_seconds"] and m["prepare_seconds"] + m["train_seconds"] < wall
    assert (result.pocket_book.path / "README.md").is_file()  # adapterkit's card
