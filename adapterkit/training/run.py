"""Training a pocket book: the core's side of ``adapterkit train``.

The core prepares everything that does not depend on the objective — options, data, the frozen
base in the method's precision, the new LoRA on it, checkpoints, the forgetting guard — hands a
:class:`TrainJob` to the trainer plugin, then measures the result and saves it into the library
atomically with its metadata, metrics, loss curve and model card. Trainers and methods are two
registries, so every trainer works with every method.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import ConfigError, DataFormatError, LaunchError
from adapterkit.library.metadata import CONFIG_FILE, PocketBookMeta
from adapterkit.library.peft_folder import read_config
from adapterkit.library.store import Library, PocketBook
from adapterkit.training.data import Data, as_chat, general_text_path, load_data, read_rows
from adapterkit.training.job import TrainJob, TrainResult
from adapterkit.training.metrics import forgetting, task_loss, uses_chat
from adapterkit.training.options import TrainOptions, build_trainer_options, check_options

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.base.load import Base
    from adapterkit.plugin_api.manager import PluginManager
    from adapterkit.training.guard import ForgettingGuard

ANCHOR_FILE = "anchor.txt"
LOSS_CURVE = "loss_curve.png"
#: KL weight used with a forgetting budget when none is given. Measured on the quickstart
#: (SmolLM2-135M, lr 1e-3, 30 steps): 0.3 kept 100% held-out accuracy and moved general-text
#: loss by +0.3% (plain run: +5.5%); 1.0 held forgetting at -0.2% but cut accuracy to 48%.
DEFAULT_GUARD_WEIGHT = 0.3


def _texts(spec: str) -> list[str]:
    rows, source, _ = read_rows(spec)
    texts = [r["text"] for r in rows if isinstance(r.get("text"), str) and r["text"].strip()]
    if not texts:
        raise DataFormatError(f"{source} has no text rows for a general-text check")
    return texts


def _split(data: Data, fraction: float, seed: int) -> tuple[Data, Data | None]:
    if fraction <= 0:
        return data, None
    rows = list(data.rows)
    random.Random(seed).shuffle(rows)
    n_eval = max(1, int(len(rows) * fraction))
    if n_eval >= len(rows):
        raise ConfigError(f"eval_split {fraction} leaves no training rows out of {len(rows)}")
    evals, train = rows[:n_eval], rows[n_eval:]
    return (Data(train, data.shape, data.source, data.sha256, data.format, data.columns),
            Data(evals, data.shape, data.source + " [eval split]", data.sha256, data.format))


def check_lengths(tokenizer: Any, job_rows: list[dict[str, Any]], max_length: int,
                  chat: bool) -> None:
    """Refuse a max length that leaves no room for the completion of some prompt."""
    from adapterkit.training.metrics import render_prompt

    for i, row in enumerate(job_rows, 1):
        if "prompt" not in row:
            continue
        prompt = render_prompt(tokenizer, row["prompt"], chat=chat)
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n >= max_length:
            raise ConfigError(
                f"max_length {max_length} is not longer than prompt {i} ({n} tokens): nothing "
                f"of its completion would be trained on. Raise --max-length above {n}"
            )


def run_dir(library: Library, name: str) -> Path:
    return library.home / "runs" / name


def train(trainer: str, *, base: str | Base, data: str, name: str,
          options: TrainOptions | None = None, home: str | os.PathLike[str] | None = None,
          plugins: PluginManager | None = None, resume: bool = False, restart: bool = False,
          callbacks: list[Any] | None = None, on: str | None = None,
          start_from: str | None = None,
          progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train a new pocket book and save it into the library.

    Under a launcher (``adapterkit train --processes N``, ``accelerate launch``, ``torchrun``)
    every rank calls this: they train together, only the main process writes, and every rank
    returns the same result.

    :param trainer: a registered trainer (``sft``...).
    :param base: base name (or an already loaded :class:`Base`).
    :param data: data file or Hub dataset id.
    :param name: library name, ``NAME`` or ``NAME@N``; refused before training if taken.
    :param resume: continue an interrupted run of ``name`` from its last checkpoint.
    :param restart: discard an interrupted run of ``name`` and start over.
    :param callbacks: extra transformers ``TrainerCallback`` objects (e.g. a progress bar).
    :param on: train on top of this pocket book: it stays frozen and active underneath (with
        its own underlay), is the reference for DPO/RL, and is recorded as the parent.
    :param start_from: continue training a copy of this pocket book (its LoRA settings win).
    """
    from adapterkit.plugin_api.manager import default_plugin_manager
    from adapterkit.training.launch import join, ranks, wait_for_everyone

    where = ranks()
    if where.distributed:
        join()  # the process group the trainer will use; barriers work from here on
    say = (progress if where.is_main else None) or (lambda message: None)
    run = _prepare(trainer, base=base, data=data, name=name, options=options, home=home,
                   plugins=plugins or default_plugin_manager(), resume=resume,
                   restart=restart, callbacks=callbacks, on=on, start_from=start_from,
                   say=say, main=where.is_main)
    if where.distributed:
        wait_for_everyone()  # the main process has cleared an old run's folder
    start = time.perf_counter()
    state = _run(run)
    if where.distributed:
        return _finalize_shared(run, state, time.perf_counter() - start, main=where.is_main)
    return _finalize(run, state, time.perf_counter() - start)


