"""``train --search lr,r[,steps] --trials N [--budget 1%]``: a budgeted hyperparameter search.

Each trial is an ordinary ``train`` run (any trainer, ``--on`` and ``--from`` included) on the
same data, scored by its loss on a held-out split (``--eval-split``, or 20% carved from the
data; for a reward head, TRL's reward loss on the held-out pairs) and by its forgetting
figure. The best trial whose forgetting stays within the budget is
kept under the asked name (``NAME``, or ``NAME@N`` for a new version of a name that exists;
the trials are ``NAME-trial-K`` either way) — its files, metadata and a card that carries the
whole trial table (``metrics.search``) — and every other trial's pocket book is discarded.
The sampler and the study are Optuna's (TPE, seeded with ``--seed``: half the trials, at
least 1 and at most 10, drawn at random first, the rest by TPE from the finished ones), kept
in an SQLite file under the run folder, so an interrupted search resumes with ``--resume``:
finished trials are not run again, and the interrupted one is run again with the same
settings. Trials are numbered as the study numbers them (from 0, as in ``NAME-trial-K``),
everywhere the search reports them.

Each trial loads the base itself (as ``train`` does); reusing one resident base across trials
is left for later. With ``launch`` (``--processes N``, ``--accelerate-config``) each trial
trains on N processes of this machine through accelerate's launcher, exactly as
``train --processes N`` does (the trial's options travel as a recipe file), while the study
stays in this process; a search across machines is refused, as every machine would have to
follow the study's draws in step.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import (
    AdapterkitError,
    ConfigError,
    InvalidName,
    MissingDependency,
    RunStateError,
)

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.library.store import Library
    from adapterkit.plugin_api.manager import PluginManager
    from adapterkit.training.job import TrainResult
    from adapterkit.training.options import TrainOptions

#: What ``--search`` can vary, and the option each one sets.
SEARCHABLE = {"lr": "learning_rate", "r": "r", "steps": "max_steps"}
#: Learning rates are drawn log-uniformly from this range.
LR_RANGE = (1e-5, 3e-3)
#: Ranks are drawn from these (alpha follows, keeping the run's alpha / r).
RANKS = (4, 8, 16, 32, 64)
#: Held-out rows a trial needs to be scored.
MIN_EVAL_ROWS = 5
#: The held-out fraction carved from the data when no ``--eval-split`` is given.
DEFAULT_EVAL_SPLIT = 0.2
#: Trials are saved as ``NAME-trial-K`` (and any stage pocket book as ``NAME-trial-K-...``).
TRIAL = "trial-"
#: The most trials TPE draws at random before it models the finished ones (Optuna's default).
MAX_STARTUP_TRIALS = 10


class SearchFailed(AdapterkitError):
    """No trial met the forgetting budget (nothing kept; the message holds the trial table)."""


@dataclass
class SearchResult:
    """The kept pocket book (as its training returned it, under the asked name) and the table
    of every trial."""

    kept: TrainResult
    trials: list[dict[str, Any]] = field(default_factory=list)


def parse_space(text: str) -> list[str]:
    """``lr,r,steps`` → ``["lr", "r", "steps"]``; anything else is refused by name."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in SEARCHABLE]
    if not names or unknown:
        raise ConfigError(f"--search: {', '.join(unknown) or 'nothing'} is not searchable "
                          f"(searchable: {', '.join(SEARCHABLE)}; e.g. --search lr,r)")
    if len(set(names)) != len(names):
        raise ConfigError(f"--search names an option twice: {text}")
    return names


