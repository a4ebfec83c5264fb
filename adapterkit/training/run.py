"""Training a pocket book: the core's side of ``adapterkit train``.

The core prepares everything that does not depend on the objective — options, data, the frozen
base in the method's precision, the new LoRA on it, checkpoints, the forgetting guard — hands a
:class:`TrainJob` to the trainer plugin, then measures the result and saves it into the library
atomically with its metadata, metrics, loss curve and model card. Trainers and methods are two
registries, so every trainer works with every method.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import ConfigError, InvalidName, LaunchError, PluginError, RunStateError
from adapterkit.files import atomic_write_text
from adapterkit.library.metadata import WEIGHTS_FILE, PocketBookMeta
from adapterkit.library.run_locks import hold_run, release_all
from adapterkit.library.store import Library, PocketBook
from adapterkit.training.build import (
    attach_new,
    check_lengths,
    check_lora_shape,
    general_texts,
    held_out_rows,
    load_for_method,
    make_guard,
    options_of,
    parent_of,
    refuse_what_cannot_act,
    split_eval,
    underlay_of,
)
from adapterkit.training.data import Data, as_chat, check_rendering, load_data
from adapterkit.training.job import TrainJob, TrainResult
from adapterkit.training.metrics import forgetting, task_loss, uses_chat
from adapterkit.training.options import (
    GENERAL_OFF,
    TrainOptions,
    build_trainer_options,
    check_options,
    not_options,
    trainer_option_defaults,
    with_data_defaults,
    with_defaults,
)
from adapterkit.training.reuse import refuse_taken, reusable
from adapterkit.training.save import (
    adapter_to_fp32,
    check_definition,
    checksum,
    definition_of,
    finished_at,
    history_of,
    kept_weights,
    metrics_of,
    record_definition,
    resumed_at,
    same_weights,
    save_trained,
    whole_weights,
)
from adapterkit.training.tracking import TrackedRun, start_tracking, trackers_of

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.base.load import Base
    from adapterkit.plugin_api.manager import PluginManager
    from adapterkit.training.guard import ForgettingGuard

def run_dir(library: Library, name: str) -> Path:
    return library.home / "runs" / name


#: In a run's folder: the stages it started (:meth:`TrainJob.train_stage`), so that ``--resume``
#: and ``--restart`` of the run reach a stage interrupted before the run's own first checkpoint.
STAGES_FILE = "stages.json"
#: The pocket books its stages saved (``NAME@V``), recorded as each is saved: a run stopped
#: after one is told apart from a name taken by something else (a recipe's ``--resume``).
SAVED_FILE = "stages-saved.json"


def interrupted_stages(workdir: Path, library: Library) -> list[str]:
    """This run's stages that hold a checkpoint of an interrupted run."""
    return [n for n in started_stages(workdir) if _has_checkpoint(run_dir(library, n))]


def train(trainer: str, *, base: str | Base, data: str, name: str,
          options: TrainOptions | None = None, home: str | os.PathLike[str] | None = None,
          plugins: PluginManager | None = None, resume: bool = False, restart: bool = False,
          callbacks: list[Any] | None = None, on: str | None = None,
          start_from: str | None = None,
          progress: Callable[[str], None] | None = None,
          annotate: Callable[[PocketBookMeta], None] | None = None) -> TrainResult:
    """Train a new pocket book and save it into the library.

    Under a launcher (``adapterkit train --processes N``, ``accelerate launch``, ``torchrun``)
    every rank calls this: they train together, only the main process writes, and every rank
    returns the same result.

    :param trainer: a registered trainer (``sft``...).
    :param base: base name (or an already loaded :class:`Base`: the new pocket book is put on
        its layers in place, so ``result.model`` holds it until ``result.model.unload()``;
        until then a session, ``peft_model`` or another ``train`` on it is refused, as this
        call is on a base a session or a PEFT model holds. A run that fails gives it back).
    :param data: data file or Hub dataset id.
    :param name: library name, ``NAME`` or ``NAME@N``; refused before training if taken.
    :param resume: continue an interrupted run of ``name`` from its last checkpoint.
    :param restart: discard an interrupted run of ``name`` and start over.
    :param callbacks: extra transformers ``TrainerCallback`` objects (e.g. a progress bar).
    :param on: train on top of this pocket book: it stays frozen and active underneath (with
        its own underlay), is the reference for DPO/RL, and is recorded as the parent.
    :param start_from: continue training a copy of this pocket book (its LoRA settings win).
    :param annotate: called with the new pocket book's metadata (metrics measured, name and
        version set) just before it is committed, to add records of its own in the same atomic
        write (a pipeline's lineage): a kill can never leave the book without them.

    Interrupted (Ctrl-C) or failed, it re-raises the exception with what a next run can do:
    ``exc.checkpoint`` (the last whole checkpoint's folder name, or words naming an
    interrupted stage's; None: none was written yet; ``resume=True`` continues from it),
    ``exc.finished`` (it is of the run's last step: a resume refuses it, ``restart=True``
    trains again), ``exc.save_steps``, ``exc.stages_saved`` (the pocket books its run saved
    besides its own through ``job.train_stage`` before it stopped: rlhf's reward one) and
    ``exc.saved_own`` (its own pocket book's ``NAME@V`` where what stopped it came after its
    commit: a post-save hook, a warning made an error; its run folder is then gone, and
    ``exc.checkpoint`` None). A run that fails otherwise says through ``progress`` which
    checkpoint it kept, where it saved nothing besides (past what it did, the caller says how
    to go on in its own terms: a command line's ``Trainer.reuse_option``, a recipe's
    ``set:``).

    In a process with no GPU it sets the C allocator to keep freed memory for reuse (faster
    CPU steps, more resident memory; ``ADAPTERKIT_MALLOC=system`` keeps the defaults): see
    :mod:`adapterkit.runtime.allocator`.
    """
    import torch

    from adapterkit.plugin_api.manager import default_plugin_manager
    from adapterkit.runtime.allocator import keep_freed_memory, malloc_choice
    from adapterkit.training.launch import join, ranks

    _check_arguments(base, options)
    malloc_choice()  # a value other than `system` is refused everywhere
    if not torch.cuda.is_available():
        keep_freed_memory()
    where = ranks()
    if where.distributed:
        join()  # the process group the trainer will use; barriers work from here on
    say = (progress if where.is_main else None) or (lambda message: None)
    held: list[Any] = []  # the run's lock (main process), let go however the run ends
    called = time.perf_counter()
    try:
        run = _prepare(trainer, base=base, data=data, name=name, options=options, home=home,
                       plugins=plugins or default_plugin_manager(), resume=resume,
                       restart=restart, callbacks=callbacks, on=on, start_from=start_from,
                       say=say, main=where.is_main, held=held)
    except BaseException:
        release_all(held)
        raise
    run.annotate = annotate
    start = time.perf_counter()
    run.prepare_seconds = start - called
    result: TrainResult | None = None
    try:
        state = _run(run)
        if where.distributed:
            result = _finalize_shared(run, state, time.perf_counter() - start,
                                      main=where.is_main)
        else:
            result = _finalize(run, state, time.perf_counter() - start)
        return result
    except KeyboardInterrupt as exc:
        _left_behind(run, exc)
        _say_saved(run, getattr(exc, "saved_own", None))
        raise
    except Exception as exc:
        _left_behind(run, exc)
        _say_saved(run, getattr(exc, "saved_own", None))
        if not getattr(exc, "saved_own", None):
            _say_kept(run)
        raise
    finally:
        release_all(held)  # (a lock file left behind is warned of: the run's outcome stands)
        if not isinstance(base, str):  # a caller's resident base: back in the dtype it came
            _give_back(run.loaded, say)
            _hand_over(run, result)