def check_train(trainer: str, *, base: str, data: str, name: str,
                options: TrainOptions | None = None, home: str | os.PathLike[str] | None = None,
                plugins: PluginManager | None = None, resume: bool = False,
                restart: bool = False, on: str | None = None,
                start_from: str | None = None) -> None:
    """Refuse, before any process starts, what :func:`train` would refuse before loading the
    base: options, name, data, parent, checkpoint state; and resolve the base (a GGUF file is
    converted here, once, rather than by every rank). Writes nothing else."""
    from adapterkit.base.resolve import resolve_base
    from adapterkit.plugin_api.manager import default_plugin_manager

    checked = _check(trainer, data=data, name=name, options=options, home=home,
                     plugins=plugins or default_plugin_manager(), resume=resume,
                     restart=restart, on=on, start_from=start_from, say=lambda message: None)
    resolve_base(base, checked.library.home)


@dataclass
class _Run:
    """A prepared run: what :func:`_prepare` checked and built, for :func:`_run` and
    :func:`_finalize`."""

    trainer: str
    trainer_obj: Any
    library: Library
    ref: Any
    dataset: Data
    eval_data: Data | None
    loaded: Base
    parent: PocketBook | None
    underlay: list[PocketBook]
    guard: ForgettingGuard | None
    general: list[str] | None
    head: str
    job: TrainJob
    workdir: Path
    say: Callable[[str], None]
    stages_saved: list[str] = field(default_factory=list)


@dataclass
class _Checked:
    """What :func:`_check` read, having refused nothing."""

    options: TrainOptions
    trainer_obj: Any
    trainer_options: Any
    method: Any
    library: Library
    ref: Any
    dataset: Data
    general: list[str] | None
    workdir: Path
    parent: PocketBook | None
    resume_from: str | None


def _check(trainer: str, *, data: str, name: str, options: TrainOptions | None,
           home: str | os.PathLike[str] | None, plugins: PluginManager, resume: bool,
           restart: bool, on: str | None, start_from: str | None,
           say: Callable[[str], None]) -> _Checked:
    """Everything that can be refused without the base: options (the trainer's own included),
    the name, data, the parent, the checkpoint state. Writes nothing (but a new catalog)."""
    # our own copy: trainers may record values in job.options.trainer_options (rlhf records
    # the reward pocket book it used) without touching the caller's object
    options = replace(options or TrainOptions(),
                      trainer_options=dict((options.trainer_options if options else None) or {}))
    pm = plugins
    trainer_obj = pm.trainer(trainer)
    check_options(options)  # values out of range, for options built in Python (the CLI's are)
    # the trainer's own options, typed: every problem in one error, before anything is reserved
    trainer_options = build_trainer_options(trainer_obj, options)
    refuse_unapplied_guard(trainer, trainer_obj, options,
                           guarded=[t.name for t in pm.trainers if _applies_guard(t)])
    method = pm.method(options.method)
    library = Library(home, plugins=pm)
    ref = library.reserve(name)
    dataset = load_data(data, formats=pm.data_formats, shapes=trainer_obj.data_shapes,
                        skip_bad_rows=options.skip_bad_rows)
    if dataset.skipped:
        say(f"Skipped {len(dataset.skipped)} row(s) of the wrong shape (--skip-bad-rows): "
            f"row(s) {', '.join(map(str, dataset.skipped[:5]))}"
            + ("..." if len(dataset.skipped) > 5 else ""))
    general = _texts(options.general) if options.general else None
    workdir = run_dir(library, str(ref))
    parent = _parent(library, on, start_from)
    if start_from and parent is not None:  # the copy keeps its LoRA shape
        options = _options_of(parent, options)
    resume_from = _checkpoint(workdir, resume=resume, restart=restart, name=str(ref))
    return _Checked(options, trainer_obj, trainer_options, method, library, ref, dataset,
                    general, workdir, parent, resume_from)