def check_search(space: list[str], trials: int, budget: float | None, rows: int,
                 options: TrainOptions, *, start_from: str | None = None) -> float:
    """Refuse a search that cannot run, before any work; returns the held-out fraction."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise ConfigError(f"--budget must be a positive percentage, got {budget}")
    if "r" in space and start_from:
        raise ConfigError("--search r cannot apply with --from: a copy keeps its own rank")
    if "steps" in space and options.min_steps:
        raise ConfigError("--search steps sets each trial's --max-steps, with which --min-steps "
                          "cannot act: leave --min-steps out")
    if "steps" in space and options.epochs is not None:
        raise ConfigError("--search steps sets each trial's --max-steps, beside which the "
                          "trainer ignores --epochs: leave --epochs out")
    if options.epochs is not None and options.max_steps > 0:  # as train refuses it
        raise ConfigError("--max-steps sets each trial's length, and the trainer ignores "
                          "--epochs beside it: give one")
    split = options.eval_split or DEFAULT_EVAL_SPLIT
    from adapterkit.training.build import held_out_rows

    held_out = held_out_rows(rows, split)
    if held_out < MIN_EVAL_ROWS or held_out >= rows:
        start = max(MIN_EVAL_ROWS + 1, math.ceil(MIN_EVAL_ROWS / split) - 2)
        need = next(n for n in range(start, start + 10)  # (the split's own rounding)
                    if MIN_EVAL_ROWS <= held_out_rows(n, split) < n)
        raise ConfigError(
            f"--search scores each trial on a held-out split of at least {MIN_EVAL_ROWS} rows; "
            f"--eval-split {split} of {rows} rows holds out {held_out}: give at least {need} "
            "rows, or a larger --eval-split")
    return split


def search(trainer: str, *, base: str, data: str, name: str, space: list[str], trials: int,
           budget: float | None = None, options: TrainOptions | None = None,
           home: str | Path | None = None, plugins: PluginManager | None = None,
           on: str | None = None, start_from: str | None = None, resume: bool = False,
           restart: bool = False, callbacks: list[Any] | None = None,
           launch: dict[str, Any] | None = None,
           progress: Callable[[str], None] | None = None) -> SearchResult:
    """Run ``trials`` trainings over ``space`` and keep the best within the forgetting
    ``budget`` (in percent) as ``name``.

    :param name: ``NAME``, or ``NAME@N`` (a new version of a name that exists); the trials,
        the study and its run folder are named after ``NAME``.
    :param space: names from :data:`SEARCHABLE`.
    :param resume: continue an interrupted search of ``name``.
    :param restart: discard an interrupted search of ``name`` (and its trials) first.
    :param launch: ``processes``, ``config_file`` and ``rendezvous_timeout``
        (:func:`~adapterkit.training.launch.plan_launch`'s) to train each trial on several
        processes of this machine, as ``adapterkit train --processes N`` does: the ranks load
        the installed plugins (not ``plugins``) and show their own progress (``callbacks``
        stay unused).
    :raises SearchFailed: no trial stayed within the budget (nothing is kept).
    """
    from adapterkit.library.store import Library
    from adapterkit.plugin_api.manager import default_plugin_manager
    from adapterkit.training.build import general_texts, held_out_rows, refuse_what_cannot_act
    from adapterkit.training.data import load_data
    from adapterkit.training.job import planned_steps
    from adapterkit.training.launch import ranks
    from adapterkit.training.options import (
        GENERAL_OFF,
        TrainOptions,
        build_trainer_options,
        check_options,
        with_data_defaults,
        with_defaults,
    )
    from adapterkit.training.reuse import refuse_taken

    optuna = _optuna()
    say = progress or (lambda message: None)
    options = options or TrainOptions()
    check_options(options)
    if resume and restart:
        raise ConfigError("--resume continues the interrupted search and --restart discards "
                          "it: give one")
    if ranks().distributed:
        raise ConfigError("--search starts its trials' processes itself; run it without a "
                          "launcher (no accelerate launch or torchrun) and give --processes N")
    launch, processes = _trial_launch(launch)
    if options.early_stopping:
        raise ConfigError("--search ranks trials on the held-out split; early stopping would "
                          "choose each trial's weights on the same rows: leave "
                          "--early-stopping out")
    pm = plugins or default_plugin_manager()
    trainer_obj = pm.trainer(trainer)
    if not getattr(trainer_obj, "evaluates", True):  # else a whole trial, then this refusal
        raise ConfigError(f"the {trainer} trainer records no held-out figure of its pocket "
                          "book, which --search ranks trials on: tune it without --search")
    if budget is not None and getattr(trainer_obj, "head", "causal-lm") == "reward":
        raise ConfigError(f"--budget keeps trials by their forgetting figure, and {trainer} "
                          "pocket books (a reward head, which scores text) have none: leave "
                          "--budget out")
    library = Library(home, plugins=pm)
    # NAME or NAME@N, taken ones refused before any trial runs; the kept trial is saved as it
    plain = library.reserve(name).name  # (the trials, the study and its folder: after NAME)
    # NAME is this search's until it ends, as a run's name is its run's: an import or another
    # run under it would leave the kept trial nowhere to go (run_locks.hold_run)
    from adapterkit.library.run_locks import hold_run, release_all

    lock = hold_run(library.home, plain)
    try:
        dataset = load_data(data, formats=pm.data_formats, shapes=trainer_obj.data_shapes,
                            skip_bad_rows=options.skip_bad_rows)
        rows = len(dataset.rows)
        unread = dataset.unread_note()
        if unread:  # (its trials say nothing: they are given no progress)
            say(unread)
        split = check_search(space, trials, budget, rows, options, start_from=start_from)
        if not resume:  # (a resume's trials run on past its first ones: checked with its study)
            _check_trial_length(plain, trials - 1)
        if budget is not None and str(options.general).lower() == GENERAL_OFF:
            raise ConfigError("--budget keeps trials by their forgetting figure, which --general "
                              "off turns off: leave one out")
        rank_choices = _ranks_that_fit(base, library, options, say) if "r" in space else RANKS
        general = options.general or ("general" if budget is not None else None)
        # each trial is scored on the split as trained: no early stopping choosing on it too
        base_options = dataclasses.replace(options, eval_split=split, general=general,
                                           early_stopping=0)
        # what a trial's run would refuse before its base loads, refused before the study exists
        # (a refused trial would leave a study that blocks the next search as an interrupted one)
        resolved = with_defaults(trainer_obj, base_options)
        refuse_what_cannot_act(trainer, trainer_obj, resolved, pm.trainers)
        cadence = ""
        if _scored_by_trainer_log(trainer_obj, dataset.shape) and \
                resolved.forgetting_budget is not None and \
                resolved.guard_every % resolved.save_steps:
            # such a trial is scored by the trainer's own evaluation at the step whose weights it
            # keeps (run.trainer_eval), and the trainer evaluates every save_steps (and at the
            # last step): the guard may keep a snapshot of any guard_every-th step, which must
            # then have been evaluated too. (A trial never resumes from its checkpoints.)
            cadence = (f"; each trial evaluates (and checkpoints) every {resolved.guard_every} "
                       f"steps, where its forgetting guard keeps snapshots, not every "
                       f"{resolved.save_steps}")
            base_options = dataclasses.replace(base_options, save_steps=resolved.guard_every)
            resolved = with_defaults(trainer_obj, base_options)
        if resolved.anchor:
            general_texts(resolved.anchor)
        # (a resumed or restarted search has its trials' own books about, which the preflight's
        # checks of free names would take for a stranger's)
        if not (resume or restart):
            typed = build_trainer_options(trainer_obj, resolved)
            for trial in range(trials):  # (what each trial's run saves besides its own)
                refuse_taken(library, trainer_obj, f"{plain}-{TRIAL}{trial}", resolved, typed,
                             [], offer_reuse=False)  # (each trial trains its own)
            if hasattr(trainer_obj, "preflight"):
                # (the longest of its trials' names: a name derived from it is checked at its
                # longest)
                trainer_obj.preflight(library=library, name=f"{plain}-{TRIAL}{trials - 1}",
                                      options=resolved, trainer_options=typed, data=dataset)
        # the steps a trial takes as its training resolves them (sft: at least its min_steps)
        train_rows = rows - held_out_rows(rows, split)
        planned = planned_steps(with_data_defaults(with_defaults(trainer_obj, base_options),
                                                   train_rows, processes), train_rows, processes)

        # (a pocket-book name never starts with a dot: no run folder of a book can be this one)
        folder = library.home / "runs" / f".search-{plain}"
        setup = _setup(trainer, base=base, data=data, data_sha256=dataset.sha256, space=space,
                       budget=budget, on=on, start_from=start_from, options=base_options,
                       processes=processes)
        if rank_choices != RANKS:  # a study drawn from other ranks cannot go on with these (Optuna
            setup["ranks"] = list(rank_choices)  # refuses another categorical space)
        study = _study(optuna, folder, plain, options.seed, resume=resume, restart=restart,
                       library=library, setup=setup, trials=trials)
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            # interrupted: run again with the same settings; what its run left (a run folder, a
            # pocket book saved just before the interruption) goes
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(stale.params, user_attrs={"again_of": stale.number},
                                skip_if_exists=False)
            stale_name = stale.user_attrs.get("run")
            if stale_name and library.exists(stale_name):  # saved just before the interruption
                library.remove(stale_name, all_versions=True)
            _remove(library, None, stale_name)
            _clean_runs(library, stale_name)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        say(f"Searching {', '.join(space)} over {trials} trials"
            + (f" ({len(done)} done before)" if done else "")
            + f", scored on {split:.0%} held out"
            + (f", forgetting budget {budget:g}%" if budget is not None else "") + cadence
            + (f"; ranks {', '.join(map(str, rank_choices))} (those this base's smallest "
               "targeted layer can hold)" if rank_choices != RANKS else "") + "...")

        while len(done) < trials:
            trial = study.ask()
            settings = _suggest(trial, space, options, planned, rank_choices)
            trial_name = f"{plain}-{TRIAL}{trial.number}"
            trial.set_user_attr("run", trial_name)
            # the study's number (NAME-trial-K's, the table's, the card's), then how far along
            say(f"Trial {trial.number} ({len(done) + 1}/{trials}): " + _settings_text(settings)
                + "...")
            result = None
            try:
                result = _train_trial(trainer, base=base, data=data, name=trial_name,
                                      options=dataclasses.replace(base_options, **settings),
                                      library=library, plugins=pm, on=on, start_from=start_from,
                                      callbacks=callbacks, launch=launch, folder=folder)
                score = _score(result, budget)
            except Exception:  # this trial failed (not interrupted): it is not run again
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                if result is not None:  # saved, then failed to score
                    _remove(library, result.pocket_book.ref, trial_name)
                elif library.exists(trial_name):  # saved by its main rank before another failed
                    library.remove(trial_name, all_versions=True)
                    _remove(library, None, trial_name)
                _clean_runs(library, trial_name)
                raise
            for key, value in {**score, "ref": result.pocket_book.ref}.items():
                trial.set_user_attr(key, value)
            study.tell(trial, score["eval_loss"])
            say(f"  held-out loss {score['eval_loss']:.4f}"
                + (f", forgetting {score['forgetting_pct']:+.2f}%"
                   if score["forgetting_pct"] is not None else "")
                + ("" if score["within_budget"] else " (over the budget)"))
            _discard_losers(study, library, optuna)
            done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]

        table = _table(study, optuna)
        best = _best(table)
        if best is None:
            for row in table:
                _remove(library, row.get("ref"), row.get("run"))
            shutil.rmtree(folder, ignore_errors=True)
            why = (f"no trial stayed within the forgetting budget of {budget:g}%"
                   if budget is not None and not any(row["within_budget"] for row in table)
                   else "every trial within the budget diverged (no finite held-out loss)")
            raise SearchFailed(f"{why}; nothing was kept.\n" + table_text(table))
        kept = _keep(library, best, name, table, space=space, budget=budget, split=split,
                     folder=folder)
        say("Trials:\n" + table_text(table))
        return SearchResult(kept=kept, trials=table)
    finally:
        release_all([lock] if lock is not None else [])


# -- the study ------------------------------------------------------------------------------------

def _optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:
        raise MissingDependency("--search runs on Optuna, which is not installed; "
                                "pip install 'adapterkit[search]'") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _setup(trainer: str, *, base: str, data: str, data_sha256: str, space: list[str],
           budget: float | None, on: str | None, start_from: str | None,
           options: TrainOptions, processes: int) -> dict[str, Any]:
    """What a search's trials depend on (all but ``--trials``), recorded in its study: a
    resume with anything else would rank trials of two different searches. The processes
    count too: each step's global batch is ``batch_size × grad_accum × processes``. As JSON
    reads it back (the study stores it so), so a resume compares like with like."""
    import json

    path = Path(data)
    return json.loads(json.dumps({
        "trainer": trainer, "base": str(base),
        "data": str(path.resolve()) if path.exists() else str(data), "data_sha256": data_sha256,
        "space": space, "budget_pct": budget, "on": on, "from": start_from,
        "processes": processes, "options": options.as_dict()}, default=str))


def _setup_changes(recorded: dict[str, Any], setup: dict[str, Any]) -> list[str]:
    """What differs between a study's recorded setup and this one, one phrase each."""
    changes = []
    for key in sorted(set(recorded) | set(setup)):
        if key == "options":
            was, now = recorded.get(key) or {}, setup.get(key) or {}
            changes += [f"{k} {was.get(k)!r} → {now.get(k)!r}" for k in sorted(set(was) | set(now))
                        if was.get(k) != now.get(k)]
        elif key == "data_sha256" and recorded.get(key) != setup.get(key):
            changes.append("the data's content")
        elif recorded.get(key) != setup.get(key):
            changes.append(f"{key} {recorded.get(key)!r} → {setup.get(key)!r}")
    return changes


def _study(optuna: Any, folder: Path, name: str, seed: int, *, resume: bool, restart: bool,
           library: Library, trials: int, setup: dict[str, Any] | None = None) -> Any:
    """The search's Optuna study (TPE, seeded, drawing the first :func:`startup_trials` of
    ``trials`` at random), in an SQLite file under the run folder; a resume with another
    ``setup`` than the study recorded, or whose trials' names would grow too long, is
    refused."""
    db = folder / "study.db"
    if db.exists() and restart:
        old = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
        for trial in old.trials:  # only what this search's own trials made
            _remove(library, trial.user_attrs.get("ref"), trial.user_attrs.get("run"))
            _clean_runs(library, trial.user_attrs.get("run"))
        shutil.rmtree(folder)
    elif db.exists() and not resume:
        raise RunStateError(f"an interrupted search of {name} is in {folder}: pass --resume to "
                            "continue it or --restart to start over")
    elif resume and not db.exists():
        raise RunStateError(f"no interrupted search of {name} to resume")
    elif not db.exists() and folder.exists():
        shutil.rmtree(folder)  # a search that ended before its first trial was recorded
    ours: set[str] = set()
    if db.exists():  # resuming: what its trials made is its own
        old = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
        recorded = old.user_attrs.get("setup")
        changes = _setup_changes(recorded, setup) if recorded and setup else []
        if changes:
            raise RunStateError(
                f"the interrupted search of {name} ran with other settings "
                f"({'; '.join(changes)}): give the same ones to --resume it, or --restart to "
                "start over")
        ours = {t.user_attrs["run"] for t in old.trials if t.user_attrs.get("run")}
        _check_trial_length(name, _last_trial(old, trials, optuna), resume=True)
    _check_trial_names(library, name, ours)  # before a new study is written
    folder.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{db}",
                                direction="minimize", load_if_exists=True)
    if setup is not None and "setup" not in study.user_attrs:
        study.set_user_attr("setup", setup)
    # seeded, and on a resume seeded past the draws already made (the same seed again would
    # draw the first trials' settings again); TPE models the finished trials once
    # startup_trials of them are in the study (Optuna's default, 10, would leave a search of
    # 10 trials or fewer drawn at random throughout)
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials),
                                               n_startup_trials=startup_trials(trials))
    return study