def _check_arguments(base: Any, options: Any) -> None:
    """Refuse, in one line, arguments of the wrong kind (Python callers), and a resident base
    that a session or a PEFT model holds: the new pocket book would train, and be measured,
    on top of their LoRA."""
    from adapterkit.base.load import Base

    if options is not None and not_options(options):
        raise ConfigError(not_options(options))
    if isinstance(base, str):
        return
    if not isinstance(base, Base):
        raise ConfigError(f"base must be a base's name or adapterkit.load_base(...), not "
                          f"{base!r:.80}")
    from adapterkit.base.load import relaid_for_inference
    from adapterkit.lora.slots import refuse_held

    refuse_held(base.model, wanted="training on it")
    if relaid_for_inference(base.model):
        raise ConfigError("this 4-bit base has answered on a CPU, where bitsandbytes re-lays its "
                          "weights out for inference with rounded scales: a run would train on "
                          "another base than the one its pocket book records; load it again "
                          "(load_base(..., quantization='4bit')) and train on that")


def _hand_over(run: _Run, result: TrainResult | None) -> None:
    """After a run on a caller's base: a finished run's ``result.model`` holds its layers
    (named, for whoever is refused the base next); a failed run leaves no model that could
    give them back, so its PEFT layers come off now, and the base is in eval mode again."""
    from adapterkit.lora.slots import clear_leftovers, wrapped_by

    if result is not None:
        wrapped_by(run.loaded.model, f"train()'s result.model ({result.pocket_book.ref})",
                   "result.model.unload()")
        return
    # a run stopped mid-step leaves the trainer's train mode: dropout would then act in every
    # answer the caller's base gives (a finished run is put in eval mode as it is measured)
    run.loaded.model.eval()
    try:
        if run.job._model is not None:
            run.job._model.unload()
        clear_leftovers(run.loaded.model)  # (the frozen underlay's hooks too)
    except Exception as exc:  # never hides why the run itself stopped
        run.say(f"Warning: the base's plain layers could not be given back ({exc}); load it "
                "again before using it.")


def _left_behind(run: _Run, exc: BaseException) -> None:
    """Tell whoever reports the interruption or failure what a next run can do, on ``exc``:
    ``stages_saved`` (what the run saved besides its own pocket book, however far it got),
    ``checkpoint`` (the last one, or the interrupted stage holding one; None: none was written
    yet), ``finished`` (it is of the run's last step: a resume refuses it), ``save_steps``,
    and ``saved_own`` (its own pocket book's ``NAME@V`` where the failure came after its
    commit: a post-save hook, a warning made an error; else None)."""
    own = _own_saved(run)
    facts: dict[str, Any] = {"stages_saved": list(run.stages_saved), "saved_own": own}
    try:  # (one recorded as its commit began is kept only where the commit went through)
        run.stages_saved[:] = [r for r in run.stages_saved if run.library.exists(r)]
        facts["stages_saved"] = list(run.stages_saved)
        if own:  # the run is over, as a finished one: its folder goes, nothing to resume
            shutil.rmtree(run.workdir, ignore_errors=True)
            tag(exc, **facts, checkpoint=None, finished=False,
                save_steps=run.job.options.save_steps)
            return
        last, finished = _last_checkpoint(run)
        stages = interrupted_stages(run.workdir, run.library)
        facts.update(checkpoint=Path(last).name if last else
                     f"the last checkpoint of {stages[0]}" if stages else None,
                     finished=finished, save_steps=run.job.options.save_steps)
    except Exception:  # never hides the interruption; the reporter says less
        pass
    tag(exc, **facts)


def _own_saved(run: _Run) -> str | None:
    """The run's own pocket book (``NAME@V``) where its commit went through before what
    stopped it (a post-save hook, a warning made an error): its name was free when it started
    and the run lock kept other runs off it. None otherwise, and on a rank that saves none."""
    try:
        if run.saving and run.library.exists(str(run.ref)):
            return run.library.get(str(run.ref)).ref
    except Exception:  # (never in the way of what stopped the run)
        pass
    return None


def tag(exc: BaseException, **facts: Any) -> None:
    """Set ``facts`` as attributes of ``exc`` for whoever reports it; an exception that takes
    none (a frozen dataclass, ``__slots__``) goes on as it is, never replaced by this."""
    for key, value in facts.items():
        try:
            setattr(exc, key, value)
        except Exception:
            return


def _say_saved(run: _Run, own: str | None) -> None:
    """After a failure or Ctrl-C, wherever it came (in the trainer, or as the run was measured
    or saved): the pocket books its run saved besides its own, which are in the library, and
    its own (``own``) where what stopped it came after that was saved."""
    if own:
        books = [*run.stages_saved, own]
        run.say(f"{', '.join(books)} {'was' if len(books) == 1 else 'were'} saved before the "
                "run stopped: what stopped it came after.")
    elif run.stages_saved:
        run.say(f"{', '.join(run.stages_saved)} (a stage of its run) was saved; {run.ref} was "
                "not." if len(run.stages_saved) == 1 else f"{', '.join(run.stages_saved)} "
                f"(stages of its run) were saved; {run.ref} was not.")


