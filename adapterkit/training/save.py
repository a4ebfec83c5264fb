"""What a finished run leaves: its metrics, and the pocket book written into the library (the
PEFT folder, loss curve and card, committed atomically), from one process or from the main
one of several."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import RunStateError
from adapterkit.files import atomic_write_text
from adapterkit.library.metadata import CONFIG_FILE, PocketBookMeta
from adapterkit.library.names import parse_ref
from adapterkit.library.store import Library, PocketBook
from adapterkit.training.data import Data
from adapterkit.training.options import TrainOptions

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.base.load import Base


LOSS_CURVE = "loss_curve.png"
#: In a run's folder: what defines the run (:func:`definition_of`), written when it starts, so
#: that ``--resume`` continues a run only with what its checkpoints were trained with.
DEFINITION_FILE = "definition.json"
#: Options a resume may change: they change nothing the steps compute — when checkpoints are
#: written, how often the loss is logged, where it is reported, whether activations are
#: recomputed to save memory. ``min_steps`` acts only as a run starts, on the epochs it
#: resolves, which are compared (a resume keeps the checkpoint's). ``precision``: ``auto``
#: and the dtype it resolves to are one precision; what the steps compute in is compared once
#: the base is loaded (:func:`adapterkit.training.precision.check_resume`).
MAY_CHANGE_ON_RESUME = ("save_steps", "logging_steps", "report_to", "gradient_checkpointing",
                        "min_steps", "precision")


def history_of(state: Any) -> list[dict[str, Any]]:
    return list(getattr(state, "log_history", []) or [])


def resumed_at(checkpoint: str | None) -> dict[str, int] | None:
    """Where a run resumed from ``checkpoint`` starts: the step and tokens seen there (read
    before training, which may rotate the checkpoint away)."""
    if not checkpoint:
        return None
    try:
        saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        return {k: int(saved.get(k) or 0) for k in ("global_step", "num_input_tokens_seen")}
    except (OSError, ValueError, TypeError, AttributeError):  # (an incomplete checkpoint is
        return None  # refused before training: run._checkpoint)


def definition_of(trainer: str, options: TrainOptions, data: Data, *,
                  texts: dict[str, list[str] | None], parent: str | None) -> dict[str, Any]:
    """What defines a run, as its pocket book's metadata records it: the trainer, every option
    but those a resume may change (:data:`MAY_CHANGE_ON_RESUME`), the data by its content, the
    general and anchor ``texts`` by theirs (a path names a file that may change), and the
    pocket book it trains on or continues (``parent``)."""
    defined: dict[str, Any] = {k: v for k, v in options.as_dict().items()
                               if k not in MAY_CHANGE_ON_RESUME}
    for key, rows in texts.items():
        if rows is not None:
            defined[key] = "sha256:" + hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    # as JSON reads it back; a copy (trainers record values in trainer_options as they train)
    return dict(json.loads(json.dumps({"trainer": trainer, "data": "sha256:" + data.sha256,
                                       "parent": parent, **defined}, default=str)))


def record_definition(workdir: Path, definition: dict[str, Any]) -> None:
    """Record, as a run starts, what defines it (for :func:`check_definition`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / DEFINITION_FILE, json.dumps(definition, indent=1, sort_keys=True))


def check_definition(workdir: Path, definition: dict[str, Any], name: str, *,
                     checkpoint: str, staged: frozenset[str] = frozenset(),
                     trainer_defaults: dict[str, Any] | None = None) -> None:
    """Refuse to resume the run in ``workdir`` from ``checkpoint`` with another definition than
    it started with: its first steps were trained with those, and the pocket book's metadata
    would record these. A run folder of an earlier version has no record: its checkpoint's
    LoRA config is compared (rank and alpha), where transformers would end in a "size
    mismatch" traceback (rank) or go on with another scaling (alpha).

    :param staged: the options a resume may change, the run having trained a stage first
        (rlhf's reward pocket book): the trainer's ``reuse_option`` and ``reuse_drops`` — a
        resume names the stage's pocket book (``--reward NAME-reward``) and leaves out what
        configured the stage (``reward_steps``, ``eval_split``). Every other option is
        compared, a trainer option given on one side only included.
    :param trainer_defaults: the trainer's own options' defaults: a trainer option given on
        one side at its default value (``--set beta=0.1``) is no change, as ``--lr 2e-4``
        is none.
    """
    path = workdir / DEFINITION_FILE
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        shape = _lora_shape(checkpoint)
        _refuse_changed(name, shape, {k: shape[k] if definition.get(k) is None
                                      else definition[k] for k in shape})
        return
    except (OSError, ValueError) as exc:
        raise RunStateError(f"cannot read what the interrupted run of {name} was started with "
                            f"({path}: {exc}); pass --restart to start over") from None
    if not isinstance(recorded, dict):
        raise RunStateError(f"cannot read what the interrupted run of {name} was started with "
                            f"({path} holds no record); pass --restart to start over")
    now, recorded = dict(definition), dict(recorded)
    for side in (recorded, now) if staged else ():
        for key in staged:  # (a training option, or one of the trainer's own)
            side.pop(key, None)
        if isinstance(side.get("trainer_options"), dict):
            side["trainer_options"] = {k: v for k, v in side["trainer_options"].items()
                                       if k not in staged}
    if trainer_defaults:
        defaults = json.loads(json.dumps(trainer_defaults, default=str))  # as JSON reads them
        for side in (recorded, now):
            given = side.get("trainer_options")
            if isinstance(given, dict):
                side["trainer_options"] = {**defaults, **given}
            elif given is None and "trainer_options" in side:
                side["trainer_options"] = dict(defaults)
    _refuse_changed(name, recorded, now)


