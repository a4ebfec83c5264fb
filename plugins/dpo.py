"""The ``dpo`` trainer: Direct Preference Optimization on TRL's ``DPOTrainer``.

Reads ``preference`` rows (``prompt`` / ``chosen`` / ``rejected``, strings or chat messages).
The reference model is the policy before this stage — the same resident base with the new
pocket book switched off (with ``--on``, the pocket books underneath stay on), never a second
copy of the base; with ``--from``, TRL's frozen copy of the pocket book it starts from
(``job.configure`` keeps that copy only where the start is not zero:
``adapterkit.training.reference``).

Reference log-probs are computed once, before training, and cached on disk under the library
home, keyed by the tokenized data, the base fingerprint and precision, and the exact pocket
books underneath (``TrainJob.reference_key``). A rerun, or a sweep over ``beta`` or
``loss_type``, reads them back instead of paying for them again (what huggingface/trl#3985
asks for; TRL's own cache lives in a temporary folder for in-memory datasets).

Trainer options (``--set KEY=VALUE``): :class:`DPOOptions`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from adapterkit import Trainer, hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit import TrainOptions

CACHE_KIND = "dpo-ref"


@dataclass
class DPOOptions:
    """``adapterkit train dpo --set KEY=VALUE`` (or a recipe's ``trainer_options:``)."""

    #: How strongly the policy is held to the reference (TRL's ``beta``); above 0.
    beta: float = 0.1
    #: TRL DPO loss(es), summed when several: ``sigmoid``, ``ipo``, ``sigmoid,sft`` or a YAML
    #: list ``[sigmoid, sft]``.
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    #: ``auto`` reads the cache when it has this reference, else precomputes (and caches) when
    #: the run covers the whole data set, and otherwise computes the reference alongside each
    #: step — cheaper for a short run over part of the data; ``true`` always precomputes and
    #: caches; ``false`` never does.
    precompute_ref_log_probs: Literal["auto", "true", "false"] = "auto"

    def check(self, options: TrainOptions) -> list[str]:
        """Value ranges, one line per problem (types were checked before)."""
        problems = []
        if not self.beta > 0:
            problems.append(f"beta must be above 0, got {self.beta}")
        if not self.loss_type:
            problems.append("loss_type must name at least one TRL DPO loss")
        known = _dpo_losses()
        unknown = [loss for loss in self.loss_type if known and loss not in known]
        if unknown:  # else TRL says so at the first step, after the base and data are loaded
            problems.append(f"loss_type {', '.join(unknown)} is not a TRL DPO loss; known: "
                            f"{', '.join(known)}")
        return problems


@functools.cache
def _dpo_losses() -> list[str]:
    """The losses TRL's DPO computes, as its ``DPOConfig`` documents them (empty where that
    text no longer lists them: TRL then refuses an unknown one itself)."""
    import re

    from trl import DPOConfig

    field_ = DPOConfig.__dataclass_fields__.get("loss_type")
    text = str(field_.metadata.get("help", "")) if field_ is not None else ""
    return re.findall(r"`'(\w+)'`", text)


def _covers(args: Any, rows: int) -> bool:
    """Whether a run with ``args`` sees every row at least once."""
    if args.max_steps is None or args.max_steps <= 0:
        return args.num_train_epochs >= 1
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * \
        max(args.world_size, 1)
    return args.max_steps * per_step >= rows


def _cached_trainer(job: Any, mode: Any) -> Any:
    """TRL's DPOTrainer whose reference log-prob pass goes through adapterkit's disk cache."""
    import torch
    import trl
    from trl import DPOTrainer

    class CachedRefDPOTrainer(DPOTrainer):
        cache_hits: dict[str, bool] = {}

        def precompute_reference(self) -> None:
            """Read or compute the reference log-probs before training (``mode``), as TRL's
            constructor does with ``precompute_ref_log_probs``. Called after
            ``job.configure``, so that a pocket book starting at zero is switched off for it
            rather than read through TRL's copy; and TRL's own pass, which this replaces, would
            first hash every weight of the model for its cache key (0.5 s on the embedded
            base)."""
            self.precompute_ref_logps = True
            args: Any = self.args  # a DPOConfig
            train_size = args.precompute_ref_batch_size or args.per_device_train_batch_size
            eval_size = args.precompute_ref_batch_size or args.per_device_eval_batch_size
            self.train_dataset = self._precompute_ref_logps(self.train_dataset, "train",
                                                            train_size)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {name: self._precompute_ref_logps(data, name, eval_size)
                                     for name, data in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._precompute_ref_logps(self.eval_dataset, "eval",
                                                               eval_size)

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            from accelerate.utils import broadcast_object_list
            from safetensors.torch import load_file, save_file

            if not self.precompute_ref_logps:  # "auto" chose per-step reference (see below)
                return dataset

            columns = [c for c in dataset.column_names if not c.startswith("ref_")]
            digest = hashlib.sha256(json.dumps(dataset.select_columns(columns).to_dict(),
                                               sort_keys=True).encode()).hexdigest()
            # layout 2: entries of runs --from a pocket book are keyed by it (earlier
            # versions wrote them under a fresh run's key: none of those is read)
            key = job.reference_key(trainer="dpo", layout=2, data=digest, rows=len(dataset),
                                    max_length=self.args.max_length,  # type: ignore[attr-defined]  # DPOConfig
                                    truncation=getattr(self.args, "truncation_mode", None),
                                    bf16=self.args.bf16, trl=trl.__version__)
            path = job.cache_dir(CACHE_KIND) / f"{key}.safetensors"
            cached = None
            if self.accelerator.is_main_process and path.is_file():
                tensors = load_file(str(path))
                if len(tensors["chosen"]) == len(dataset):
                    cached = (tensors["chosen"].tolist(), tensors["rejected"].tolist())
            # the main process reads the cache and every rank takes its values, so all of
            # them make the same choice (and other machines need no copy of the cache)
            cached = broadcast_object_list([cached], from_process=0)[0]
            if cached is not None:
                self.cache_hits[name] = True
                return (dataset.add_column("ref_chosen_logps", cached[0])
                        .add_column("ref_rejected_logps", cached[1]))
            if mode == "auto" and not _covers(self.args, len(dataset)):
                # A short run over part of the data: a pass over all of it would cost more
                # than the reference forwards of the steps that run. TRL reads this flag in
                # ``_compute_loss`` and then computes the reference alongside each step.
                self.precompute_ref_logps = False
                self.cache_hits[name] = None  # type: ignore[assignment]
                return dataset
            self.cache_hits[name] = False
            chosen, rejected = self._reference_pass(dataset, batch_size)
            if self.accelerator.is_main_process:
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                save_file({"chosen": chosen, "rejected": rejected}, str(tmp))
                os.replace(tmp, path)  # never a half-written cache entry
            return (dataset.add_column("ref_chosen_logps", chosen.tolist())
                    .add_column("ref_rejected_logps", rejected.tolist()))

        def _reference_pass(self, dataset: Any, batch_size: int) -> tuple[Any, Any]:
            """TRL's reference pass — ``compute_ref_log_probs`` on each rank's share of the
            rows, gathered in data order — kept in memory on every rank. (TRL hands the
            gathered values to the other ranks through a file that, for a data set held in
            memory as ours are, lies in a per-process temporary folder they cannot open.)"""
            from torch.utils.data import DataLoader
            from trl.models import prepare_deepspeed

            loader = self.accelerator.prepare(DataLoader(
                dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory))
            model = self.ref_model or self.model
            if self.ref_model is None and self.is_deepspeed_enabled:  # as TRL: ZeRO shards
                if self._precompute_engine is None:
                    self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)  # type: ignore[arg-type]
                model = self._precompute_engine
            chosen, rejected = [], []
            for batch in loader:
                pair = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
                chosen.append(pair[0].float().cpu())
                rejected.append(pair[1].float().cpu())
            return torch.cat(chosen), torch.cat(rejected)

    return CachedRefDPOTrainer


class DPO(Trainer):
    name = "dpo"
    description = "Direct Preference Optimization from preference pairs (TRL DPOTrainer)"
    data_shapes = ("preference",)
    options = DPOOptions
    uses_guard = True  # job.guarded(...) adds the guard's KL term to the DPO loss
    drops_out = False  # DPOConfig's disable_dropout (its default) switches LoRA dropout off

    def train(self, *, job: Any, **_: Any) -> Any:
        from trl import DPOConfig

        o: DPOOptions = job.trainer_options
        mode = o.precompute_ref_log_probs
        config = DPOConfig(
            **job.training_arguments(),
            max_length=job.options.max_length,
            beta=o.beta,
            loss_type=list(o.loss_type),
            # computed (or read from the cache) below, after job.configure
            precompute_ref_log_probs=False,
        )
        trainer = job.guarded(_cached_trainer(job, mode))(
            model=job.model, args=config, train_dataset=job.train_dataset(),
            eval_dataset=job.eval_dataset(), processing_class=job.tokenizer,
            callbacks=job.callbacks)
        job.configure(trainer)
        if mode != "false":
            trainer.precompute_reference()
        trainer.train(resume_from_checkpoint=job.resume_from)
        if trainer.cache_hits:
            trainer.state.adapterkit_metrics = {"reference_cache": {
                k: {True: "hit", False: "computed", None: "alongside"}[v]
                for k, v in trainer.cache_hits.items()}}
        return trainer.state


@hookimpl
def register_trainers(register):
    register(DPO())