def _last_checkpoint(run: _Run) -> tuple[str | None, bool]:
    """The run's last whole checkpoint (one killed while written is skipped), and whether it
    is of the run's last step, which a resume refuses."""
    last = last_complete_checkpoint(run.workdir)
    return last, last is not None and finished_at(last, run.job.options.max_steps) is not None


def _say_kept(run: _Run) -> None:
    """After a run that failed: the checkpoint it keeps, and what the next run can do with it
    (a rerun without --resume or --restart is refused beside it) — as the CLI says it after
    Ctrl-C (:func:`_left_behind`): a checkpoint of the last step cannot be resumed. Nothing
    where it saved pocket books besides its own: how to go on past them is the caller's to
    say, in its own terms (a command line's options, a recipe's ``set:``)."""
    try:
        last, finished = _last_checkpoint(run)
    except Exception:  # never hides why the run itself stopped
        return
    if last is None or run.stages_saved:  # (past what it saved: the caller says how on)
        return
    if finished:
        run.say(f"Training had finished ({Path(last).name}) when the run failed: run the same "
                "command with --restart to train it again.")
    else:
        run.say(f"The run's last checkpoint is {Path(last).name}: once the cause is fixed (a "
                "resume keeps the run's options), the same command with --resume continues "
                "from it; --restart discards it.")


def _give_back(base: Base, say: Callable[[str], None]) -> None:
    """Give a caller's base its weights back after a run (a no-op when ``_measure`` did)."""
    from adapterkit.training.precision import restore_exact, sdpa_again

    sdpa_again(base.model)  # (a bf16 base trained as it came: attention as it came)
    try:
        if base.rounded_from is not None and not restore_exact(base):
            say(f"Warning: the base's exact weights could not be read back; it stays in "
                f"{base.dtype}. Load it again for exact figures.")
    except Exception as exc:  # never hides why the run itself stopped
        say(f"Warning: the base's exact weights could not be read back ({exc}); load it "
            "again for exact figures.")


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
    #: Whether it began to save its own pocket book: one found under its name after a failure
    #: is then its own (its name was free when it started, and the run lock kept others off).
    saving: bool = False
    annotate: Callable[[PocketBookMeta], None] | None = None
    #: Seconds from ``train()``'s call to the trainer's start: checks, base load, data, job.
    prepare_seconds: float = 0.0
    #: The experiment trackers of ``--report-to`` (``None``: reports to none).
    tracked: TrackedRun | None = None
    #: Where a resumed run starts (:func:`adapterkit.training.save.resumed_at`).
    resumed: dict[str, int] | None = None
    #: The plugin that registered the trainer (named when it misbehaves).
    plugin: str = ""


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
    #: The run was given ``general: off`` (resolved to None, as a trainer with no default
    #: check is): its stages must not measure forgetting by their own default either.
    general_off: bool = False
    #: What defines the run (:func:`adapterkit.training.save.definition_of`).
    definition: dict[str, Any] = field(default_factory=dict)


def _check(trainer: str, *, data: str, name: str, options: TrainOptions | None,
           home: str | os.PathLike[str] | None, plugins: PluginManager, resume: bool,
           restart: bool, on: str | None, start_from: str | None,
           say: Callable[[str], None], checkpoint: bool = True) -> _Checked:
    """Everything that can be refused without the base: options (the trainer's own included),
    the name, data, the parent, the checkpoint state (unless not ``checkpoint``: a rank other
    than the main one takes the main one's). Writes nothing (but a new catalog)."""
    if resume and restart:
        raise ConfigError("--resume continues an interrupted run and --restart discards it: "
                          "give one")
    # our own copy: trainers may record values in job.options.trainer_options (rlhf records
    # the reward pocket book it used) without touching the caller's object
    options = replace(options or TrainOptions(),
                      trainer_options=dict((options.trainer_options if options else None) or {}))
    pm = plugins
    trainer_obj = pm.trainer(trainer)
    check_options(options)  # values out of range, for options built in Python (the CLI's are)
    if options.epochs is not None and options.max_steps > 0:  # (the CLI refuses it by its flags)
        raise ConfigError("max_steps sets the run's length, and the trainer ignores epochs "
                          "beside it: give one of TrainOptions(max_steps=...) and epochs=...")
    general_off = isinstance(options.general, str) and options.general.lower() == GENERAL_OFF
    options = with_defaults(trainer_obj, options)  # the trainer's measured defaults where unset
    check_options(options)  # what the defaults added, with what the run set
    # the trainer's own options, typed: every problem in one error, before anything is reserved
    trainer_options = build_trainer_options(trainer_obj, options)
    refuse_what_cannot_act(trainer, trainer_obj, options, pm.trainers)
    # read now, not once the base is loaded
    anchor = general_texts(options.anchor) if options.anchor else None
    from adapterkit.training.early_stop import patience_of
    from adapterkit.training.launch import fsdp_enabled, ranks

    # (the job asks again once built; here so that FSDP's refusal comes before the base loads)
    patience_of(options.early_stopping, options.eval_split > 0, sharded=fsdp_enabled())
    method = pm.method(options.method)
    library = Library(home, plugins=pm)
    ref = library.reserve(name)
    workdir = run_dir(library, str(ref))
    saved = saved_stages(workdir)  # (what an interrupted run of it saved, and where it got)
    last = last_complete_checkpoint(workdir) if saved else None
    refuse_taken(library, trainer_obj, str(ref), options, trainer_options, saved,
                 checkpoint=Path(last).name if last else None, restart=restart,
                 finished=last is not None and finished_at(last, options.max_steps) is not None)
    dataset = load_data(data, formats=pm.data_formats, shapes=trainer_obj.data_shapes,
                        skip_bad_rows=options.skip_bad_rows)
    check_rendering(dataset, options.chat)
    if hasattr(trainer_obj, "preflight"):  # (a plugin written before it may not have it)
        trainer_obj.preflight(library=library, name=str(ref), options=options,
                              trainer_options=trainer_options, data=dataset)
    # epochs for this data (sft: enough for its min_steps), on the rows left after the split
    epochs_given = options.epochs is not None
    held_out = held_out_rows(len(dataset.rows), options.eval_split)
    options = with_data_defaults(options, len(dataset.rows) - held_out, ranks().world_size)
    if dataset.skipped:
        say(f"Skipped {len(dataset.skipped)} row(s) of the wrong shape (--skip-bad-rows): "
            f"row(s) {', '.join(map(str, dataset.skipped[:5]))}"
            + ("..." if len(dataset.skipped) > 5 else ""))
    unread = dataset.unread_note()
    if unread:
        say(unread)
    general = general_texts(options.general) if options.general else None
    parent = parent_of(library, on, start_from, head=getattr(trainer_obj, "head", "causal-lm"))
    if start_from and parent is not None:  # the copy keeps its LoRA shape
        options = options_of(parent, options)
        if not getattr(trainer_obj, "drops_out", True):  # but trains without dropout here
            options = replace(options, dropout=0.0)
    stages = interrupted_stages(workdir, library) if checkpoint and not restart else []
    if stages and not resume:  # (before the base loads; the stage would refuse after it)
        raise RunStateError(f"an interrupted run of {', '.join(stages)} (a stage of {ref}) "
                            "exists; pass --resume to continue it or --restart to discard it")
    resume_from = None
    if checkpoint and not (stages and not _has_checkpoint(workdir)):  # (interrupted in a
        # stage, before this run's own first checkpoint: the stage resumes, the run starts)
        resume_from = _checkpoint(workdir, resume=resume, restart=restart, name=str(ref))
    if resume_from and not epochs_given and options.max_steps <= 0:  # the epochs it set out
        # for, whatever this resume's processes or split would resolve: the schedule goes on
        # as it started (whole epochs, as min_steps resolves them and transformers records)
        options = replace(options, epochs=_epochs_of(resume_from) or options.epochs)
    weights = parent.meta.files.get(WEIGHTS_FILE) if parent else None
    definition = definition_of(
        trainer, options, dataset, texts={"general": general, "anchor": anchor},
        parent=f"{'--on' if on else '--from'} {parent.ref} (weights {weights})" if parent
        else None)
    if resume_from:
        check_definition(workdir, definition, str(ref), checkpoint=resume_from,
                         staged=reusable(trainer_obj) if started_stages(workdir) else frozenset(),
                         trainer_defaults=trainer_option_defaults(trainer_obj))
        _check_unfinished(resume_from, options, str(ref))
    return _Checked(options, trainer_obj, trainer_options, method, library, ref, dataset,
                    general, workdir, parent, resume_from, general_off, definition)