def _prepare(trainer: str, *, base: str | Base, data: str, name: str,
             options: TrainOptions | None, home: str | os.PathLike[str] | None,
             plugins: PluginManager, resume: bool, restart: bool, callbacks: list[Any] | None,
             on: str | None, start_from: str | None, say: Callable[[str], None],
             main: bool = True) -> _Run:
    """Everything that can be refused is refused here, before the first step (:func:`_check`,
    then lengths); then the base is loaded and the job built. Only the ``main`` process
    clears an old run's folder."""
    from adapterkit.training.launch import main_first

    with main_first():  # the main process opens (or creates) the catalog first
        c = _check(trainer, data=data, name=name, options=options, home=home,
                   plugins=plugins, resume=resume, restart=restart, on=on,
                   start_from=start_from, say=say)
    options, library, ref, parent, workdir = c.options, c.library, c.ref, c.parent, c.workdir
    trainer_obj, method, dataset = c.trainer_obj, c.method, c.dataset
    pm = plugins
    if c.resume_from is None and main:  # a fresh start: nothing of an earlier run is reused
        shutil.rmtree(workdir, ignore_errors=True)

    loaded = _load(base, method, library, say)
    if not start_from:  # a copy keeps its own targets and rank, which fit (check_policy)
        _check_lora_shape(loaded, options)
    if parent is not None:
        from adapterkit.lora.underlay import check_policy

        check_policy(parent, loaded, role="--on" if on else "--from")
    train_data, eval_data = _split(dataset, options.eval_split, options.seed)
    chat = uses_chat(loaded.tokenizer, options.chat)
    job_rows = [as_chat(r) for r in train_data.rows] if train_data.shape == "messages" else \
        train_data.rows
    check_lengths(loaded.tokenizer, job_rows, options.max_length, chat)
    underlay = _underlay(library, parent, copy=start_from is not None)
    head = getattr(trainer_obj, "head", "causal-lm")
    # a reward head scores text: no generation to guard, no general-text loss to check (guard
    # options were refused above for any trainer that does not apply the guard)
    guard = _guard(loaded.tokenizer, options) if head != "reward" else None
    general = c.general if head != "reward" else None
    stages_saved: list[str] = []

    def build() -> Any:
        return _attach_new(loaded, method, options, underlay=underlay,
                           start=parent if start_from else None, head=head)

    def run_stage(stage_trainer: str, *, name: str, data: str | None = None,
                  options: TrainOptions | None = None) -> TrainResult:
        """Train another pocket book first, on the same resident base (rlhf's reward)."""
        stage_options = options or replace(job.options, trainer_options={},
                                           forgetting_budget=None, guard_weight=None)
        result = train(stage_trainer, base=loaded, data=data or job_data, name=name,
                       options=stage_options, home=library.home, plugins=pm,
                       callbacks=callbacks, progress=say)
        stages_saved.append(result.pocket_book.ref)
        result.model.unload()  # the shared base gets its plain layers back
        result.model = None
        from adapterkit.memory import release_memory

        release_memory()
        return result

    job_data = data
    job = TrainJob(build=build, tokenizer=loaded.tokenizer, data=train_data,
                   eval_data=eval_data, options=options, chat=chat, output_dir=workdir,
                   resume_from=c.resume_from, trainer_options=c.trainer_options,
                   callbacks=list(callbacks or []), guard=guard, base=loaded,
                   stacked_on=underlay, home=library.home, name=str(ref), stage_runner=run_stage)
    if guard is not None and guard.budget_pct is not None:
        job.callbacks.append(guard.callback())
    say(f"Training {ref} with {trainer}/{options.method} on {dataset.source}"
        + (f", on top of {' + '.join(b.ref for b in underlay)}" if underlay else "")
        + (f", continuing {parent.ref}" if start_from and parent else "") + "...")
    return _Run(trainer, trainer_obj, library, ref, dataset, eval_data, loaded,
                parent, underlay, guard, general, head, job,
                workdir, say, stages_saved)


