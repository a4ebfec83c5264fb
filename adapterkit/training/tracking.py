"""Experiment trackers (``--report-to``): which exist, whether they are installed, where a run's
records go, and what the pocket book records about them.

transformers' own integrations do the logging (``TrainingArguments.report_to``); this module
only chooses the places, so that nothing leaves the machine unless the user asked:

* TensorBoard: event files under the library home (``tracking/tensorboard/<run>``);
* trackio: its local store (trackio's own folder, ``TRACKIO_DIR``), unless a Space or server
  is named in trackio's environment variables;
* W&B: offline (files under the home) unless ``WANDB_MODE`` or ``WANDB_API_KEY`` is set;
* MLflow: a SQLite file under the home (``tracking/mlflow.db``) unless
  ``MLFLOW_TRACKING_URI`` is set.

A variable the user has set always wins. Each run has its own name (``NAME@V-<time>``), kept
in the run's work folder with the W&B run id (chosen here, before W&B starts) and the MLflow
run id (MLflow's, noted when its run starts), so that ``--resume`` continues the same tracker
run: ``WANDB_RUN_ID`` with ``WANDB_RESUME=allow``, ``MLFLOW_RUN_ID`` (both read by the trackers
themselves when transformers' integration opens its run).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Tracker:
    """A tracker transformers reports to: the module it needs and the extra that installs it."""

    name: str
    module: str
    extra: str


#: The trackers ``--report-to`` accepts (``none``, the default, reports to none).
TRACKERS: dict[str, Tracker] = {t.name: t for t in (
    Tracker("tensorboard", "tensorboard", "trackers"),
    Tracker("trackio", "trackio", "trackers"),
    Tracker("wandb", "wandb", "wandb"),
    Tracker("mlflow", "mlflow", "mlflow"),
)}
#: The run's name and tracker run ids, kept in its work folder for ``--resume``.
RUN_FILE = "tracking.json"
#: Variables an active run of ours set (how many runs set each): a stage a run trains inside
#: its own (rlhf's reward pocket book) sets its own values over them, where a variable the
#: user set is kept.
_OURS: dict[str, int] = {}


def _user(key: str) -> str | None:
    """``key``'s value if the user set it (not an enclosing run of ours)."""
    return None if key in _OURS else os.environ.get(key)


def trackers_of(value: Any) -> list[str]:
    """``report_to`` as a list of lower-case names, without ``none`` (a comma-separated string
    is split); the names are not checked here (:func:`tracker_problems` does)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if name and name != "none" and name not in names:
            names.append(name)
    return names


def tracker_problems(value: Any) -> list[str]:
    """Every problem with ``report_to``, one line each: unknown names (with the close ones),
    ``none`` beside a tracker, and trackers that are not installed (with the extra to install).
    Checked with the other options, before the base loads."""
    raw = [str(v).strip().lower() for v in (value.split(",") if isinstance(value, str)
                                            else value or [])]
    problems: list[str] = []
    names = trackers_of(value)
    if "none" in raw and names:
        problems.append(f"report_to: none means no tracker; leave it out beside "
                        f"{', '.join(names)}")
    known = ", ".join([*TRACKERS, "none"])
    for name in names:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            why = " (name each tracker: nothing is sent anywhere unless asked)" \
                if name == "all" else ""
            problems.append(f"report_to: unknown tracker {name!r}{hint}{why}; known: {known}")
        elif not installed(TRACKERS[name].module):
            problems.append(f"report_to: {name} is not installed; install it with "
                            f"pip install 'adapterkit[{TRACKERS[name].extra}]'")
        else:
            broken = import_problem(TRACKERS[name].module)
            if broken:
                problems.append(f"report_to: {name} is installed but cannot be imported "
                                f"({broken}); repair it, e.g. pip install --force-reinstall "
                                f"'adapterkit[{TRACKERS[name].extra}]'")
    return problems


def import_problem(module: str) -> str:
    """Why ``module``, which is installed, fails to import ('' when it imports): a broken
    install (a dependency missing, say) is found before the base loads, not as a traceback
    in the run's first stage. Only for trackers asked for: importing one takes a moment."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # whatever the package raises as it imports
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    return ""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    return importlib.util.find_spec(module) is not None


def tracking_root(home: Path) -> Path:
    """Where the library keeps tracker files (TensorBoard events, W&B offline runs, MLflow)."""
    return home / "tracking"


