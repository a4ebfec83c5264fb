"""Early stopping on the held-out split: stop when the eval loss has not improved for
``patience`` evaluations, and end with the pocket book of the best evaluation.

The stopping rule is transformers' own :class:`~transformers.EarlyStoppingCallback` (patience,
threshold, its state saved in checkpoints). What it leaves to ``load_best_model_at_end`` is done
here instead, for two reasons: that option ties the checkpoint cadence to the evaluation cadence
(we evaluate about ten times a run, while ``--save-steps`` stays what ``--resume`` needs), and it
reloads the best checkpoint with ``load_adapter`` into ``active_adapters[0]`` — with pocket
books underneath (``--on``) that need not be the one being trained. So the trainable weights of
the best evaluation are kept in memory (a LoRA: a few MB), written beside each checkpoint so a
``--resume`` keeps them, and copied back when training ends.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

#: Patience when an eval split exists and ``early_stopping`` is not given.
DEFAULT_PATIENCE = 3
#: About this many evaluations per run (at most ``save_steps`` apart).
EVALUATIONS_PER_RUN = 10
#: Beside each checkpoint: the best evaluation's trainable weights and its record.
BEST_WEIGHTS = "adapterkit-best.safetensors"
BEST_RECORD = "adapterkit-best.json"


def patience_of(early_stopping: int | None, has_eval: bool, *, sharded: bool = False) -> int:
    """Evaluations without improvement before stopping; 0 when early stopping is off: no eval
    split, asked off, or (by default) weights sharded by FSDP, whose shards this callback does
    not gather — asked for there, it is refused."""
    if not has_eval or early_stopping == 0:
        return 0
    if sharded:
        if early_stopping is not None:
            from adapterkit.errors import ConfigError

            raise ConfigError("--early-stopping keeps the best weights in memory, which FSDP "
                              "shards; train with DDP, or leave --early-stopping out")
        return 0
    return DEFAULT_PATIENCE if early_stopping is None else early_stopping


def eval_every(planned_steps: int, save_steps: int) -> int:
    """Steps between evaluations: about :data:`EVALUATIONS_PER_RUN` a run, at most
    ``save_steps`` apart, at least one step."""
    return max(1, min(save_steps, math.ceil(planned_steps / EVALUATIONS_PER_RUN)))


def callback(patience: int, resume_from: str | None = None) -> Any:
    """The run's early-stopping callback (a transformers ``TrainerCallback``; its ``record``
    goes into the metadata as ``metrics.early_stopping``).

    :param patience: evaluations without a lower eval loss before training stops.
    :param resume_from: the checkpoint a resumed run continues from (its best weights are read
        back from there).
    """
    return _class()(patience, resume_from)


def record_of(callbacks: list[Any]) -> dict[str, Any] | None:
    """The early-stopping record among a run's callbacks, if it evaluated at all (a stage
    that does not evaluate, rlhf's policy, has none)."""
    return next((dict(cb.record) for cb in callbacks
                 if getattr(cb, "is_early_stopping", False) and cb.record["evaluations"]), None)


@functools.cache
def _class() -> type:
    """Defined on first use: transformers (and torch) are imported only by runs that train."""
    from transformers import EarlyStoppingCallback

    class EarlyStopping(EarlyStoppingCallback):
        """transformers' early stopping, keeping the best evaluation's trainable weights."""

        is_early_stopping = True

        def __init__(self, patience: int, resume_from: str | None = None) -> None:
            super().__init__(early_stopping_patience=patience)
            self.resume_from = resume_from
            self.best: dict[str, Any] | None = None  # parameter name → CPU copy
            self.record: dict[str, Any] = {"patience": patience, "evaluations": 0,
                                           "best_step": None, "best_eval_loss": None,
                                           "stopped_at_step": None, "restored_best": False}

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                           **kwargs: Any) -> None:
            if _strategy(args) == "no":
                return  # a stage that does not evaluate (rlhf's policy): recorded, 0 evaluations
            super().on_train_begin(args, state, control, **kwargs)
            # the cadence from the trainer's own step count: the run's options foresee the
            # steps only before packing, which makes fewer, longer rows
            if _strategy(args) == "steps" and state.max_steps > 0:
                state.eval_steps = eval_every(state.max_steps, args.save_steps)
            self.record["eval_every"] = state.eval_steps
            if self.resume_from:
                self._read(Path(self.resume_from))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            """Evaluate at the last step too, so the steps after the last scheduled evaluation
            are judged rather than thrown away by the restore."""
            # (transformers 5.24's own flow does this too for "steps"; earlier 5.x did not)
            if state.max_steps and state.global_step >= state.max_steps and \
                    _strategy(args) == "steps":
                control.should_evaluate = True

        # (EarlyStoppingCallback's own signature already narrows TrainerCallback's)
        def on_evaluate(self, args: Any, state: Any, control: Any,  # type: ignore[override]
                        metrics: Any, **kwargs: Any) -> None:
            loss = (metrics or {}).get("eval_loss")
            model = kwargs.get("model")
            if loss is None:
                return
            super().on_evaluate(args, state, control, metrics, **kwargs)
            self.record["evaluations"] += 1
            if self.early_stopping_patience_counter == 0 and model is not None:  # a new best
                from peft import get_peft_model_state_dict

                # the pocket book's weights, as the forgetting guard keeps them (on the CPU)
                self.best = {k: v.detach().to("cpu", copy=True)
                             for k, v in get_peft_model_state_dict(
                                 model, save_embedding_layers=False).items()}
                self.record.update(best_step=state.global_step, best_eval_loss=float(loss))
            elif self.early_stopping_patience_counter >= self.early_stopping_patience:
                self.record["stopped_at_step"] = state.global_step

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.best is None or not state.is_world_process_zero:
                return
            from safetensors.torch import save_file

            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                save_file({n: t.contiguous() for n, t in self.best.items()},
                          str(folder / BEST_WEIGHTS))
                (folder / BEST_RECORD).write_text(json.dumps(
                    {**self.record, "counter": self.early_stopping_patience_counter}))

        def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None,
                         **kwargs: Any) -> None:
            """Copy the best evaluation's weights back, unless the model already holds them."""
            if self.best is None or model is None or self.record["best_step"] == state.global_step:
                return
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, self.best)
            self.record["restored_best"] = True

        def _read(self, checkpoint: Path) -> None:
            """A resumed run's best so far, as its checkpoint recorded it (our own file, written
            by this run's earlier process: safetensors, never a pickle)."""
            if not (checkpoint / BEST_WEIGHTS).is_file() or not (checkpoint / BEST_RECORD).is_file():
                return
            from safetensors.torch import load_file

            self.best = load_file(str(checkpoint / BEST_WEIGHTS))
            saved = json.loads((checkpoint / BEST_RECORD).read_text())
            self.record.update({k: saved[k] for k in ("evaluations", "best_step", "best_eval_loss")
                                if k in saved})
            self.early_stopping_patience_counter = int(saved.get("counter", 0))

    return EarlyStopping


def _strategy(args: Any) -> str:
    """``args.eval_strategy`` as its string (``no``, ``steps``, ``epoch``)."""
    return str(getattr(args.eval_strategy, "value", args.eval_strategy))