def _run(run: _Run) -> Any:
    """The trainer plugin's part: its objective on the job. On failure, say what an earlier
    stage left saved (nothing of this pocket book is)."""
    try:
        return run.trainer_obj.train(job=run.job)
    except BaseException as exc:
        if run.stages_saved:  # an earlier stage finished and is in the library: say so
            run.say(f"{', '.join(run.stages_saved)} (an earlier stage) was saved; {run.ref} was "
                    "not. Reuse it when you run again (for rlhf: --reward NAME).")
            exc.stages_saved = list(run.stages_saved)  # type: ignore[attr-defined]
        raise


def _finalize(run: _Run, state: Any, elapsed: float) -> TrainResult:
    """Measure what the run did (guard, eval, forgetting) and save it into the library."""
    model, metrics = _measure(run, state, elapsed)
    book = _save(run, model, metrics, state)
    shutil.rmtree(run.workdir, ignore_errors=True)
    return TrainResult(book, metrics, model)


def _measure(run: _Run, state: Any, elapsed: float) -> tuple[Any, dict[str, Any]]:
    """The trained model, ready to save (adapter in float32, eval mode), and its metrics."""
    model = run.job.model
    _adapter_to_fp32(model)
    model.eval()
    metrics = _metrics(state, elapsed)
    from adapterkit.training.launch import ranks

    if ranks().distributed:  # tokens and tokens/s above are of all ranks together
        metrics["processes"] = ranks().world_size
    if run.guard is not None:
        metrics["guard"] = _guard_report(run, model, int(metrics.get("steps", 0)))
    tokenizer = run.loaded.tokenizer
    if run.eval_data is not None and run.head != "reward":
        metrics["eval"] = task_loss(model, tokenizer, run.eval_data.rows, chat=run.job.chat)
    if run.general is not None:
        run.say("Forgetting check on general text...")
        guard = run.guard
        base_loss = guard.base_loss if guard is not None and \
            guard.general_texts == run.general else None
        metrics["forgetting"] = forgetting(model, tokenizer, run.general, base_loss=base_loss)
        if run.underlay:  # the "before" side had the pocket books underneath active
            metrics["forgetting"]["relative_to"] = "base + " + " + ".join(
                b.ref for b in run.underlay)
    return model, metrics


def _save(run: _Run, model: Any, metrics: dict[str, Any], state: Any,
          weights: dict[str, Any] | None = None) -> PocketBook:
    return save_trained(run.library, model, run.loaded, str(run.ref), trainer=run.trainer,
                        options=run.job.options, data=run.dataset, metrics=metrics,
                        log_history=_history(state),
                        parents=[run.parent.ref] if run.parent else None,
                        stacked_on=[b.ref for b in run.underlay], weights=weights)


