"""Pipeline recipes: instruction tuning, preference alignment and online RL as one command.

A recipe (``adapterkit pipeline RECIPE.yaml``) names a base, options shared by every stage, and
the stages in order. Each stage is an ordinary :func:`~adapterkit.training.run.train` call on
the same resident base, trained ``on:`` the stage before it unless it says otherwise.

The whole recipe is checked before the first step of the first stage — keys, options, trainer
options, data, references between stages, names (:mod:`adapterkit.training.recipe`), then
what needs the base — and every problem is reported in one :class:`ConfigError`. Each
finished stage records in its metadata (``pipeline``) the recipe's hash and a fingerprint of its
own definition (base, trainer, options, data contents, and what it trains on), so a failed
or interrupted pipeline run again with ``resume`` skips exactly the stages the same definition
already made and continues the interrupted one from its last checkpoint. Every stage's card
shows the lineage up to it: each stage with its metrics and forgetting figure.
"""

from __future__ import annotations

__all__ = ["PipelineResult", "Recipe", "Stage", "StageResult", "lineage_entry", "load_recipe",
           "read_recipe", "run_pipeline", "stage_line"]

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterkit.errors import AdapterkitError, ConfigError, RunStateError
from adapterkit.files import atomic_write_text
from adapterkit.library.metadata import PocketBookMeta
from adapterkit.library.names import parse_ref
from adapterkit.library.run_locks import RunLock, hold_run, release_all
from adapterkit.library.store import Library, PocketBook
from adapterkit.training.build import check_lengths, load_for_method, split_eval
from adapterkit.training.data import as_chat, check_rendering
from adapterkit.training.job import TrainResult
from adapterkit.training.metrics import base_loss_note
from adapterkit.training.options import GENERAL_OFF
from adapterkit.training.recipe import (
    Recipe,
    Stage,
    interrupted,
    load_recipe,
    read_recipe,
    stage_marker,
)
from adapterkit.training.reuse import after_stop
from adapterkit.training.run import tag, train

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.base.load import Base
    from adapterkit.plugin_api.manager import PluginManager

@dataclass
class StageResult:
    stage: Stage
    pocket_book: PocketBook
    metrics: dict[str, Any]
    #: Made by an earlier run of the pipeline (``resume``): its figures were measured then.
    skipped: bool = False


@dataclass
class PipelineResult:
    recipe: Recipe
    stages: list[StageResult]
    #: The last stage's training result (its model stays loaded), or None if it was skipped.
    final: TrainResult | None = None

    @property
    def pocket_book(self) -> PocketBook:
        return self.stages[-1].pocket_book


Callbacks = Callable[[Stage], list[Any]]


def run_pipeline(recipe: Recipe | str | os.PathLike[str], *,
                 home: str | os.PathLike[str] | None = None,
                 plugins: PluginManager | None = None, resume: bool = False,
                 restart: bool = False, callbacks: Callbacks | None = None,
                 progress: Callable[[str], None] | None = None) -> PipelineResult:
    """Run a recipe's stages in order on one resident base; return each stage's result.

    :param recipe: a recipe file, or one :func:`load_recipe` checked (with the same ``home``,
        ``plugins``, ``resume`` and ``restart``).
    :param resume: skip the stages an earlier run of the same definitions finished, and continue
        the interrupted one from its last checkpoint.
    :param restart: discard the interrupted run of a stage and train it anew (with ``resume``:
        after the finished stages are skipped).
    :param callbacks: ``stage → [TrainerCallback, ...]`` for each stage trained (progress bars).
    """
    from adapterkit.plugin_api.manager import default_plugin_manager
    from adapterkit.training.launch import ranks

    pm = plugins or default_plugin_manager()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, home=home, plugins=pm, resume=resume, restart=restart)
    main = ranks().is_main  # on several processes every rank runs this; the main one writes
    say = (progress if main else None) or (lambda message: None)
    library = Library(home, plugins=pm)
    if ranks().distributed:
        _agree_on_stages(recipe, library, resume=resume and not restart, main=main)
    pending = [s for s in recipe.stages if s.done is None]
    # every stage still to train holds its name from now on, as a run holds its own: an import
    # meanwhile under a later stage's name would stop the pipeline at that stage, its earlier
    # stages trained for nothing. Each is handed to its stage's train(), never let go between.
    names = _hold_names(library, pending) if main else {}
    try:
        return _run_stages(recipe, library, pm, pending, names, say=say, main=main,
                           resume=resume, restart=restart, callbacks=callbacks)
    finally:
        release_all(list(reversed(names.values())))