def _check_unfinished(checkpoint: str, options: TrainOptions, name: str) -> None:
    """Refuse to resume from a run's last step (stopped while it was measured or saved).
    transformers' Trainer would take one step more, at the learning rate of 0 where its
    schedule ends (the weights do not change), then report it: a step, its tokens and their
    tokens/s that trained nothing, and a forgetting guard that acted on that step alone. The
    checkpoint holds the finished weights, but not the guard's record of the run's steps."""
    step = finished_at(checkpoint, options.max_steps)
    if step is not None:
        raise RunStateError(
            f"the interrupted run of {name} had trained all its {step} steps "
            f"({Path(checkpoint).name}) and stopped before it was saved; a resume would train "
            "nothing more (transformers would take an empty step and count it), and adapterkit "
            "does not finish a run from its last checkpoint: pass --restart to train it again")


def _prepare(trainer: str, *, base: str | Base, data: str, name: str,
             options: TrainOptions | None, home: str | os.PathLike[str] | None,
             plugins: PluginManager, resume: bool, restart: bool, callbacks: list[Any] | None,
             on: str | None, start_from: str | None, say: Callable[[str], None],
             main: bool = True, held: list[Any] | None = None) -> _Run:
    """Everything that can be refused is refused here, before the first step (:func:`_check`,
    then lengths); then the base is loaded and the job built. Only the ``main`` process
    clears an old run's folder, holding the run's lock first (:func:`~adapterkit.library.run_locks.hold_run`, appended to
    ``held`` for the caller to let go when the run ends)."""
    from adapterkit.home import resolve_home
    from adapterkit.library.names import parse_ref
    from adapterkit.training.launch import ranks

    if main and held is not None:  # before the run folder is read (a running run's
        try:  # checkpoints are no interrupted run) or cleared
            lock = hold_run(resolve_home(home), parse_ref(name).name)
        except RunStateError as exc:
            if ranks().distributed:  # the others wait for the main one's checks: they say
                _refused_together(exc)  # why too (they said "lost contact with another rank")
            raise
        except Exception:  # a bad name or home: refused, naming it, by the checks below
            lock = None
        if lock is not None:
            held.append(lock)

    def check(*, checkpoint: bool = True) -> _Checked:
        return _check(trainer, data=data, name=name, options=options, home=home,
                      plugins=plugins, resume=resume, restart=restart, on=on,
                      start_from=start_from, say=say, checkpoint=checkpoint)

    def clear(c: _Checked) -> None:
        """A fresh start reuses nothing of an earlier run, but the record of a stage it
        resumes; a restart discards its stages' runs too, now (a kill before they start would
        leave them behind)."""
        if c.resume_from is not None:
            return
        if restart:
            for stage in started_stages(c.workdir):
                shutil.rmtree(run_dir(c.library, stage), ignore_errors=True)
        if not (resume and interrupted_stages(c.workdir, c.library)):
            shutil.rmtree(c.workdir, ignore_errors=True)

    if ranks().distributed:
        c = _check_together(check, main=main, clear=clear)
    else:
        c = check()
        clear(c)
    options, library, ref, parent, workdir = c.options, c.library, c.ref, c.parent, c.workdir
    trainer_obj, method, dataset = c.trainer_obj, c.method, c.dataset
    pm = plugins

    loaded = load_for_method(base, method, library, say, options.precision)
    if not start_from:  # a copy keeps its own targets and rank, which fit (check_policy)
        check_lora_shape(loaded, options)
    if parent is not None:
        from adapterkit.lora.underlay import check_policy

        check_policy(parent, loaded, role="--on" if on else "--from")
    train_data, eval_data = split_eval(dataset, options.eval_split, options.seed)
    chat = uses_chat(loaded.tokenizer, options.chat)
    check_rendering(dataset, options.chat, template=bool(loaded.tokenizer.chat_template))
    job_rows = [as_chat(r) for r in train_data.rows] if train_data.shape == "messages" else \
        train_data.rows
    check_lengths(loaded.tokenizer, job_rows, options.max_length, chat)
    underlay = underlay_of(library, parent, copy=start_from is not None)
    head = getattr(trainer_obj, "head", "causal-lm")
    # a reward head scores text: no generation to guard, no general-text loss to check (guard
    # options were refused above for any trainer that does not apply the guard)
    guard = make_guard(loaded.tokenizer, options) if head != "reward" else None
    general = c.general if head != "reward" else None
    stages_saved: list[str] = []

    def build() -> Any:
        return attach_new(loaded, method, options, underlay=underlay,
                           start=parent if start_from else None, head=head)

    def run_stage(stage_trainer: str, *, name: str, data: str | None = None,
                  options: TrainOptions | None = None) -> TrainResult:
        """Train another pocket book first, on the same resident base (rlhf's reward)."""
        # the run's options without its guard, less what the stage's trainer would refuse
        # as inert (a forgetting check for a reward head, packing) and min_steps, which acted
        # on this run already (resolved into the epochs the stage keeps)
        other = pm.trainer(stage_trainer)
        stage_options = options or replace(
            job.options, trainer_options={}, forgetting_budget=0, guard_weight=None,
            anchor=None, min_steps=None,
            general=None if getattr(other, "head", "causal-lm") == "reward"
            else GENERAL_OFF if c.general_off else job.options.general,
            packing=job.options.packing and bool(getattr(other, "packs", False)))
        if stage_options.max_steps > 0 and stage_options.epochs is not None and \
                stage_options.epochs == job.options.epochs:  # replace(job.options, max_steps=N)
            # carried the run's resolved epochs, which beside max_steps would be refused
            stage_options = replace(stage_options, epochs=None)
        # recorded first, so that --resume / --restart of this run reach the stage's own run
        workdir.mkdir(parents=True, exist_ok=True)
        started = started_stages(workdir)
        atomic_write_text(workdir / STAGES_FILE, json.dumps(sorted({*started, name})))
        stage_dir = run_dir(library, name)

        def record(meta: PocketBookMeta) -> None:
            """As the stage's commit begins (a Ctrl-C after it, while the stage gives the base
            back, must not lose it): its ref, read back only where it reached the library."""
            saved(f"{meta.name}@{meta.version}")

        def saved(ref: str) -> None:
            if ref in stages_saved:
                return
            stages_saved.append(ref)
            try:  # (a record for advice: it never fails the stage's save)
                atomic_write_text(workdir / SAVED_FILE,
                                  json.dumps(sorted({*saved_stages(workdir), *stages_saved})))
            except OSError as exc:
                say(f"Warning: {workdir / SAVED_FILE} could not be written ({exc}); a --resume "
                    f"of the pipeline will not know that this run saved {ref}.")

        result = train(stage_trainer, base=loaded, data=data or job_data, name=name,
                       options=stage_options, home=library.home, plugins=pm,
                       callbacks=callbacks, progress=say, restart=restart,
                       resume=resume and _has_checkpoint(stage_dir), annotate=record)
        saved(result.pocket_book.ref)  # (every rank: only the main one commits)
        result.model.unload()  # the shared base gets its plain layers back
        result.model = None
        from adapterkit.memory import release_memory

        release_memory()
        # the stage's figures were taken on the exact base; this run trains in its precision
        from adapterkit.training.precision import hold, training_dtype

        if str(loaded.model.device) == "cpu":
            hold(loaded, training_dtype(job.options.precision, "cpu", loaded.quantization))
        return result

    job_data = data
    trackers = trackers_of(options.report_to)
    tracked = start_tracking(trackers, home=library.home, ref=str(ref), workdir=workdir,
                             resume=c.resume_from is not None, main=main) if trackers else None
    job = TrainJob(build=build, tokenizer=loaded.tokenizer, data=train_data,
                   eval_data=eval_data, options=options, chat=chat, output_dir=workdir,
                   resume_from=c.resume_from, trainer_options=c.trainer_options,
                   callbacks=list(callbacks or []), guard=guard, base=loaded,
                   stacked_on=underlay, start=parent if start_from else None,
                   home=library.home, name=str(ref), stage_runner=run_stage,
                   run_name=tracked.run_name if tracked else "", say=say)
    from adapterkit.training.precision import check_resume, hold, name_of, training_dtype

    if str(loaded.model.device) == "cpu":  # every check passed: the steps' precision
        wanted = training_dtype(options.precision, "cpu", loaded.quantization)
        hold(loaded, wanted)
        if loaded.dtype != wanted:  # hold() declined: it could not be given back exactly
            if options.precision != "auto":
                raise ConfigError(
                    f"--precision {options.precision}: the resident base could not be given "
                    "back exactly after a run in that precision (its weights differ from, or "
                    "are not named in, its safetensors files), so it is left as it is; train "
                    "with --precision auto, or load the base by name")
            say(f"Training in {name_of(loaded.dtype)}, the resident base's own dtype (it "
                "could not be given back exactly after a run in bf16).")
    try:  # what the steps compute in, against the checkpoints a resume continues
        check_resume(workdir, job.precision, resuming=c.resume_from is not None, main=main,
                     default="bf16" if str(loaded.model.device).startswith("cuda") else "fp32")
        if main and c.resume_from is None:  # (a resume keeps the record it was checked with)
            record_definition(workdir, c.definition)
    except BaseException:
        if not isinstance(base, str):
            _give_back(loaded, say)
        raise
    from adapterkit.training.progress import last_step_logged

    job.callbacks.append(last_step_logged())
    if guard is not None:
        guard.load_targets = job.load_anchor_targets
        job.callbacks.append(guard.callback())
    if tracked is not None:
        job.callbacks.append(tracked.callback())
    if job.early_stopping:
        from adapterkit.training import early_stop

        job.callbacks.append(early_stop.callback(job.early_stopping, resume_from=c.resume_from))
    say(f"Training {ref} with {trainer}/{options.method} on {dataset.source}"
        + (f", on top of {' + '.join(b.ref for b in underlay)}" if underlay else "")
        + (f", continuing {parent.ref}" if start_from and parent else "") + "...")
    return _Run(trainer, trainer_obj, library, ref, dataset, eval_data, loaded,
                parent, underlay, guard, general, head, job,
                workdir, say, stages_saved, tracked=tracked,
                resumed=resumed_at(c.resume_from), plugin=pm.trainers.entries[trainer].plugin)