def _finalize_shared(run: _Run, state: Any, elapsed: float, *, main: bool) -> TrainResult:
    """:func:`_finalize` for a run on several processes: every rank measures (the same
    weights, the same figures: with FSDP's sharded weights each forward needs them all), the
    main process alone saves, and the others return the pocket book it saved."""
    from adapterkit.training.launch import share

    model, metrics = _measure(run, state, elapsed)
    weights = _whole_weights(model)  # a collective under FSDP; None when each rank has them
    if main:
        try:
            book = _save(run, model, metrics, state, weights)
            shutil.rmtree(run.workdir, ignore_errors=True)
        except BaseException as exc:
            try:  # the others stop waiting and fail with it
                share(("failed", f"{run.ref} was not saved: {exc or type(exc).__name__}"))
            except Exception:
                pass  # they are gone already
            raise
        share(("saved", book.meta.to_json(), str(book.path), metrics))
        return TrainResult(book, metrics, model)
    outcome = share()
    if outcome[0] != "saved":
        raise LaunchError(f"the main process failed: {outcome[1]}")
    meta = PocketBookMeta.from_dict(json.loads(outcome[1]))
    return TrainResult(PocketBook(meta, Path(outcome[2])), outcome[3], model)


def _whole_weights(model: Any) -> dict[str, Any] | None:
    """The model's state dict gathered whole on every rank when its weights are sharded
    (FSDP 2 holds each as a ``DTensor`` shard; every rank must join), else ``None``: each
    rank holds them whole (one process, DDP) and PEFT reads the model itself."""
    if not any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def _guard_report(run: _Run, model: Any, steps: int) -> dict[str, Any]:
    """The forgetting guard as it acted: the KL weight only if its term was added to the loss
    (a trainer that declared the guard but never added it trained without it)."""
    guard = run.guard
    assert guard is not None
    report = guard.finish(model, steps)
    applied = guard.penalty_calls > 0
    if guard.weight > 0 and not applied:
        run.say(f"Warning: the {run.trainer} trainer never added the forgetting guard's KL term "
                "to its loss; recorded as KL weight 0.")
    if report.within_budget is False:
        run.say(f"Warning: no checkpoint stayed within the forgetting budget of "
                f"{guard.budget_pct}%; kept the final weights. Lower the learning rate, or "
                "raise --guard-weight.")
    return {"budget_pct": guard.budget_pct, "weight": guard.weight if applied else 0.0,
            "kl_batches": guard.penalty_calls, "kept_step": report.kept_step,
            "restored": report.restored, "within_budget": report.within_budget,
            "checks": report.checks}


def _adapter_to_fp32(model: Any) -> None:
    """Hold the trained pocket book in float32, as PEFT holds it after loading.

    TRL trains QLoRA adapters in bfloat16 (following the QLoRA paper) and PEFT upcasts adapters
    to float32 when it loads them; without this, the resident model and a reload of the saved
    pocket book would give slightly different logits.
    """
    import torch

    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def _checkpoint(workdir: Path, *, resume: bool, restart: bool, name: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(workdir)) if workdir.is_dir() else None
    if resume:
        if last is None:
            raise ConfigError(f"there is no interrupted run of {name} to resume; "
                              "start it without --resume")
        return last
    if last is not None and not restart:
        raise ConfigError(
            f"an interrupted run of {name} exists ({Path(last).name}); pass --resume to "
            "continue it or --restart to discard it"
        )
    return None


def _load(base: str | Base, method: Any, library: Library, say: Callable[[str], None]) -> Base:
    from adapterkit.base.load import load_base
    from adapterkit.training.launch import fsdp_enabled, main_first, ranks

    if isinstance(base, str):
        say(f"Loading base {base}" + (f" ({method.quantization})" if method.quantization else "")
            + "...")
        device = None
        if ranks().distributed:  # each rank on its own GPU (accelerate's choice), or the CPU
            from adapterkit.training.launch import join

            device = str(join().device)
        with main_first(local=True):  # a GGUF base is converted once per machine, not per rank
            return load_base(base, quantization=method.quantization, home=library.home,
                             progress=say, device=device, for_fsdp=fsdp_enabled())
    if base.quantization != method.quantization:
        raise ConfigError(
            f"method {method.name} needs a {method.quantization or 'full-precision'} base, "
            f"but the base given is {base.quantization or 'full precision'}"
        )
    return base


def _check_lora_shape(loaded: Base, options: TrainOptions) -> None:
    """Targets and rank against the base's structure, before a LoRA is built on it."""
    from adapterkit.base.load import check_rank, check_targets

    structure = loaded.structure()
    check_rank(structure, check_targets(structure, options.target_modules), options.r)