def _hold_names(library: Library, pending: list[Stage]) -> dict[str, RunLock]:
    """The run locks of the ``pending`` stages' names, and of the names their runs save
    besides (``Stage.also_saves``); refused where a run trains one."""
    held: dict[str, RunLock] = {}
    try:
        for stage in pending:
            for key in (parse_ref(n).name for n in (stage.name, *stage.also_saves)):
                if key in held:
                    continue
                try:
                    lock = hold_run(library.home, key,
                                    instead="give the stage another name (name:)")
                except RunStateError as exc:  # said for a pipeline: which stage
                    whose = f"{stage.label}:" if key == parse_ref(stage.name).name else \
                        f"{stage.label[:-1]}, {stage.trainer}) saves {key} besides its own " \
                        "pocket book, and"
                    raise RunStateError(f"{whose} {exc}") from None
                if lock is not None:
                    held[key] = lock
    except BaseException:
        release_all(list(reversed(held.values())))
        raise
    return held


def _run_stages(recipe: Recipe, library: Library, pm: PluginManager, pending: list[Stage],
                names: dict[str, RunLock], *, say: Callable[[str], None], main: bool,
                resume: bool, restart: bool, callbacks: Callbacks | None) -> PipelineResult:
    total = len(recipe.stages)
    loaded = _load_checked(recipe, pending, library, pm, say) if pending else None
    results: list[StageResult] = []
    final: TrainResult | None = None
    for stage in recipe.stages:
        head = f"Stage {stage.index}/{total}: {stage.name} ({stage.trainer})"
        if stage.done is not None:
            say(f"{head}: {stage.done.ref} was finished by an earlier run; skipped")
            results.append(StageResult(stage, stage.done, dict(stage.done.meta.metrics),
                                       skipped=True))
            continue
        if final is not None:  # the previous stage's model: give the shared base back
            _release(final)
            final = None
        loaded = _base_for(stage, loaded, recipe.base, library, pm, say)
        on, start_from = _refs(stage, results)
        checkpoint = interrupted(library, stage) if resume and not restart else None
        say(head + (f": resuming from {checkpoint}" if checkpoint else ""))
        marker = stage_marker(library, stage)
        if main:  # the definition this run of the stage trains under (load_recipe checks it)
            marker.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, json.dumps({"stage_sha256": stage.fingerprint}))
        keys = [parse_ref(n).name for n in (stage.name, *stage.also_saves)]
        held = [names[k] for k in keys if k in names]  # (in names until let go: released by
        # the caller however it ends)
        try:
            for lock in held:  # train() takes it as its run's, as it is (and the runs it
                lock.hand_over()  # makes of the names it saves besides, theirs)
            final = train(stage.trainer, base=loaded, data=stage.data, name=stage.name,
                          options=stage.options, home=library.home, plugins=pm,
                          resume=checkpoint is not None, restart=restart, on=on,
                          start_from=start_from,
                          callbacks=callbacks(stage) if callbacks else None, progress=say,
                          annotate=_recorder(recipe, stage, results))
        except BaseException as exc:
            saved = [r.pocket_book.ref for r in results]
            were = "(earlier stages) are" if len(saved) > 1 else "(an earlier stage) is"
            own = getattr(exc, "saved_own", None)  # (what stopped it came after its commit,
            if own and main:  # which records the stage as done: the run said so)
                with contextlib.suppress(OSError):
                    marker.unlink(missing_ok=True)
            say(f"{head} stopped" + (" after its pocket book was saved" if own else "")
                + ("; " + f"{', '.join(saved)} {were} saved" if saved else
                   "" if own else "; no stage was saved")
                + f". {_go_on(exc, stage, pm, last=stage is recipe.stages[-1])}.")
            tag(exc, pipeline_stage=stage.index)
            raise
        finally:  # (train() let go of them, unless it stopped before taking them)
            release_all(held)
            for k in keys:
                names.pop(k, None)
        if main:
            marker.unlink(missing_ok=True)
        results.append(StageResult(stage, final.pocket_book, dict(final.metrics)))
    return PipelineResult(recipe, results, final)