def _view(c: _Checked) -> dict[str, Any]:
    """What every rank must see the same for the run to be one run: the entry it will save,
    the checkpoint it resumes from, the parent pocket book and the data, byte for byte."""
    return {"entry": str(c.ref), "resume_from": c.resume_from,
            "parent": (c.parent.ref, c.parent.meta.files) if c.parent else None,
            "data": c.dataset.sha256, "home": str(c.library.home),
            "epochs": c.options.epochs}


def _refused_together(exc: BaseException) -> None:
    """Tell the ranks waiting in :func:`_check_together` that the main one refused the run,
    and why, before it stops (never in the way of its own refusal)."""
    from adapterkit.training.launch import share

    try:
        share(("refused", str(exc)))
    except Exception:
        pass


def _check_together(check: Callable[..., _Checked], *, main: bool,
                    clear: Callable[[_Checked], None]) -> _Checked:
    """:func:`_check` on several processes: the main one checks first (and creates the
    catalog, clears an old run's folder), then hands what it saw to the others, which check
    on their own machine and refuse a library or data that differs from the main one's — a
    machine with its own ``--home`` would otherwise resume, stack or save something else."""
    from adapterkit.errors import AdapterkitError
    from adapterkit.training.launch import ranks, share

    where = ranks()
    if main:
        try:
            c = check()
            clear(c)  # (an old run's folder, by the main process only)
        except AdapterkitError as exc:
            _refused_together(exc)
            raise
        except BaseException:
            share(("refused", None))
            raise
        share(("checked", _view(c)))
        return c
    outcome, seen = share()
    if outcome == "refused":  # the main process says why, once
        raise _FollowsMain(seen or "the main process stopped before training")
    elsewhere = where.local_world_size < where.world_size
    shared_home = "; the machines of one run need the same library: give every machine the " \
        "same --home on a shared filesystem" if elsewhere else ""
    try:
        c = check(checkpoint=False)
    except AdapterkitError as exc:
        raise ConfigError(f"cannot train what the main process checked: {exc}{shared_home}"
                          ) from None
    resume_from = seen["resume_from"]
    if resume_from is not None and not Path(resume_from).is_dir():
        raise ConfigError(f"cannot read the checkpoint the main process resumes from "
                          f"({resume_from}){shared_home}")
    # the main one's epochs: a resume keeps the interrupted run's, which only it read
    c = replace(c, resume_from=resume_from, options=replace(c.options, epochs=seen["epochs"]))
    mine = _view(c)
    differs = [key for key in ("entry", "parent", "data") if mine[key] != seen[key]]
    if differs:
        what = {"entry": f"would save {mine['entry']}, not {seen['entry']}",
                "parent": "sees another parent pocket book", "data": "reads other data"}
        raise ConfigError(f"this process (home {mine['home']}) "
                          + ", ".join(what[k] for k in differs)
                          + f", unlike the main process (home {seen['home']})"
                          + (shared_home or "; run every process on the same library"))
    return c