def _parent(library: Library, on: str | None, start_from: str | None) -> PocketBook | None:
    """The ``--on``/``--from`` pocket book, checked before anything is loaded."""
    if on and start_from:
        raise ConfigError("--on and --from exclude each other: --on trains a new pocket book "
                          "on top of NAME, --from continues a copy of NAME")
    ref = on or start_from
    if not ref:
        return None
    from adapterkit.library.integrity import check_book
    from adapterkit.lora.underlay import chain, is_reward_book

    book = library.get(ref)
    for below in chain(library, book):  # damaged files are refused before the base loads
        check_book(below)
    if is_reward_book(book):
        raise ConfigError(f"{'--on' if on else '--from'} {book.ref} is a reward pocket book "
                          "(it scores text, it does not generate); name a policy pocket book")
    return book


def _options_of(book: PocketBook, options: TrainOptions) -> TrainOptions:
    config = read_config(book.path)
    targets = config.get("target_modules") or options.target_modules
    if isinstance(targets, (list, tuple, set)):
        targets = ",".join(sorted(targets))
    return replace(options, r=int(config.get("r", options.r)),
                   alpha=int(config.get("lora_alpha", options.alpha)), target_modules=targets)


def _underlay(library: Library, parent: PocketBook | None, *, copy: bool) -> list[PocketBook]:
    """The frozen pocket books under the new one: the parent's chain (``--on``), or the copied
    pocket book's own underlay (``--from``)."""
    if parent is None:
        return []
    from adapterkit.lora.underlay import chain

    books = chain(library, parent)
    return books[:-1] if copy else books


def _attach_new(base: Base, method: Any, options: TrainOptions, *,
                underlay: list[PocketBook] | None = None, start: PocketBook | None = None,
                head: str = "causal-lm") -> Any:
    """Wrap the frozen base with a new trainable pocket book of ``method`` (or a trainable copy
    of ``start``), with ``underlay`` frozen and active underneath."""
    from peft import PeftModel, get_peft_model

    from adapterkit.base.load import check_targets, keep_4bit_layout
    from adapterkit.library.integrity import base_structure, check_book
    from adapterkit.lora import underlay as underlay_mod

    structure = base_structure(base)
    targets = check_targets(structure, options.target_modules)
    keep_4bit_layout(base.model)
    model = method.prepare_base(base.model, gradient_checkpointing=options.gradient_checkpointing)
    underlay_mod.remove(model)  # a base reused across runs starts clean
    underlay_mod.apply(model, list(underlay or []), structure=structure)
    if start is not None:
        check_book(start, structure)
        return PeftModel.from_pretrained(model, str(start.path), is_trainable=True)
    config = method.peft_config(target_modules=targets, r=options.r, alpha=options.alpha,
                                dropout=options.dropout)
    import torch

    torch.manual_seed(options.seed)
    if head == "reward":  # a LoRA + scalar head on the same backbone: a PEFT SEQ_CLS adapter
        from adapterkit.training.reward import reward_model

        model = reward_model(model, pad_token_id=base.tokenizer.pad_token_id)
        config.task_type = "SEQ_CLS"
        config.modules_to_save = ["score"]
    elif head != "causal-lm":
        raise ConfigError(f"unknown trainer head {head!r}; trainers declare causal-lm or reward")
    return get_peft_model(model, config)


def guard_requested(options: TrainOptions) -> bool:
    """Whether ``options`` ask for the forgetting guard (a budget, or a KL weight above 0)."""
    return options.forgetting_budget is not None or (options.guard_weight or 0) > 0


def _applies_guard(trainer: Any) -> bool:
    # a reward head scores text: there is no next-token distribution to hold near the base
    return bool(getattr(trainer, "uses_guard", False)) and \
        getattr(trainer, "head", "causal-lm") != "reward"