def _go_on(exc: BaseException, stage: Stage, pm: PluginManager, *, last: bool = False) -> str:
    """How to go on after ``stage`` stopped with ``exc``: past what its run saved besides its
    own pocket book (a resume of the stage would train that again), the ways that work
    (:func:`adapterkit.training.reuse.after_stop`); past its own, or else, ``--resume``."""
    plain = f"Run the pipeline again with --resume to continue from stage {stage.index}"
    own, besides = getattr(exc, "saved_own", None), getattr(exc, "stages_saved", [])
    if own:  # (what stopped it came after its commit, which records the stage as done)
        return ("Its pocket book is the pipeline's last: nothing is left to train" if last else
                f"Run the pipeline again with --resume to go on past stage {stage.index}")
    if not besides:
        return plain
    try:  # (never in the way of why the stage stopped)
        return "Its run saved " + after_stop(pm.trainer(stage.trainer), besides, stage.options,
                                             stage.label, stage.options_key)
    except Exception:
        return plain


def _agree_on_stages(recipe: Recipe, library: Library, *, resume: bool, main: bool) -> None:
    """On several processes, every rank must skip and resume the same stages: the main
    process's view (what its library holds) is handed to the others, which refuse to go on
    when theirs differs — a machine with its own ``--home`` would train alone."""
    from adapterkit.training.launch import ranks, share

    mine = [(s.done.ref if s.done else None, interrupted(library, s) if resume else None)
            for s in recipe.stages]
    seen = share(mine)
    if not main and mine != seen:
        stage = next(s for s, a, b in zip(recipe.stages, mine, seen) if a != b)
        hint = "give every machine the same --home on a shared filesystem" \
            if ranks().local_world_size < ranks().world_size else \
            "run every process on the same library"
        raise ConfigError(f"{stage.label}: this process's library ({library.home}) does not "
                          "hold what the main process's does (finished stages, interrupted "
                          f"runs): {hint}")


def _load_checked(recipe: Recipe, pending: list[Stage], library: Library, pm: PluginManager,
                  say: Callable[[str], None]) -> Base:
    """Load the base for the first stage to train, and check what needs it for every stage to
    train — LoRA targets and rank, prompt lengths — before the first step, all at once."""
    from adapterkit.base.load import check_rank, check_targets
    from adapterkit.lora.underlay import check_policy
    from adapterkit.training.metrics import uses_chat

    # as train() loads a base by name: on this rank's device, converted once per machine
    loaded = load_for_method(recipe.base, pm.method(pending[0].options.method), library, say,
                             pending[0].options.precision)
    structure = loaded.structure()
    problems: list[str] = []
    for stage in pending:
        options = stage.options
        try:
            ref = stage.on or stage.start_from
            if stage.parent is None and ref is not None:  # a library book: a policy of this base
                check_policy(library.get(ref), loaded, role="on:" if stage.on else "from:")
            if stage.start_from is None:  # a copy keeps its own targets and rank
                check_rank(structure, check_targets(structure, options.target_modules), options.r)
            assert stage.dataset is not None
            rows = split_eval(stage.dataset, options.eval_split, options.seed)[0]
            check_rendering(rows, options.chat, template=bool(loaded.tokenizer.chat_template))
            job_rows = [as_chat(r) for r in rows.rows] if rows.shape == "messages" else rows.rows
            check_lengths(loaded.tokenizer, job_rows, options.max_length,
                          uses_chat(loaded.tokenizer, options.chat))
        except AdapterkitError as exc:
            problems.append(f"({len(problems) + 1}) {stage.label}: {exc}")
    if problems:
        count = f"{len(problems)} problems" if len(problems) > 1 else "a problem"
        raise ConfigError(f"recipe {recipe.path} has {count} on base {recipe.base}; nothing "
                          "was trained: " + "; ".join(problems))
    return loaded