def _refuse_changed(name: str, recorded: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse the resume where ``now`` differs from what the run ``recorded``, listing each."""
    changed = []
    for key in sorted(set(recorded) | set(now)):
        old, new = recorded.get(key), now.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):  # (trainer_options): what
            inner = [k for k in sorted(set(old) | set(new))  # differs in them
                     if (k in old, old.get(k)) != (k in new, new.get(k))]
            changed += [f"{key}.{k} {_shown(old.get(k))} → {_shown(new.get(k))}" for k in inner]
        else:
            changed.append(f"{key} {_shown(old)} → {_shown(new)}")
    if changed:
        raise RunStateError(f"the interrupted run of {name} was started with other settings: "
                            f"{'; '.join(changed)}; resume with the same settings, or pass "
                            "--restart to start over")


def _lora_shape(checkpoint: str) -> dict[str, Any]:
    """``{"r", "alpha"}`` as ``checkpoint``'s LoRA config has them, as a definition names them
    (empty where it cannot be read: the resume then goes on as it did)."""
    try:
        config = json.loads((Path(checkpoint) / CONFIG_FILE).read_text(encoding="utf-8"))
        return {"r": config["r"], "alpha": config["lora_alpha"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _shown(value: Any) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return f"{value[:19]}…"  # a file's content: enough of its hash to tell two apart
    return json.dumps(value, ensure_ascii=False)


def finished_at(checkpoint: str, max_steps: int) -> int | None:
    """The step of ``checkpoint`` when it is its run's last (``max_steps``, else the one the
    run set out for, as transformers recorded it), else None."""
    try:
        saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        step, last = int(saved["global_step"]), max_steps if max_steps > 0 else \
            int(saved["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if 0 < last <= step else None


def metrics_of(state: Any, elapsed: float, resumed: dict[str, int] | None = None
               ) -> dict[str, Any]:
    """The run's figures from the trainer's state. ``steps`` and ``tokens`` count from the
    start of training; a run resumed where :func:`resumed_at` says took only the steps and
    tokens since, in its loop's seconds, so its tokens/s is of those (``resumed_at_step``)."""
    history = history_of(state)
    losses = [h["loss"] for h in history if "loss" in h]
    kls = [h["guard_kl"] for h in history if "guard_kl" in h]  # guarded runs (training.guard)
    tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
    # The trainer's own clock (its training loop only, as a plain TRL script reports it);
    # ``train_seconds`` is the whole call, data preparation included.
    loop = next((float(h["train_runtime"]) for h in reversed(history) if "train_runtime" in h),
                elapsed)
    before = resumed or {"global_step": 0, "num_input_tokens_seen": 0}
    tokens_now = tokens - before["num_input_tokens_seen"]
    return {
        # anything a trainer plugin wants recorded (``state.adapterkit_metrics``)
        **dict(getattr(state, "adapterkit_metrics", None) or {}),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_final": losses[-1] if losses else None,
        "loss_logs": len(losses),  # (1: first and final are the same logged window)
        "steps": int(getattr(state, "global_step", 0) or 0),
        # passes over the training rows (fractional: where max_steps ends the run mid-epoch)
        "epochs_trained": round(float(getattr(state, "epoch", 0) or 0), 4),
        "train_seconds": round(elapsed, 2),
        "loop_seconds": round(loop, 2),
        "tokens": tokens,
        "tokens_per_second": round(tokens_now / loop, 1) if loop > 0 and tokens_now > 0
        else None,
        **({"resumed_at_step": before["global_step"]} if resumed else {}),
        # the forgetting guard's KL divergence to the base on its anchor text, as logged
        **({"guard_kl_first": kls[0], "guard_kl_final": kls[-1]} if kls else {}),
    }


def kept_weights(state: Any, metrics: dict[str, Any], stopped: dict[str, Any] | None
                 ) -> dict[str, Any]:
    """Where the saved weights are not the last step's — the forgetting guard fell back to an
    earlier snapshot, or early stopping restored its best evaluation's — the step they are of
    (``weights_step``) and the training loss logged last at or before it
    (``train_loss_kept``, at ``train_loss_kept_step``; None where no loss was logged by
    then). ``train_loss_final`` and ``steps`` stay the run's last step's, which the card and
    the run's line then say were not kept. Empty where the last step's weights are saved."""
    guard = metrics.get("guard") or {}
    kept, by = (guard.get("kept_step"), "the forgetting guard's fallback") \
        if guard.get("restored") else (stopped.get("best_step"), "early stopping's best") \
        if stopped and stopped.get("restored_best") else (None, None)
    if kept is None or kept >= int(metrics.get("steps", 0) or 0):
        return {}
    logged = [(h["step"], h["loss"]) for h in history_of(state)
              if "loss" in h and "step" in h and h["step"] <= kept]
    return {"weights_step": int(kept), "weights_kept_by": by,
            "train_loss_kept": logged[-1][1] if logged else None,
            "train_loss_kept_step": logged[-1][0] if logged else None}