def startup_trials(trials: int) -> int:
    """The trials of a search of ``trials`` drawn at random before TPE models the finished
    ones: half of them, at least 1, at most :data:`MAX_STARTUP_TRIALS`."""
    return min(MAX_STARTUP_TRIALS, max(1, trials // 2))


def _last_trial(old: Any, trials: int, optuna: Any) -> int:
    """The highest trial number a resume of the study ``old`` to ``trials`` finished trials
    can reach: each interrupted trial is queued again under a new number, and every trial
    still to finish is asked under the next (a queued one's, first)."""
    state = optuna.trial.TrialState
    running = sum(t.state == state.RUNNING for t in old.trials)
    queued = sum(t.state == state.WAITING for t in old.trials) + running
    done = sum(t.state == state.COMPLETE for t in old.trials)
    return len(old.trials) + running - 1 + max(0, trials - done - queued)


def _check_trial_length(name: str, last: int, *, resume: bool = False) -> None:
    """Refuse ``name`` when ``NAME-trial-K`` would be too long a pocket-book name for a trial
    up to number ``last`` (before the study exists, which a failed trial would leave behind
    as an interrupted search)."""
    from adapterkit.library.names import MAX_NAME_LENGTH

    longest = f"{name}-{TRIAL}{last}"
    if len(longest) <= MAX_NAME_LENGTH:
        return
    room = MAX_NAME_LENGTH - (len(longest) - len(name))
    fix = f"give a NAME of at most {room} characters" if room >= 1 else "give fewer --trials"
    if resume:
        fix += ", or --restart the search (its trials numbered from 0 again)"
    raise InvalidName(f"--search saves its trials as {name}-{TRIAL}K, and trial {last} would be "
                      f"{longest} ({len(longest)} characters; a name has at most "
                      f"{MAX_NAME_LENGTH}): {fix}")


def _scored_by_trainer_log(trainer_obj: Any, shape: str) -> bool:
    """Whether a trial's held-out figure is its trainer's own evaluation, read from its log at
    the kept step (preference pairs outside a reward head: dpo), rather than measured on the
    kept weights after training (as :mod:`adapterkit.training.run` measures the others)."""
    return shape == "preference" and getattr(trainer_obj, "head", "causal-lm") != "reward"


def _check_trial_names(library: Library, name: str, ours: set[str]) -> None:
    """Refuse to start when pocket books or run folders named like this search's trials
    exist that its study did not make (``ours``: its trials' names): they are someone
    else's, and a trial's stage books and run folders are removed by name."""
    from adapterkit.training.run import run_dir

    prefix = f"{name}-{TRIAL}"
    books = {s.name for s in library.list(all_versions=True) if s.name.startswith(prefix)}
    runs = {p.name for p in run_dir(library, name).parent.glob(f"{prefix}*")}
    foreign = sorted(n for n in books | runs if not any(
        o and (n == o or n.startswith(o + "-")) for o in ours))
    if foreign:
        raise ConfigError(f"--search saves its trials as {prefix}K, and {', '.join(foreign)} "
                          "already exists (not made by this search): remove it or choose "
                          "another NAME")


def _ranks_that_fit(base: str, library: Library, options: TrainOptions,
                    say: Callable[[str], None] | None = None) -> tuple[int, ...]:
    """The ranks of :data:`RANKS` the base's smallest targeted layer can hold (from its
    config, on the meta device): a trial drawing a larger one would be refused after its base
    loaded, and stop the whole search."""
    from adapterkit.base.load import check_targets, inspect_structure, targeted_layers
    from adapterkit.base.resolve import resolve_base

    structure = inspect_structure(resolve_base(base, library.home, progress=say).folder)
    layers = targeted_layers(structure, check_targets(structure, options.target_modules))
    limit = min((min(structure.linear[p]) for p in layers), default=max(RANKS))
    fit = tuple(r for r in RANKS if r <= limit)
    if not fit:
        raise ConfigError(f"--search r draws ranks {', '.join(map(str, RANKS))}, and this "
                          f"base's smallest targeted layer holds at most rank {limit}: leave r "
                          "out of --search")
    return fit


def _suggest(trial: Any, space: list[str], options: TrainOptions,
             planned: int, ranks: tuple[int, ...] = RANKS) -> dict[str, Any]:
    """The trial's options: the searched ones drawn (ranks among ``ranks``), the rest as
    given."""
    settings: dict[str, Any] = {}
    if "lr" in space:
        settings["learning_rate"] = trial.suggest_float("lr", *LR_RANGE, log=True)
    if "r" in space:
        r = trial.suggest_categorical("r", list(ranks))
        settings.update(r=r, alpha=max(1, round(options.alpha * r / options.r)))
    if "steps" in space:
        settings["max_steps"] = trial.suggest_int("steps", max(1, planned // 2),
                                                  max(2, planned * 2), log=True)
    return settings


def _settings_text(settings: dict[str, Any]) -> str:
    parts = []
    if "learning_rate" in settings:
        parts.append(f"lr {settings['learning_rate']:.2e}")
    if "r" in settings:
        parts.append(f"r {settings['r']} (alpha {settings['alpha']})")
    if "max_steps" in settings:
        parts.append(f"{settings['max_steps']} steps")
    return ", ".join(parts)


def _trial_launch(launch: dict[str, Any] | None) -> tuple[dict[str, Any] | None, int]:
    """The launch each trial runs under (``None``: in this process) and its processes,
    checked before any work; a launch across machines is refused."""
    if not launch or all(v is None for v in launch.values()):
        return None, 1
    from adapterkit.training.launch import plan_launch

    plan = plan_launch(**launch)
    if plan.num_machines > 1:
        raise ConfigError(f"--search trains its trials on this one machine; the launch asks "
                          f"for {plan.num_machines} machines (give --processes N, or an "
                          "accelerate config with num_machines: 1)")
    return (dict(launch) if plan.needed else None), plan.processes


def trial_recipe(options: TrainOptions) -> dict[str, Any]:
    """``options`` as a recipe (``--config``) that rebuilds them exactly: what a launched
    trial's ranks read. Options left ``None`` stay out, so the trainer's defaults fill them
    there as they would here, and so do those at their default: written, they would read as
    given (a dpo trial's ``dropout: 0.05``, which dpo refuses; a ``--from`` trial's rank)."""
    from adapterkit.training.options import TrainOptions

    defaults = TrainOptions().as_dict()
    return {k: v for k, v in options.as_dict().items()
            if v is not None and not (k in defaults and v == defaults[k])}


def _train_trial(trainer: str, *, name: str, library: Library, folder: Path,
                 launch: dict[str, Any] | None = None, **kwargs: Any) -> TrainResult:
    if launch:
        return _launch_trial(trainer, name=name, library=library, launch=launch,
                             folder=folder, **kwargs)
    from adapterkit.training.run import train

    result = train(trainer, name=name, home=library.home, **kwargs)
    if result.model is not None:  # let the trial's model go before the next one loads
        from adapterkit.memory import release_memory

        result.model = None
        release_memory()
    return result


def _launch_trial(trainer: str, *, base: str, data: str, name: str, options: TrainOptions,
                  library: Library, launch: dict[str, Any], folder: Path, on: str | None,
                  start_from: str | None, **_: Any) -> TrainResult:
    """One trial as ``adapterkit train ... --processes N`` trains it: its ranks started
    through accelerate's launcher (the same path, so the same checks and the same result),
    its options in a recipe file; the result read back from the library its main rank saved
    to. (``plugins`` and ``callbacks`` stay here: the ranks load the installed plugins and
    show their own progress, as ``train --processes`` does.)"""
    import os

    import yaml

    from adapterkit.training.job import TrainResult
    from adapterkit.training.launch import NO_REPORT_ENV, relaunch

    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(trial_recipe(options), sort_keys=False), encoding="utf-8")
    argv = ["--home", str(library.home), "train", trainer, "--base", str(base), "--data",
            str(data), "--name", name, "--config", str(recipe)]
    argv += ["--on", on] if on else []
    argv += ["--from", start_from] if start_from else []
    os.environ[NO_REPORT_ENV] = "1"  # the search reports its trials (stdout stays its own)
    try:
        relaunch(argv, **launch)
    finally:
        os.environ.pop(NO_REPORT_ENV, None)
        recipe.unlink(missing_ok=True)
    book = library.get(name)
    return TrainResult(pocket_book=book, metrics=book.meta.metrics)


def _score(result: TrainResult, budget: float | None) -> dict[str, Any]:
    m = result.metrics
    guard = m.get("guard") or {}
    if "eval" not in m and guard.get("restored"):  # (search aligns dpo's evaluations with the
        # guard's snapshots; a trainer that evaluates on a cadence of its own may still miss)
        raise ConfigError(f"trial {result.pocket_book.ref}: the forgetting guard kept step "
                          f"{guard.get('kept_step')}'s weights, which the "
                          f"{result.pocket_book.meta.trainer} trainer did not evaluate on the "
                          "held-out split that --search scores trials on")
    if "eval" not in m:
        raise ConfigError(f"{result.pocket_book.meta.trainer} records no held-out loss, which "
                          "--search scores trials on")
    eval_loss = m["eval"].get("loss")
    if eval_loss is None:  # nothing was scored
        raise ConfigError(f"trial {result.pocket_book.ref} scored no held-out row: none fits "
                          "--max-length; raise it")
    if not math.isfinite(eval_loss):  # diverged (nan, inf): ranked last, never kept
        eval_loss = math.inf
    forgetting = (m.get("forgetting") or {}).get("general_loss_change_pct")
    within = budget is None or (forgetting is not None and forgetting <= budget)
    return {"eval_loss": float(eval_loss), "forgetting_pct": forgetting, "within_budget": within,
            "steps": int(m.get("steps", 0))}


def _table(study: Any, optuna: Any) -> list[dict[str, Any]]:
    """One row per finished trial, in order: its settings, score and forgetting."""
    rows = []
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        rows.append({"trial": t.number, **{k: t.params[k] for k in ("lr", "r") if k in t.params},
                     "steps": t.user_attrs.get("steps", t.params.get("steps")),
                     "eval_loss": t.value, "forgetting_pct": t.user_attrs.get("forgetting_pct"),
                     "within_budget": bool(t.user_attrs.get("within_budget")),
                     **({"again_of": t.user_attrs["again_of"]} if "again_of" in t.user_attrs
                        else {}),
                     "ref": t.user_attrs.get("ref"), "run": t.user_attrs.get("run")})
    return rows


def _best(table: list[dict[str, Any]]) -> dict[str, Any] | None:
    eligible = [row for row in table if row["within_budget"] and math.isfinite(row["eval_loss"])]
    return min(eligible, key=lambda row: row["eval_loss"]) if eligible else None


def _discard_losers(study: Any, library: Library, optuna: Any) -> None:
    """Only the best eligible trial so far keeps its pocket book (disk holds one at a time)."""
    table = _table(study, optuna)
    best = _best(table)
    for row in table:
        if best is None or row["trial"] != best["trial"]:
            _remove(library, row.get("ref"), row.get("run"))


def _remove(library: Library, ref: str | None, trial_name: str | None) -> None:
    """A trial's pocket book — exactly the ``name@version`` it committed — and any a stage of
    it saved (``NAME-trial-K-...``, a name checked free when the search started)."""
    if ref and library.exists(ref):
        library.remove(ref)
    if not trial_name:
        return
    for summary in library.list(all_versions=True):
        if summary.name.startswith(trial_name + "-") and library.exists(summary.name):
            library.remove(summary.name, all_versions=True)


def _clean_runs(library: Library, trial_name: str | None) -> None:
    """The run folders a trial that did not finish left (its own and its stages')."""
    from adapterkit.training.run import run_dir

    if not trial_name:
        return
    runs = run_dir(library, trial_name).parent
    for folder in [runs / trial_name, *runs.glob(f"{trial_name}-*")]:
        shutil.rmtree(folder, ignore_errors=True)


def _keep(library: Library, best: dict[str, Any], name: str, table: list[dict[str, Any]], *,
          space: list[str], budget: float | None, split: float, folder: Path) -> TrainResult:
    """The best trial's pocket book under ``name``, its card and metadata carrying the trial
    table; the trial's own entry removed."""
    from adapterkit.library.card import write_card
    from adapterkit.library.metadata import METADATA_FILE, PocketBookMeta
    from adapterkit.library.names import parse_ref
    from adapterkit.training.job import TrainResult

    source = library.get(best["ref"])
    meta = PocketBookMeta.read(source.path)
    meta.metrics = dict(meta.metrics or {})
    meta.metrics["search"] = {
        "space": space, "objective": "held-out loss", "eval_split": split,
        "budget_pct": budget, "kept": best["trial"],
        # a diverged trial's loss (inf) as null: the metadata is JSON
        "trials": [{k: None if isinstance(v, float) and not math.isfinite(v) else v
                    for k, v in row.items() if k not in ("ref", "run")} for row in table]}
    with library.draft() as staged:
        for item in source.path.iterdir():
            if item.is_file() and item.name != METADATA_FILE:
                shutil.copy2(item, staged / item.name)
        ref = parse_ref(name)  # what commit records for a free NAME or NAME@N (it refuses a
        meta.name, meta.version = ref.name, library.version_to_save(ref)  # taken one): the card's
        write_card(staged, meta)
        book = library.commit(staged, meta, name=name, run=True)  # (the search holds NAME)
    # the search is over once NAME is saved: its study goes first, so a failure to remove the
    # trial's copy leaves a book to remove by hand, never a search to resume
    shutil.rmtree(folder, ignore_errors=True)
    library.remove(source.ref)  # (a stage book of the kept trial stays: the kept one names it)
    return TrainResult(pocket_book=book, metrics=book.meta.metrics)


def table_text(table: list[dict[str, Any]]) -> str:
    """The trial table as aligned text (``train --search`` prints it; so does a failure)."""
    header = f"{'trial':>5}  {'lr':>9}  {'r':>3}  {'steps':>5}  {'held-out':>9}  {'forgetting':>10}"
    lines = [header]
    for row in table:
        lr = f"{row['lr']:.2e}" if "lr" in row else "-"
        forgetting = f"{row['forgetting_pct']:+.2f}%" if row["forgetting_pct"] is not None \
            else "-"
        lines.append(f"{row['trial']:>5}  {lr:>9}  {row.get('r', '-')!s:>3}  "
                     f"{row['steps']!s:>5}  {row['eval_loss']:>9.4f}  {forgetting:>10}"
                     + ("" if row["within_budget"] else "  over budget"))
    return "\n".join(lines)