def refuse_unapplied_guard(name: str, trainer: Any, options: TrainOptions, *,
                           guarded: list[str] | None = None) -> None:
    """Refuse guard options for a trainer that does not apply the guard, before any work.

    Only a trainer that declares ``uses_guard`` adds the guard's KL term to its loss; accepting
    the options anywhere else would record a guard in the pocket book that never acted.

    :param guarded: the trainers that do apply it, named in the message.
    """
    if guard_requested(options) and not _applies_guard(trainer):
        others = f"train with {', '.join(sorted(guarded))}, or " if guarded else ""
        raise ConfigError(
            f"the {name} trainer does not apply the forgetting guard (nothing adds its KL term "
            f"to its loss): {others}drop --forgetting-budget/--guard-weight (--general still "
            "measures forgetting)")


def _guard(tokenizer: Any, options: TrainOptions) -> ForgettingGuard | None:
    weight = options.guard_weight
    if weight is None:
        weight = DEFAULT_GUARD_WEIGHT if options.forgetting_budget is not None else 0.0
    if weight <= 0 and options.forgetting_budget is None:
        return None
    from adapterkit.training.guard import ForgettingGuard

    anchor = options.anchor or str(general_text_path().with_name(ANCHOR_FILE))
    general = options.general or "general"
    return ForgettingGuard(tokenizer, anchor_texts=_texts(anchor), general_texts=_texts(general),
                           budget_pct=options.forgetting_budget, weight=weight,
                           every=options.guard_every)


def _history(state: Any) -> list[dict[str, Any]]:
    return list(getattr(state, "log_history", []) or [])


def _metrics(state: Any, elapsed: float) -> dict[str, Any]:
    history = _history(state)
    losses = [h["loss"] for h in history if "loss" in h]
    tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
    # The trainer's own clock (its training loop only, as a plain TRL script reports it);
    # ``train_seconds`` is the whole call, data preparation included.
    loop = next((float(h["train_runtime"]) for h in reversed(history) if "train_runtime" in h),
                elapsed)
    return {
        # anything a trainer plugin wants recorded (``state.adapterkit_metrics``)
        **dict(getattr(state, "adapterkit_metrics", None) or {}),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_final": losses[-1] if losses else None,
        "steps": int(getattr(state, "global_step", 0) or 0),
        "train_seconds": round(elapsed, 2),
        "loop_seconds": round(loop, 2),
        "tokens": tokens,
        "tokens_per_second": round(tokens / loop, 1) if loop > 0 and tokens else None,
    }


def adapter_base_id(base: Base) -> str:
    """What ``base_model_name_or_path`` says in saved adapters: a Hub id where there is one."""
    prov = base.source.provenance
    return prov.get("hub_id") or prov.get("derived_from") or base.name


def save_trained(library: Library, model: Any, base: Base, name: str, *, trainer: str,
                 options: TrainOptions, data: Data, metrics: dict[str, Any],
                 log_history: list[dict[str, Any]], parents: list[str] | None = None,
                 stacked_on: list[str] | None = None,
                 weights: dict[str, Any] | None = None) -> PocketBook:
    """Write the trained adapter, loss curve and card into the library, atomically.

    :param weights: the model's whole state dict, where the model holds only shards of it
        (FSDP); PEFT picks the pocket book's tensors from it.
    """
    from adapterkit.library.card import loss_curve_png, write_card

    meta = PocketBookMeta(
        name=name, version=0, base=base.identity(), method=options.method, trainer=trainer,
        data=data.describe(), hyperparameters=_hyper(options), metrics=metrics,
        parents=list(parents or []), stacked_on=list(stacked_on or []),
    )
    with library.draft() as staged:
        model.save_pretrained(staged, **({"state_dict": weights} if weights else {}))
        config_path = staged / CONFIG_FILE
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = adapter_base_id(base)  # never a local path
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        if loss_curve_png(log_history, staged / LOSS_CURVE):
            meta.metrics["loss_curve"] = LOSS_CURVE
        book_name = name
        write_card(staged, meta)
        return library.commit(staged, meta, name=book_name)


def _hyper(options: TrainOptions) -> dict[str, Any]:
    keep = ("r", "alpha", "dropout", "target_modules", "learning_rate", "epochs", "max_steps",
            "batch_size", "grad_accum", "max_length", "packing", "seed", "eval_split",
            "forgetting_budget", "guard_weight", "chat", "trainer_options")
    return {k: getattr(options, k) for k in keep}
