"""What a trainer plugin receives (:class:`TrainJob`) and what a run returns (:class:`TrainResult`).

The job carries everything that does not depend on the objective — the PEFT model (base frozen,
new pocket book trainable), data, options, the forgetting guard, checkpoints, caches — so that a
trainer plugin is only its objective: build a TRL trainer from the job and run it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.library.store import PocketBook
from adapterkit.training.data import Data, as_chat
from adapterkit.training.options import TrainOptions
from adapterkit.training.tracking import trackers_of


def versions() -> dict[str, str]:
    """The libraries a measurement's numbers depend on (a cached figure is not reused across
    an upgrade of them)."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def planned_steps(options: TrainOptions, rows: int, processes: int = 1) -> int:
    """Optimizer steps a run on ``rows`` training rows is set for (``max_steps``, else epochs
    over the rows, per global batch of every process): the trainer's own count, before
    packing."""
    import math

    if options.max_steps > 0:
        return options.max_steps
    per_step = options.batch_size * options.grad_accum * processes
    epochs = 1.0 if options.epochs is None else options.epochs  # (None: not yet resolved)
    return max(1, math.ceil(epochs * math.ceil(rows / per_step)))


if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.base.load import Base
    from adapterkit.training.guard import ForgettingGuard


@dataclass
class TrainJob:
    """Everything a trainer plugin needs; passed as ``Trainer.train(job=...)``.

    ``model`` is a PEFT model whose only trainable parameters are the new pocket book's; the
    base is frozen (and quantized, for ``qlora``). It is built on first use, so a trainer can
    first train other pocket books it needs on the same resident base (:meth:`train_stage`).
    """

    build: Callable[[], Any]
    tokenizer: Any
    data: Data
    eval_data: Data | None
    options: TrainOptions
    chat: bool
    output_dir: Path
    resume_from: str | None
    #: The trainer's own options: an instance of its ``Trainer.options`` dataclass, typed and
    #: checked before any work (``None`` for a trainer that declares none). What was given, as
    #: given, stays in ``options.trainer_options`` (and is recorded in the metadata).
    trainer_options: Any = None
    callbacks: list[Any] = field(default_factory=list)
    guard: ForgettingGuard | None = None
    base: Base | None = None
    #: The frozen pocket books underneath (``--on``), bottom first: part of the reference.
    stacked_on: list[PocketBook] = field(default_factory=list)
    #: The pocket book this one starts as a copy of (``--from``): the policy before this stage
    #: is it, so it is part of the reference too.
    start: PocketBook | None = None
    #: The library home: trainers keep caches under ``cache_dir()``.
    home: Path | None = None
    #: The new pocket book's ``name@version``.
    name: str = ""
    stage_runner: Callable[..., Any] | None = None
    #: The trackers' name for this run (``NAME@V-<time>``; kept by ``--resume``).
    run_name: str = ""
    #: :meth:`base_text_loss` calls by phase: whether the value came from the cache.
    cache_reads: dict[str, bool] = field(default_factory=dict)
    #: Tell the user one line, where the run's progress goes (nothing on other processes
    #: of a multi-process run): e.g. that the trainer reads fewer rows than the file holds.
    say: Callable[[str], None] = field(default=lambda message: None)
    _model: Any = None

    @property
    def precision(self) -> str:
        """``bf16``, ``fp16`` or ``fp32``: what the steps compute in — ``bf16`` when they run
        under bf16 autocast (a bf16 base; on a GPU with bf16, as adapterkit always trained
        there, unless ``--precision fp32``), else the dtype the frozen base computes in."""
        import torch

        from adapterkit.training.build import base_dtype
        from adapterkit.training.precision import name_of

        held = name_of(base_dtype(self.base)) if self.base else "fp32"
        on_gpu = self.base is not None and str(self.base.model.device).startswith("cuda")
        if on_gpu and torch.cuda.is_bf16_supported() and self.options.precision != "fp32":
            return "bf16"
        return held

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = self.build()
        return self._model

    def train_stage(self, trainer: str, *, name: str, data: str | None = None,
                    options: TrainOptions | None = None) -> TrainResult:
        """Train and save another pocket book first, on the same resident base (e.g. the reward
        pocket book ``rlhf`` optimises against). Call before touching ``model``.

        :param data: its data (default: this run's data file).
        :param options: its options (default: this run's, without its guard and trainer
            options, and without a forgetting check where the run has ``general: off``).
            Given, they are taken as they are: ``general=None`` there means the stage
            trainer's default check (``sft`` measures one); pass ``general="off"`` for none.
        """
        if self._model is not None or self.stage_runner is None:
            raise RuntimeError("train_stage() must be called before job.model is first used")
        return self.stage_runner(trainer, name=name, data=data, options=options)

    def guarded(self, trainer_class: type) -> type:
        """``trainer_class`` (a transformers/TRL trainer) adding the forgetting guard's KL term
        to its training loss when this job carries one (a trainer that declares ``uses_guard``
        builds its trainer from this and passes :attr:`callbacks`)."""
        from adapterkit.training.guard import guarded

        return guarded(trainer_class, self.guard)

    def cache_dir(self, kind: str) -> Path:
        """A folder under the library home for a trainer's reusable results (e.g. ``dpo-ref``)."""
        from adapterkit.training.launch import ranks

        root = (self.home or self.output_dir.parent.parent) / "cache" / kind
        if ranks().is_main:  # only the main process writes caches
            root.mkdir(parents=True, exist_ok=True)
        return root

    def reference_key(self, **parts: Any) -> str:
        """A hash naming "the policy before this stage" plus ``parts`` (data hash, lengths...).

        Covers the base fingerprint, its precision, and the exact weights of every pocket book
        underneath and of the one this run starts from (``--from``), so a cache keyed by it is
        never reused for a different reference.
        """
        return self._key(start=True, **parts)

    def _key(self, *, start: bool, **parts: Any) -> str:
        import hashlib

        from adapterkit.files import sha256_file
        from adapterkit.library.metadata import WEIGHTS_FILE

        identity = {
            "base": self.base.fingerprint if self.base is not None else None,
            "quantization": self.base.quantization if self.base is not None else None,
            "dtype": str(getattr(self.model, "dtype", "")),
            "precision": self.precision,
            "under": [(b.ref, sha256_file(b.path / WEIGHTS_FILE)) for b in self.stacked_on],
            **parts,
        }
        if start and self.start is not None:  # (absent otherwise: other keys are unchanged)
            identity["start"] = (self.start.ref, sha256_file(self.start.path / WEIGHTS_FILE))
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()
                              ).hexdigest()[:32]

    def measurement_key(self, *, phase: str, **parts: Any) -> str:
        """:meth:`reference_key` plus what a measurement of the base runs under: the steps'
        autocast (``phase="steps"``), the device and attention, whether the resident weights are
        a rounded copy, the tokenizer files and the library versions. Without the pocket book a
        run starts from (``--from``): the base is measured with the new pocket book off."""
        from adapterkit.files import sha256_file

        model = self.model
        base = self.base
        tokenizer_files = sorted(p for p in base.source.folder.glob("*") if p.is_file() and
                                 ("token" in p.name or p.suffix == ".model")) if base else []
        return self._key(
            start=False, phase=phase, versions=versions(),
            autocast=phase == "steps" and self.precision == "bf16",
            device=str(next(model.parameters()).device.type),
            attention=getattr(getattr(model, "config", None), "_attn_implementation", None),
            rounded_from=str(base.rounded_from) if base else None,
            tokenizer=[(p.name, sha256_file(p)) for p in tokenizer_files], **parts)

    def _anchor_targets_path(self, guard: ForgettingGuard) -> Path:
        import hashlib

        ids = hashlib.sha256(json.dumps(guard.anchor).encode()).hexdigest()
        # v3: the base side computed in batched, right-padded forwards (v2: one chunk at a time;
        # the figures differ by round-off, and a cached entry must give what a fresh one gives)
        key = self.measurement_key(kind="guard-anchor", phase="steps", measure="top-k-v3",
                                   anchor=ids, top_k=guard.top_k)
        return self.cache_dir("guard-anchor") / f"{key}.safetensors"

    def load_anchor_targets(self, guard: ForgettingGuard) -> int:
        """Fill ``guard.targets`` with the base's anchor distributions an earlier run on this
        reference computed (:meth:`save_anchor_targets`); returns how many were read. Call it
        while training (the key is of what the steps compute)."""
        from adapterkit.training.guard import BaseTarget
        from adapterkit.training.launch import ranks, share

        path = guard.targets_path = self._anchor_targets_path(guard)
        targets: dict[int, BaseTarget] = {}
        if ranks().is_main and path.is_file():
            from safetensors.torch import load_file

            try:
                tensors = load_file(str(path))
                targets = {int(name.split(".", 1)[1]): BaseTarget(
                    tensors[name], tensors["logp" + name[5:]], tensors["rest" + name[5:]])
                    for name in tensors if name.startswith("index.")}
            except Exception:  # a damaged entry is computed again, and rewritten
                targets = {}
        if ranks().distributed:  # every rank the same chunks (under FSDP each base forward
            # that computes a missing one is collective)
            targets = share(targets)
        guard.targets.update(targets)
        return len(targets)

    def save_anchor_targets(self, guard: ForgettingGuard) -> None:
        """Write ``guard.targets`` into the library's cache when the run computed any (main
        process only; replaced whole, never half written)."""
        import os

        from safetensors.torch import save_file

        from adapterkit.training.launch import ranks

        if not guard.targets_computed or guard.targets_path is None or not ranks().is_main:
            return
        tensors = {}
        for chunk, t in guard.targets.items():
            tensors.update({f"index.{chunk}": t.index.cpu().contiguous(),
                            f"logp.{chunk}": t.logp.cpu().contiguous(),
                            f"rest.{chunk}": t.rest.cpu().contiguous()})
        path = guard.targets_path
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)

    def base_text_loss(self, texts: list[str], compute: Callable[[], float], *,
                       phase: str) -> float:
        """The plain base's loss on ``texts`` (the "before" of the forgetting figure), read from
        the library's cache when this reference already measured it, else ``compute()``d and
        cached (main process only). It does not change while pocket books are trained on that
        base, so a rerun, a sweep or the guard's first check need not pay for it again.

        :param phase: how it is measured (``steps``: as the training steps compute, under the
            run's precision; ``exact``: on the base as inference loads it), part of the key.
        """
        import hashlib
        import math

        from adapterkit.training.launch import ranks, share

        key = self.measurement_key(
            kind="general-loss", phase=phase, measure="text_loss-v1",
            texts=hashlib.sha256("\x00".join(texts).encode()).hexdigest())
        path = self.cache_dir("general-loss") / f"{key}.json"
        cached = None
        if ranks().is_main:
            try:
                value = json.loads(path.read_text(encoding="utf-8"))["loss"]
                cached = value if isinstance(value, float) and math.isfinite(value) else None
            except (OSError, ValueError, KeyError, TypeError):
                pass
        if ranks().distributed:  # one choice for all ranks (the forward may be collective)
            cached = share(cached)
        self.cache_reads[phase] = cached is not None
        if cached is not None:
            return float(cached)
        value = float(compute())
        if ranks().distributed:  # the main one's figure on every rank, as when it is cached
            value = float(share(value))
        if ranks().is_main and math.isfinite(value):
            import os

            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"loss": value}), encoding="utf-8")
            os.replace(tmp, path)  # never half an entry
        return value

    def rows(self, data: Data) -> list[dict[str, Any]]:
        """Rows as the trainer should see them: chat-rendered for chat bases."""
        if data.shape == "messages" or (self.chat and data.shape != "text"):
            return [as_chat(r) for r in data.rows]
        return data.rows

    def train_dataset(self) -> Any:
        from datasets import Dataset

        return Dataset.from_list(self.rows(self.data))

    @property
    def early_stopping(self) -> int:
        """Patience of early stopping on the eval split; 0 when off (no split, or asked off).
        With the forgetting guard on too, the guard checks its budget on the best evaluation's
        weights (and falls back to an earlier snapshot when they are over it)."""
        from adapterkit.training.early_stop import patience_of
        from adapterkit.training.launch import fsdp_enabled

        return patience_of(self.options.early_stopping, self.eval_data is not None,
                           sharded=fsdp_enabled())

    def planned_steps(self) -> int:
        """Optimizer steps this run is set for, over all its ranks (:func:`planned_steps`)."""
        from adapterkit.training.launch import ranks

        return planned_steps(self.options, len(self.data.rows), ranks().world_size)

    def eval_dataset(self) -> Any:
        from datasets import Dataset

        return None if self.eval_data is None else Dataset.from_list(self.rows(self.eval_data))

    def configure(self, trainer: Any) -> Any:
        """Call with the transformers/TRL trainer before ``train()``: swaps transformers' own
        console printing for adapterkit's progress bar when one is attached, and where TRL made
        a frozen copy of a pocket book that starts at zero as its reference (DPO, GRPO, RLOO,
        KTO), takes the reference with the pocket book switched off instead: the same logits
        without the copy's matmuls (:mod:`adapterkit.training.reference`). A TRL trainer's
        draft model card, which it writes into the run folder at every checkpoint (importing
        trackio to tag it), is not written: the run folder goes when the run ends, and the
        pocket book gets adapterkit's card."""
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from adapterkit.training.reference import drop_zero_start_copy

        if any(type(cb).__name__ == "RichProgress" for cb in self.callbacks):
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
        model = getattr(trainer, "model", None)
        if model is not None and getattr(trainer, "ref_model", None) is None:
            unwrap = getattr(getattr(trainer, "accelerator", None), "unwrap_model", None)
            drop_zero_start_copy(unwrap(model) if unwrap else model)
        out = getattr(getattr(trainer, "args", None), "output_dir", None)
        if callable(getattr(trainer, "create_model_card", None)) \
                and callable(getattr(trainer, "_save_checkpoint", None)) and out is not None \
                and Path(out).resolve() == Path(self.output_dir).resolve():
            # 0.44 s of the first checkpoint on 2 cores (cProfile), inside the trainer's loop;
            # only at checkpoints: a plugin's own push_to_hub still writes its card
            if not getattr(trainer._save_checkpoint, "_adapterkit_no_card", False):
                trainer._save_checkpoint = _without_model_card(trainer, trainer._save_checkpoint)
        return trainer

    def training_arguments(self) -> dict[str, Any]:
        """``TrainingArguments`` keywords shared by every trainer (TRL configs accept them).

        Under a launcher the trainer shards the data between the ranks (each takes its part of
        every global batch of ``batch_size × grad_accum × processes`` rows, in one seeded
        order) and only the main process writes checkpoints.
        """
        import torch

        from adapterkit.training.launch import COLLECTIVE_TIMEOUT

        o = self.options
        cuda = torch.cuda.is_available()
        evaluate: dict[str, Any] = dict(
            eval_strategy="steps" if self.eval_data is not None else "no",
            eval_steps=o.save_steps if self.eval_data is not None else None)
        # about ten evaluations a run (early stopping sets the cadence again from the trainer's
        # own step count, which packing changes); the best is tracked on eval loss
        if self.early_stopping:
            from adapterkit.training.early_stop import eval_every

            evaluate.update(eval_steps=eval_every(self.planned_steps(), o.save_steps),
                            metric_for_best_model="eval_loss", greater_is_better=False)
        return dict(
            output_dir=str(self.output_dir),
            per_device_train_batch_size=o.batch_size,
            per_device_eval_batch_size=o.batch_size,
            gradient_accumulation_steps=o.grad_accum,
            learning_rate=o.learning_rate,
            num_train_epochs=1.0 if o.epochs is None else o.epochs,  # (None: max_steps runs)
            max_steps=o.max_steps,
            lr_scheduler_type="linear",
            # the last step is logged too (training.progress.last_step_logged): a run shorter
            # than the interval logged no loss, a longer one left its last steps out
            logging_steps=o.logging_steps,
            save_strategy="steps",
            save_steps=o.save_steps,
            save_total_limit=2,
            **evaluate,
            seed=o.seed,
            data_seed=o.seed,
            # transformers' integrations log; where they write was set up by the run
            # (adapterkit.training.tracking): nothing is sent anywhere unless asked
            report_to=trackers_of(o.report_to),
            run_name=self.run_name or self.name or None,
            project="adapterkit",  # trackio's project
            # the base was loaded in the run's precision (adapterkit.training.precision):
            # on bfloat16 weights each step runs under autocast, on CPU and GPU alike
            bf16=self.precision == "bf16",
            fp16=False,
            use_cpu=not cuda,
            gradient_checkpointing=o.gradient_checkpointing,
            disable_tqdm=True,
            include_num_input_tokens_seen="non_padding",
            dataloader_pin_memory=cuda,
            remove_unused_columns=True,
            # every trainable LoRA weight takes part in each step: DDP need not search the
            # graph for unused ones (it warns about the extra pass, and gradient
            # checkpointing refuses it)
            ddp_find_unused_parameters=False,
            ddp_timeout=COLLECTIVE_TIMEOUT,
        )


@dataclass
class TrainResult:
    """A finished run: the saved pocket book, its metrics, and ``model``, the trained PEFT
    model on the resident base — which it holds (sessions, ``peft_model`` and another
    ``train`` on that base are refused) until ``result.model.unload()``."""

    pocket_book: PocketBook
    metrics: dict[str, Any]
    #: The trained PEFT model, still resident (the base with the new pocket book active).
    model: Any = None


def _without_model_card(trainer: Any, save_checkpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``save_checkpoint`` (a trainer's bound ``_save_checkpoint``) with the trainer's
    ``create_model_card`` doing nothing while it runs (:meth:`TrainJob.configure`)."""

    def without(*args: Any, **kwargs: Any) -> Any:
        own = trainer.__dict__.get("create_model_card")  # one set on the instance, if any
        trainer.create_model_card = _no_model_card
        try:
            return save_checkpoint(*args, **kwargs)
        finally:
            if own is None:
                del trainer.create_model_card  # the class's own again
            else:
                trainer.create_model_card = own
    without._adapterkit_no_card = True  # type: ignore[attr-defined]
    return without


def _no_model_card(*args: Any, **kwargs: Any) -> None:
    """Stands in for a TRL trainer's ``create_model_card`` at a run's checkpoints."""