def _check_state(run: _Run, state: Any) -> None:
    """A trainer plugin's ``train`` returns its state; one that returned nothing, or a state
    of no optimizer step, trained nothing — saving it would put an untrained pocket book in
    the library as if it were one."""
    steps = getattr(state, "global_step", None)
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
        return
    owner = f"plugin {run.plugin!r}" if run.plugin else "its plugin"
    what = ("returned None" if state is None else
            f"returned a state of {steps!r} optimizer steps" if steps is not None else
            f"returned a {type(state).__name__} without global_step")
    trained = "no step was trained" if steps == 0 else \
        "nothing shows what was trained (its steps, if any, were not counted)"
    raise PluginError(f"trainer {run.trainer!r} ({owner}) {what}: {trained}, and nothing "
                      "was saved. Its train() must return the trainer's state "
                      "(transformers' trainer.state) after at least one step")


class _FollowsMain(ConfigError):
    """The main process refused the run: it reports why; this rank only stops."""

    after_another = True


def _run(run: _Run) -> Any:
    """The trainer plugin's part: its objective on the job."""
    if run.tracked is None:
        state = run.trainer_obj.train(job=run.job)
    else:
        with run.tracked.active():
            state = run.trainer_obj.train(job=run.job)
    _check_state(run, state)
    return state


def _finalize(run: _Run, state: Any, elapsed: float) -> TrainResult:
    """Measure what the run did (guard, eval, forgetting) and save it into the library."""
    model, metrics = _measure(run, state, elapsed)
    book = _save(run, model, metrics, state)
    shutil.rmtree(run.workdir, ignore_errors=True)
    return TrainResult(book, metrics, model)