@dataclass
class TrackedRun:
    """One training run's trackers: the environment they run in, the callback that sees where
    they wrote, and the record for the pocket book's metadata (:meth:`record`)."""

    names: list[str]
    home: Path
    run_name: str
    #: The W&B run id this run logs to (the interrupted run's on ``--resume``).
    wandb_id: str = ""
    #: The MLflow run this run continues (``--resume``), and the store it lives in.
    mlflow_id: str = ""
    mlflow_uri: str = ""
    #: Whether this run continues an interrupted one.
    resumed: bool = False
    #: The run's work folder, where the main process keeps :data:`RUN_FILE` up to date.
    workdir: Path | None = None
    #: What each tracker reported on the main process, filled in while the run trains.
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The W&B run that was open before this one started (the caller's own: left open).
    _wandb_before: Any = None

    @property
    def tensorboard_dir(self) -> Path:
        return Path(_user("TENSORBOARD_LOGGING_DIR") or
                    tracking_root(self.home) / "tensorboard" / self.run_name).expanduser()

    def environment(self) -> dict[str, str]:
        """The variables each tracker is given for this run (those the user set are kept)."""
        root = tracking_root(self.home)
        env: dict[str, str] = {}
        if "tensorboard" in self.names:
            env["TENSORBOARD_LOGGING_DIR"] = str(self.tensorboard_dir)
        if "wandb" in self.names:
            if not (_user("WANDB_MODE") or _user("WANDB_API_KEY")):
                env["WANDB_MODE"] = "offline"  # nothing leaves the machine unless asked
            env["WANDB_DIR"] = str(root)  # W&B writes its runs in a wandb/ folder in it
            env["WANDB_PROJECT"] = "adapterkit"
            if self.wandb_id:  # the same id on --resume: W&B appends to that run
                env["WANDB_RUN_ID"] = self.wandb_id
                if self.resumed:
                    env["WANDB_RESUME"] = "allow"
        if "mlflow" in self.names:
            # a SQLite store: MLflow 3 refuses its old file store (``./mlruns``)
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{(root / 'mlflow.db').resolve()}"
            env["MLFLOW_EXPERIMENT_NAME"] = "adapterkit"
            uri = _user("MLFLOW_TRACKING_URI") or env["MLFLOW_TRACKING_URI"]
            experiment = _user("MLFLOW_EXPERIMENT_NAME") or env["MLFLOW_EXPERIMENT_NAME"]
            # the run lives in this store, and is not still open in this process (a Python
            # caller's interrupted run: transformers logs to the open run by itself)
            if self.mlflow_id and uri == self.mlflow_uri and _mlflow_run() is None \
                    and _mlflow_continues(uri, self.mlflow_id, experiment):
                env["MLFLOW_RUN_ID"] = self.mlflow_id
        return {k: v for k, v in env.items() if not _user(k)}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The run's trackers configured (the variables restored after); what they print goes
        to stderr, as adapterkit's own progress does, so stdout stays the command's answer."""
        env = self.environment()
        before = {k: os.environ.get(k) for k in env}
        wandb = sys.modules.get("wandb")
        self._wandb_before = getattr(wandb, "run", None)
        if "wandb" in self.names or "mlflow" in self.names:  # they expect the folder
            tracking_root(self.home).mkdir(parents=True, exist_ok=True)
        os.environ.update(env)
        for key in env:
            _OURS[key] = _OURS.get(key, 0) + 1
        try:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        except BaseException:
            self._end_interrupted()
            raise
        finally:
            for key, value in before.items():
                _OURS[key] -= 1
                if not _OURS[key]:
                    del _OURS[key]
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def callback(self) -> Any:
        """A transformers callback that notes where each tracker writes. It runs after the
        integrations (a trainer's own callbacks follow transformers' reporting ones), so at
        ``on_train_begin`` their runs exist."""
        from transformers import TrainerCallback

        run = self

        class WhereTracked(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.is_world_process_zero:
                    run._note_started()

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.is_world_process_zero:
                    run._finish()

        return WhereTracked()

    def _finish(self) -> None:
        """Close the W&B run the integration opened (transformers leaves it open until the
        process exits, which would print its summary after the command's answer)."""
        wandb = sys.modules.get("wandb")
        current = getattr(wandb, "run", None)
        if "wandb" in self.names and current is not None and current is not self._wandb_before:
            wandb.finish()  # type: ignore[union-attr]

    def _end_interrupted(self) -> None:
        """End this run's MLflow run as killed while its store is still configured: MLflow's
        own exit handler would end it later, after the variables are restored, in a new store
        in the working directory (a stray ``mlflow.db``). ``--resume`` reopens it."""
        ours = self.seen.get("mlflow", {}).get("run_id")
        current = _mlflow_run()
        if ours and current is not None and current.info.run_id == ours:
            with contextlib.suppress(Exception):  # the interruption is what the user sees
                sys.modules["mlflow"].end_run(status="KILLED")

    def _note_started(self) -> None:
        for name in self.names:
            where = _WHERE[name](self)
            if where:
                self.seen[name] = where
        mlflow = self.seen.get("mlflow")
        if mlflow:  # MLflow picks its run's id: keep it for a --resume
            self.mlflow_id, self.mlflow_uri = mlflow["run_id"], mlflow["tracking_uri"]
        if self.workdir is not None:
            self.save()

    def save(self) -> None:
        """Write :data:`RUN_FILE` (the main process only): what a ``--resume`` continues."""
        assert self.workdir is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        record = {"run_name": self.run_name, "wandb_id": self.wandb_id,
                  "mlflow_id": self.mlflow_id, "mlflow_uri": self.mlflow_uri}
        (self.workdir / RUN_FILE).write_text(json.dumps(record), encoding="utf-8")

    def record(self) -> dict[str, Any]:
        """What goes into the metadata (``tracking``): each tracker's place, for those that
        wrote there (TensorBoard: event files found; trackio: its store holds the run)."""
        out: dict[str, Any] = {}
        for name, where in self.seen.items():
            if name == "tensorboard" and not any(Path(where["logdir"]).glob(
                    "events.out.tfevents.*")):
                continue
            if name == "trackio" and where.get("store") and not Path(where["store"]).is_file():
                continue
            out[name] = where
        if out:
            out["run_name"] = self.run_name
        return out


def start_tracking(names: list[str], *, home: Path, ref: str, workdir: Path,
                   resume: bool, main: bool = True) -> TrackedRun:
    """The trackers of the run that saves ``ref``: a fresh run name (``ref-<UTC time>``) and
    W&B id, or on ``resume`` those the interrupted run used (and its MLflow run), so its
    curves continue in the same tracker runs. Only the ``main`` process writes them into
    ``workdir``."""
    path = workdir / RUN_FILE
    saved: dict[str, Any] = {}
    if resume and path.is_file():
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(path.read_text(encoding="utf-8"))
            saved = loaded if isinstance(loaded, dict) else {}

    def kept(key: str) -> str:
        value = saved.get(key)
        return value if isinstance(value, str) else ""

    run_name = kept("run_name")
    if not run_name:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        run_name = f"{ref}-{stamp}"
    # W&B ids are letters, digits, '-' and '_'; W&B's own are 8 of [a-z0-9] (41 bits): these
    # 12 hex digits (48 bits) collide in one project no more often
    wandb_id = kept("wandb_id") or secrets.token_hex(6)
    run = TrackedRun(list(names), Path(home), run_name, wandb_id=wandb_id,
                     mlflow_id=kept("mlflow_id"), mlflow_uri=kept("mlflow_uri"),
                     resumed=bool(saved), workdir=workdir if main else None)
    if main:
        run.save()
    return run


def _mlflow_continues(uri: str, run_id: str, experiment: str) -> bool:
    """Whether MLflow can continue run ``run_id`` in experiment ``experiment`` of ``uri``
    (``start_run`` raises for a run that is gone, deleted, or of another experiment); if not,
    say why: the resumed run logs to a new MLflow run."""
    import warnings

    from adapterkit.errors import AdapterWarning

    why = None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        found = client.get_run(run_id)
        if found.info.lifecycle_stage == "deleted":
            why = "it was deleted"
        elif client.get_experiment(found.info.experiment_id).name != experiment:
            why = f"it belongs to another experiment than {experiment!r}"
    except Exception as exc:  # MLflow's own errors: the run or its store is gone
        why = f"MLflow cannot read it ({' '.join(str(exc).split())[:120]})"
    if why:
        warnings.warn(f"the interrupted run's MLflow run {run_id} cannot be continued: {why}; "
                      "this run logs to a new MLflow run", AdapterWarning, stacklevel=2)
    return why is None


def _mlflow_run() -> Any:
    """The MLflow run this process has open, if MLflow is imported at all (MLflow refuses to
    start another while one is open)."""
    mlflow = sys.modules.get("mlflow")
    return getattr(mlflow, "active_run", lambda: None)()


def _tensorboard(run: TrackedRun) -> dict[str, Any]:
    return {"logdir": str(run.tensorboard_dir)}


def _trackio(run: TrackedRun) -> dict[str, Any] | None:
    import trackio

    current = trackio.context_vars.current_run.get()
    if current is None:
        return None
    where: dict[str, Any] = {"project": current.project, "run": current.name}
    space = trackio.context_vars.current_space_id.get()
    server = trackio.context_vars.current_server.get()
    if space:
        where["space"] = space
    elif server:
        where["server"] = server
    else:
        from trackio.sqlite_storage import SQLiteStorage

        where["store"] = str(SQLiteStorage.get_project_db_path(current.project))
    return where


def _wandb(run: TrackedRun) -> dict[str, Any] | None:
    import wandb

    current = wandb.run
    if current is None:
        return None
    # the run's folder (what `wandb sync` takes), not its files/ subfolder
    return {"project": current.project, "run_id": current.id,
            "mode": "offline" if current.offline else "online",
            "dir": str(Path(current.dir).parent)}


def _mlflow(run: TrackedRun) -> dict[str, Any] | None:
    import mlflow

    current = mlflow.active_run()
    if current is None:
        return None
    return {"tracking_uri": mlflow.get_tracking_uri(), "run_id": current.info.run_id,
            "experiment_id": current.info.experiment_id}


_WHERE = {"tensorboard": _tensorboard, "trackio": _trackio, "wandb": _wandb, "mlflow": _mlflow}