def adapter_base_id(base: Base) -> str:
    """What ``base_model_name_or_path`` says in saved adapters: a Hub id where there is one."""
    prov = base.source.provenance
    return prov.get("hub_id") or prov.get("derived_from") or base.name


def save_trained(library: Library, model: Any, base: Base, name: str, *, trainer: str,
                 options: TrainOptions, data: Data, metrics: dict[str, Any],
                 log_history: list[dict[str, Any]], parents: list[str] | None = None,
                 stacked_on: list[str] | None = None,
                 stacked_on_sha256: dict[str, str] | None = None,
                 weights: dict[str, Any] | None = None,
                 annotate: Callable[[PocketBookMeta], None] | None = None,
                 tracking: dict[str, Any] | None = None) -> PocketBook:
    """Write the trained adapter, loss curve and card into the library, atomically.

    :param weights: the model's whole state dict, where the model holds only shards of it
        (FSDP); PEFT picks the pocket book's tensors from it.
    :param annotate: adds to the metadata before the card is written and the entry committed.
    :param tracking: where the run's experiment trackers wrote (``--report-to``).
    """
    from adapterkit.library.card import loss_curve_png, write_card

    meta = PocketBookMeta(
        name=name, version=0, base=base.identity(), method=options.method, trainer=trainer,
        data=data.describe(), hyperparameters=hyper_of(options), metrics=metrics,
        parents=list(parents or []), stacked_on=list(stacked_on or []),
        stacked_on_sha256=dict(stacked_on_sha256 or {}),
        tracking=dict(tracking or {}),
    )
    with library.draft() as staged:
        # the pocket book alone: not an adapter named "ref", the name of the frozen copy a TRL
        # trainer adds as its reference (the copy of a --from start, where it was kept)
        from adapterkit.training.reference import COPY

        model.save_pretrained(staged, selected_adapters=[a for a in model.peft_config if a != COPY],
                              **({"state_dict": weights} if weights else {}))
        config_path = staged / CONFIG_FILE
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = adapter_base_id(base)  # never a local path
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        if loss_curve_png(log_history, staged / LOSS_CURVE, metrics.get("weights_step")):
            meta.metrics["loss_curve"] = LOSS_CURVE
        # the same curve as numbers, for whatever draws it itself (the serve page)
        points = [[h["step"], h["loss"]] for h in log_history
                  if isinstance(h.get("step"), int) and isinstance(h.get("loss"), (int, float))]
        if points:
            meta.metrics["loss_history"] = points
        book_name = name
        if annotate is not None:
            ref = parse_ref(name)  # what commit records for a free name (it refuses a taken one)
            meta.name, meta.version = ref.name, library.version_to_save(ref)
            annotate(meta)
        write_card(staged, meta)
        return library.commit(staged, meta, name=book_name, run=True)


def hyper_of(options: TrainOptions) -> dict[str, Any]:
    keep = ("r", "alpha", "dropout", "target_modules", "learning_rate", "epochs", "min_steps",
            "max_steps", "batch_size", "grad_accum", "max_length", "packing", "seed", "eval_split",
            "forgetting_budget", "guard_weight", "chat", "trainer_options")
    hyper = {k: getattr(options, k) for k in keep}
    if options.max_steps > 0:  # transformers then ignores num_train_epochs: none was set
        hyper["epochs"] = None
    return hyper


def adapter_to_fp32(model: Any) -> None:
    """Hold the trained pocket book in float32, as PEFT holds it after loading.

    TRL trains QLoRA adapters in bfloat16 (following the QLoRA paper) and PEFT upcasts adapters
    to float32 when it loads them; without this, the resident model and a reload of the saved
    pocket book would give slightly different logits.
    """
    import torch

    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def whole_weights(model: Any) -> dict[str, Any] | None:
    """The model's state dict gathered whole on every rank when its weights are sharded
    (FSDP 2 holds each as a ``DTensor`` shard; every rank must join), else ``None``: each
    rank holds them whole (one process, DDP) and PEFT reads the model itself."""
    if not any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def checksum(model: Any) -> list[float]:
    """Sums of this rank's trainable weights (float64): data-parallel ranks that trained in
    step hold the very same ones (every rank applies the same averaged gradients)."""
    import torch

    with torch.no_grad():
        return [float(p.detach().double().sum()) for p in model.parameters()
                if p.requires_grad]


def same_weights(a: list[float] | None, b: list[float] | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in zip(a, b))