def _measure(run: _Run, state: Any, elapsed: float) -> tuple[Any, dict[str, Any]]:
    """The trained model, ready to save (adapter in float32, eval mode), and its metrics."""
    model = run.job.model
    adapter_to_fp32(model)
    model.eval()
    metrics = metrics_of(state, elapsed, run.resumed)
    # where a whole command's time goes besides the loop (imports and the save are not in it)
    metrics["prepare_seconds"] = round(run.prepare_seconds, 2)
    metrics["precision"] = run.job.precision  # what the steps computed in
    from adapterkit.training.launch import ranks
    from adapterkit.training.precision import restore_exact

    if ranks().distributed:  # tokens and tokens/s above are of all ranks together
        metrics["processes"] = ranks().world_size
    from adapterkit.training.early_stop import record_of

    stopped = record_of(run.job.callbacks)
    if stopped is not None:
        metrics["early_stopping"] = stopped
    # the figures below on the base as inference loads it, not on the rounded training copy
    exact = restore_exact(run.loaded)
    if exact:
        from accelerate.utils import extract_model_from_parallel

        from adapterkit.training.precision import name_of

        # accelerate left its bf16 autocast wrapped around the model's forward: take it off
        extract_model_from_parallel(model, keep_fp32_wrapper=False)
        metrics["measured_in"] = name_of(run.loaded.dtype)
    elif run.loaded.rounded_from is not None:
        metrics["measured_in"] = run.job.precision
        run.say("Note: the base's exact weights could not be read back from its files; the "
                f"figures below are measured on its {run.job.precision} copy (recorded so).")
    elif run.loaded.quantization is not None and run.job.precision == "bf16":
        # a quantized base is not held in bf16 (nothing to give back), but the steps ran under
        # accelerate's bf16 autocast, still around the model's forward: the figures are of that
        metrics["measured_in"] = run.job.precision
        run.say(f"Note: the figures below are measured under the run's bf16 autocast on the "
                f"{run.loaded.quantization} base, not as inference computes (recorded so).")
    tokenizer = run.loaded.tokenizer
    phase = "exact" if exact else "steps"

    def base_loss(texts: list[str]) -> float:
        from adapterkit.training.metrics import plain_text_loss

        return run.job.base_text_loss(texts, lambda: plain_text_loss(model, tokenizer, texts),
                                      phase=phase)

    guard = run.guard
    if guard is not None:
        run.job.save_anchor_targets(guard)
    if guard is not None or run.general is not None:
        run.say("Forgetting check on general text...")
    if guard is not None:  # decides which weights are kept, before anything is measured on them
        before = base_loss(guard.general_texts)
        # the weights on the model: the final step's, or early stopping's best evaluation's
        best = stopped["best_step"] if stopped and stopped.get("restored_best") else None
        metrics["guard"] = _guard_report(
            run, model, best or int(metrics.get("steps", 0)), before, early_stopped=bool(best),
            measured_in=metrics.get("measured_in", run.job.precision),
            base_loss_from="cache" if run.job.cache_reads.get(phase) else "this run")
    metrics.update(kept_weights(state, metrics, stopped))
    if run.eval_data is not None and run.head == "reward":  # its own loss: pairs ranked
        from adapterkit.training.reward import preference_eval

        metrics["eval"] = preference_eval(model, tokenizer, run.job.rows(run.eval_data),
                                          max_length=run.job.options.max_length)
    elif run.eval_data is not None and run.eval_data.shape == "preference":
        # pairs without one completion to score: the trainer's own evaluation (DPO's loss on
        # the held-out pairs, against the reference it trains with) of the weights kept
        guarded = metrics.get("guard") or {}
        kept = guarded.get("kept_step") if guarded.get("restored") else None
        figures = trainer_eval(state, stopped, len(run.eval_data.rows), kept=kept)
        if figures is not None:
            metrics["eval"] = figures
        elif kept is not None:
            run.say(f"No held-out figure: the trainer did not evaluate step {kept}, whose "
                    "weights the forgetting guard kept.")
    elif run.eval_data is not None:
        metrics["eval"] = task_loss(model, tokenizer, run.eval_data.rows, chat=run.job.chat)
    if run.general is not None:
        if guard is not None and guard.general_texts == run.general:  # measured just now,
            # on the kept weights, in the same way: not measured twice
            metrics["forgetting"] = forgetting(model, tokenizer, run.general,
                                               base_loss=guard.base_loss, loss=guard.kept_loss)
        else:
            metrics["forgetting"] = forgetting(model, tokenizer, run.general,
                                               base_loss=base_loss(run.general))
        # the "before" is the plain base's: measured now, or by an earlier run on this base
        metrics["forgetting"]["base_loss_from"] = \
            "cache" if run.job.cache_reads.get(phase) else "this run"
        if run.underlay:  # the "before" side had the pocket books underneath active
            metrics["forgetting"]["relative_to"] = "base + " + " + ".join(
                b.ref for b in run.underlay)
    return model, metrics


def trainer_eval(state: Any, stopped: dict[str, Any] | None, pairs: int, *,
                 kept: int | None = None) -> dict[str, Any] | None:
    """The trainer's evaluation of the held-out split at the step whose weights are kept
    (``kept``: the forgetting guard's fallback; else early stopping's best, or the last step),
    from its log: ``loss`` and, where the trainer logs them (TRL's DPO), how often the chosen
    answer's implicit reward beat the rejected one's and by how much on average. None when the
    trainer did not evaluate that step (rlhf's policy stage evaluates nothing: its held-out
    pairs are the reward stage's)."""
    if kept is None:
        kept = stopped["best_step"] if stopped and stopped.get("restored_best") else \
            getattr(state, "global_step", None)
    logged = [h for h in getattr(state, "log_history", [])
              if "eval_loss" in h and h.get("step") == kept]
    if not logged:
        return None
    entry = logged[-1]
    figures: dict[str, Any] = {"loss": float(entry["eval_loss"]), "step": kept, "pairs": pairs,
                               "measured_by": "trainer"}
    for key, name in (("eval_rewards/accuracies", "reward_accuracy"),
                      ("eval_rewards/margins", "reward_margin")):
        if key in entry:
            figures[name] = float(entry[key])
    return figures


def _save(run: _Run, model: Any, metrics: dict[str, Any], state: Any,
          weights: dict[str, Any] | None = None) -> PocketBook:
    run.saving = True
    return save_trained(run.library, model, run.loaded, str(run.ref), trainer=run.trainer,
                        options=run.job.options, data=run.dataset, metrics=metrics,
                        log_history=history_of(state),
                        parents=[run.parent.ref] if run.parent else None,
                        stacked_on=[b.ref for b in run.underlay],
                        stacked_on_sha256={b.ref: b.meta.files[WEIGHTS_FILE]
                                           for b in run.underlay
                                           if b.meta.files.get(WEIGHTS_FILE)},
                        weights=weights,
                        annotate=run.annotate,
                        tracking=_tracking_record(run))


def _tracking_record(run: _Run) -> dict[str, Any] | None:
    """Where the run's trackers wrote, for the metadata; a tracker that was asked for but
    left nothing (a trainer that ignores ``job.callbacks`` or ``report_to``) is named."""
    if run.tracked is None:
        return None
    record = run.tracked.record()
    missing = [name for name in run.tracked.names if name not in record]
    if missing:
        run.say(f"Warning: {', '.join(missing)} recorded nothing of this run (the "
                f"{run.trainer} trainer may not pass job.callbacks or report_to on); "
                "not recorded in the metadata.")
    return record


