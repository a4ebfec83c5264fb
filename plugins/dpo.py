"""The ``dpo`` trainer: Direct Preference Optimization on TRL's ``DPOTrainer``.

Reads ``preference`` rows (``prompt`` / ``chosen`` / ``rejected``, strings or chat messages).
The reference model is the policy before this stage — the same resident base with the new
pocket book switched off (TRL does this for PEFT models), never a second copy of the base.

Trainer options (``--set KEY=VALUE``): ``beta`` (default 0.1), ``loss_type`` (default
``sigmoid``; any TRL DPO loss), ``precompute_ref_log_probs`` (default false).
"""

from __future__ import annotations

from typing import Any

from adapterkit import Trainer, hookimpl

_OPTIONS = {"beta": 0.1, "loss_type": "sigmoid", "precompute_ref_log_probs": False}


class DPO(Trainer):
    name = "dpo"
    description = "Direct Preference Optimization from preference pairs (TRL DPOTrainer)"
    data_shapes = ("preference",)

    def train(self, *, job: Any, **_: Any) -> Any:
        from trl import DPOConfig, DPOTrainer

        from adapterkit.errors import ConfigError

        unknown = sorted(set(job.options.trainer_options) - set(_OPTIONS))
        if unknown:
            raise ConfigError(f"unknown dpo option(s) {', '.join(unknown)}; known: "
                              f"{', '.join(_OPTIONS)}")
        options = {**_OPTIONS, **job.options.trainer_options}
        loss_type = options["loss_type"]
        config = DPOConfig(
            **job.training_arguments(),
            max_length=job.options.max_length,
            beta=float(options["beta"]),
            loss_type=[loss_type] if isinstance(loss_type, str) else list(loss_type),
            precompute_ref_log_probs=bool(options["precompute_ref_log_probs"]),
        )
        trainer = DPOTrainer(model=job.model, args=config, train_dataset=job.train_dataset(),
                             eval_dataset=job.eval_dataset(), processing_class=job.tokenizer,
                             callbacks=job.callbacks)
        job.configure(trainer)
        trainer.train(resume_from_checkpoint=job.resume_from)
        return trainer.state


@hookimpl
def register_trainers(register):
    register(DPO())