def _base_for(stage: Stage, loaded: Base | None, spec: str, library: Library,
              pm: PluginManager, say: Callable[[str], None]) -> Base:
    """The resident base in the precision the stage's method needs: the one already loaded,
    unless a stage changes it (lora → qlora, bf16 → fp32), when it is let go before the other
    loads."""
    from adapterkit.training.build import base_dtype
    from adapterkit.training.precision import training_dtype

    method = pm.method(stage.options.method)
    if loaded is not None and loaded.quantization == method.quantization:
        device = str(loaded.model.device)
        wanted = training_dtype(stage.options.precision, device, method.quantization)
        if base_dtype(loaded) == wanted or (device == "cpu" and method.quantization is None):
            return loaded  # (on a CPU, train() holds it in the stage's dtype and back)
        if method.quantization is not None and stage.options.precision == "auto":
            return loaded  # a 4-bit base computes in the dtype it was loaded with
    if loaded is not None:
        from adapterkit.memory import release_memory

        loaded.model = None
        release_memory()
    return load_for_method(spec, method, library, say, stage.options.precision)


def _refs(stage: Stage, results: list[StageResult]) -> tuple[str | None, str | None]:
    """``(on, from)`` as train() takes them: a stage of this recipe by the pocket book it
    saved (or an earlier run saved), exactly."""
    if stage.parent is None:
        return stage.on, stage.start_from
    ref = results[stage.parent - 1].pocket_book.ref
    return (ref, None) if stage.on is not None else (None, ref)


def _release(result: TrainResult) -> None:
    """Take a finished stage's pocket book off the shared base, which the next stage reuses."""
    from adapterkit.memory import release_memory

    result.model.unload()
    result.model = None
    release_memory()


def lineage_entry(stage: Stage, ref: str, meta: PocketBookMeta,
                  metrics: dict[str, Any]) -> dict[str, Any]:
    """What the lineage records of one stage: its pocket book, what it trained on, and the
    figures measured when it was trained (numbers, eval loss, forgetting)."""
    parent = meta.parents[0] if meta.parents else None
    return {
        "stage": stage.index, "name": stage.name, "ref": ref, "trainer": stage.trainer,
        "method": meta.method, "data": meta.data.get("description"),
        "on": parent if stage.on is not None else None,
        "from": parent if stage.start_from is not None else None,
        "metrics": {k: v for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                    or k == "weights_kept_by" and isinstance(v, str)},  # (its train-loss cell)
        "eval_loss": (metrics.get("eval") or {}).get("loss"),
        "forgetting": metrics.get("forgetting"),
    }


def _recorder(recipe: Recipe, stage: Stage,
              results: list[StageResult]) -> Callable[[PocketBookMeta], None]:
    """What train() writes into the stage's new pocket book in its own commit — the recipe,
    its fingerprint, the lineage so far — so a kill can never leave a stage's book without
    the record that lets ``--resume`` recognise it."""
    def annotate(meta: PocketBookMeta) -> None:
        lineage = [lineage_entry(r.stage, r.pocket_book.ref, r.pocket_book.meta, r.metrics)
                   for r in results]
        lineage.append(lineage_entry(stage, f"{meta.name}@{meta.version}", meta, meta.metrics))
        meta.pipeline = {"recipe": recipe.path.name, "recipe_sha256": recipe.sha256,
                         "stage": stage.index, "stages": len(recipe.stages),
                         "stage_name": stage.name, "stage_sha256": stage.fingerprint,
                         "lineage": lineage}
    return annotate


def stage_line(result: StageResult, total: int) -> str:
    """One line for the end of a run: the stage's pocket book, steps, final loss, forgetting."""
    m = result.metrics
    loss = m.get("train_loss_final")
    line = (f"{result.stage.index}/{total} {result.pocket_book.ref} ({result.stage.trainer}): "
            f"{m.get('steps', '?')} steps, "
            + (f"final loss {loss:.4f}" if loss is not None else "no loss logged"))
    if m.get("weights_step") is not None:  # the final loss is not the saved weights'
        from adapterkit.library.card import kept_weights_line

        line += f" ({kept_weights_line(m)})"
    f = m.get("forgetting")
    if f:
        line += (f", forgetting {f['general_loss_change_pct']:+.2f}% (general-text loss "
                 f"{f['general_loss_base']:.4f} → {f['general_loss']:.4f}"
                 + (f", relative to {f['relative_to']})" if f.get("relative_to") else ")")
                 + base_loss_note(f))
    else:  # why, as the stage was defined
        general = result.stage.options.general if result.stage.options else None
        reason = "a reward head scores text" if result.stage.trainer == "reward" else \
            "general: off" if isinstance(general, str) and general.lower() == GENERAL_OFF else \
            "no general:"
        line += f", forgetting not measured ({reason})"
    return line + (" — finished by an earlier run" if result.skipped else "")