def _finalize_shared(run: _Run, state: Any, elapsed: float, *, main: bool) -> TrainResult:
    """:func:`_finalize` for a run on several processes: every rank measures (the same
    weights, the same figures: with FSDP's sharded weights each forward needs them all); only
    when every rank measured, and every rank holds the same pocket book, does the main process
    save — alone — and the others return the pocket book it saved."""
    from adapterkit.training.launch import gather, record_saved, share

    problem: str | None = None
    failure: BaseException | None = None
    # Under FSDP every forward here is a collective: a rank that failed half-way must end (its
    # peers' collectives then fail at once), not wait in the gather below while they wait in
    # an all-gather it never joins. Elsewhere each rank measures alone, and reports.
    sharded = any(type(p).__name__ == "DTensor" for p in run.job.model.parameters())
    try:
        model, metrics = _measure(run, state, elapsed)
        weights = whole_weights(model)  # a collective under FSDP; None when each rank has them
        sums = checksum(model) if weights is None else None
    except Exception as exc:
        if sharded:
            raise
        problem, failure = str(exc) or type(exc).__name__, exc
    seen = gather((problem, None if problem else sums))
    if failure is not None:
        raise failure  # this rank's own error: the launcher reports it
    failed = [rank for rank, (p, _) in enumerate(seen) if p is not None]
    if failed:
        raise _AfterAnother(f"rank {failed[0]} failed after training ({seen[failed[0]][0]}); "
                            f"{run.ref} was not saved")
    if any(not same_weights(c, seen[0][1]) for _, c in seen):
        apart = next(rank for rank, (_, c) in enumerate(seen) if not same_weights(c, seen[0][1]))
        raise ConfigError(
            f"the ranks ended with different pocket books (rank {apart}'s LoRA weights differ "
            f"from rank 0's), so {run.ref} was not saved: trainer {run.trainer!r} does not keep "
            "its processes in step. A trainer with its own loop must average gradients across "
            "processes (a transformers/TRL trainer built with job.training_arguments() does, "
            "as does accelerate's Accelerator); or train it with one process")
    if main:
        try:
            book = _save(run, model, metrics, state, weights)
        except BaseException as exc:
            own, why = _own_saved(run), str(exc) or type(exc).__name__
            if own:  # (so the launcher never says nothing was saved)
                with contextlib.suppress(Exception):
                    record_saved(own)
            try:  # the others stop waiting and fail with it
                share(("failed", f"{why} (after {own} was saved)" if own else
                       f"{run.ref} was not saved: {why}"))
            except Exception:
                pass  # they are gone already
            raise
        # saved from here on: whatever ends this process now, the launcher says so
        record_saved(book.ref)
        share(("saved", book.meta.to_json(), str(book.path), metrics))
        shutil.rmtree(run.workdir, ignore_errors=True)
        return TrainResult(book, metrics, model)
    outcome = share()
    if outcome[0] != "saved":
        raise _AfterAnother(f"the main process failed: {outcome[1]}")
    meta = PocketBookMeta.from_dict(json.loads(outcome[1]))
    return TrainResult(PocketBook(meta, Path(outcome[2])), outcome[3], model)


class _AfterAnother(LaunchError):
    """This rank stops because another one failed, which reports why."""

    after_another = True


def _guard_report(run: _Run, model: Any, steps: int, base_loss: float, *, measured_in: str,
                  base_loss_from: str, early_stopped: bool = False) -> dict[str, Any]:
    """The forgetting guard as it acted: the KL weight only if its term was added to the loss
    (a trainer that declared the guard but never added it trained without it).

    :param steps: the step whose weights the model holds (the best evaluation's when
        ``early_stopped`` restored them; only snapshots before it are fallen back to).
    """
    guard = run.guard
    assert guard is not None
    report = guard.finish(model, steps, base_loss)
    which = f"best evaluation's (step {steps})" if early_stopped else "final"
    applied = guard.penalty_calls > 0
    if guard.weight > 0 and not applied:
        run.say(f"Warning: the {run.trainer} trainer never added the forgetting guard's KL term "
                "to its loss; recorded as KL weight 0.")
    if report.restored:
        run.say(f"Forgetting guard: the {which} weights were over the budget of "
                f"{guard.budget_pct:g}%; kept step {report.kept_step}'s (the newest within it; "
                f"--forgetting-budget off keeps the {which} ones).")
    if report.within_budget is False:
        run.say(f"Warning: no checkpoint stayed within the forgetting budget of "
                f"{guard.budget_pct}%; kept the {which} weights. Lower the learning rate, or "
                "raise --guard-weight.")
    return {"budget_pct": guard.budget_pct, "weight": guard.weight if applied else 0.0,
            "kl_batches": guard.penalty_calls, "kl_in_task_forward": guard.folded,
            "kl_every": guard.kl_every,
            "kl_top_k": guard.top_k, "kept_step": report.kept_step,
            "restored": report.restored, "within_budget": report.within_budget,
            "snapshots": guard.snapshots,
            # decided on the figure the forgetting check reports, on the weights kept
            "measured_in": measured_in, "base_loss_from": base_loss_from,
            "anchor_targets_cached": guard.targets_loaded, "checks": report.checks}


def _epochs_of(checkpoint: str) -> float | None:
    """The epochs an interrupted run set out for, as its checkpoint recorded them
    (transformers' ``trainer_state.json``), so a resume keeps its schedule."""
    import json

    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        return float(state["num_train_epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def started_stages(workdir: Path) -> list[str]:
    """The stages this run recorded, those that are pocket-book names only (a bad name, which
    its own run refused, never reaches the folders a --restart removes)."""
    from adapterkit.library.names import validate_name

    try:
        names = json.loads((workdir / STAGES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    out = []
    for name in names if isinstance(names, list) else []:
        try:
            out.append(validate_name(name))
        except InvalidName:
            continue
    return out


def saved_stages(workdir: Path) -> list[str]:
    """The pocket books (``NAME@V``) this run's stages saved, as it recorded them."""
    try:
        refs = json.loads((workdir / SAVED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [r for r in refs if isinstance(r, str)] if isinstance(refs, list) else []


def last_checkpoint(workdir: Path) -> str | None:
    """The last checkpoint a run left in ``workdir`` (transformers' own rule), if any."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(workdir)) if workdir.is_dir() else None


def last_complete_checkpoint(workdir: Path) -> str | None:
    """The newest checkpoint in ``workdir`` that was written whole (its trainer state saved:
    transformers writes it last), if any."""
    import re

    found = [(int(m.group(1)), p) for p in workdir.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()
             and (p / "trainer_state.json").is_file()] if workdir.is_dir() else []
    return str(max(found)[1]) if found else None


def _has_checkpoint(workdir: Path) -> bool:
    return last_complete_checkpoint(workdir) is not None


def _checkpoint(workdir: Path, *, resume: bool, restart: bool, name: str) -> str | None:
    """The checkpoint a run continues from (``resume``), else None; refuses a plain rerun
    beside one. Only whole checkpoints count: one killed while it was written (no trainer
    state) is passed over for the one before, and is written again on the way; a run whose
    only checkpoint is such is no run to resume, and a plain rerun starts it afresh."""
    whole = last_complete_checkpoint(workdir)
    if resume:
        if whole is None:
            last = last_checkpoint(workdir)
            raise RunStateError(
                f"there is no interrupted run of {name} to resume"
                + (f" (its only checkpoint, {Path(last).name}, was cut off while it was "
                   "written)" if last else "") + "; start it without --resume")
        return whole
    if whole is not None and not restart:
        raise RunStateError(
            f"an interrupted run of {name} exists ({Path(whole).name}); pass --resume to "
            "continue it or --restart to discard it"
        )
    return None

