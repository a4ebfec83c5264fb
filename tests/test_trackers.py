"""`--report-to` (and `report_to:` in recipes): transformers' tracker integrations write where
adapterkit says — TensorBoard event files under the home, trackio's local store — the place is
recorded in the pocket book's metadata and card, and nothing leaves the machine unless asked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adapterkit import ConfigError, Library, TrainOptions
from adapterkit.training import tracking
from adapterkit.training.options import build_options, check_options

FAST = ["--max-steps", "4", "--batch-size", "4", "--lr", "1e-2", "--logging-steps", "1",
        "-r", "4", "--alpha", "8"]


def tensorboard_scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    """What TensorBoard itself reads from the event files (its own reader, not ours)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.slow
def test_tensorboard_and_trackio_get_the_loss_and_the_book_records_where(tiny_base,
                                                                         adapterkit_data,
                                                                         tmp_path):
    """A real CLI run in a fresh process (trackio reads TRACKIO_DIR when first imported): the
    TensorBoard events and trackio's store hold the loss of every logged step — the same
    values the trainer's own log history recorded — and the metadata and card say where."""
    home, store = tmp_path / "home", tmp_path / "trackio"
    env = {**os.environ, "ADAPTERKIT_HOME": str(home), "TRACKIO_DIR": str(store),
           "HF_HUB_OFFLINE": "1"}
    env.pop("TENSORBOARD_LOGGING_DIR", None)
    out = subprocess.run(
        [sys.executable, "-m", "adapterkit", "train", "sft", "--base", str(tiny_base),
         "--data", str(adapterkit_data["text"]), "--name", "river", *FAST,
         "--report-to", "tensorboard", "--report-to", "trackio", "--json"],
        env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)  # the trackers' banners went to stderr
    book = Library(home).get("river")
    logged = [(step, loss) for step, loss in book.meta.metrics["loss_history"]]
    assert [step for step, _ in logged] == [1, 2, 3, 4]

    tracked = book.meta.tracking
    assert result["tracking"] == tracked
    assert set(tracked) == {"tensorboard", "trackio", "run_name"}
    assert tracked["run_name"].startswith("river-")
    logdir = Path(tracked["tensorboard"]["logdir"])
    assert logdir.parent == home / "tracking" / "tensorboard"
    scalars = tensorboard_scalars(logdir, "train/loss")
    assert [s for s, _ in scalars] == [s for s, _ in logged]
    assert [v for _, v in scalars] == pytest.approx([v for _, v in logged], rel=1e-6)

    assert tracked["trackio"] == {"project": "adapterkit", "run": tracked["run_name"],
                                  "store": str(store / "adapterkit.db")}
    # trackio's own reader, in a process that imports it with the same TRACKIO_DIR
    read = subprocess.run(
        [sys.executable, "-c", "import json; from trackio.sqlite_storage import SQLiteStorage "
         "as S; print(json.dumps({'runs': S.get_runs('adapterkit'), 'logs': "
         f"S.get_logs('adapterkit', {tracked['run_name']!r})}}, default=str))"],
        env=env, capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr[-2000:]
    seen = json.loads(read.stdout)
    assert seen["runs"] == [tracked["run_name"]]
    losses = [(row["train/global_step"], row["train/loss"]) for row in seen["logs"]
              if row.get("train/loss") is not None]
    assert [s for s, _ in losses] == [s for s, _ in logged]
    assert [v for _, v in losses] == pytest.approx([v for _, v in logged], rel=1e-6)

    card = (book.path / "README.md").read_text(encoding="utf-8")
    assert f"tensorboard --logdir {logdir}" in card
    assert f"run `{tracked['run_name']}`" in card


@pytest.mark.slow
def test_a_recipe_reports_to_tensorboard(adapterkit_cli, tiny_base, adapterkit_data, home,
                                         tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(tiny_base), "max_steps": 2, "batch_size": 4, "logging_steps": 1, "r": 4,
        "alpha": 8, "report_to": "tensorboard",
        "stages": [{"name": "notes", "trainer": "sft", "data": str(adapterkit_data["text"])}],
    }), encoding="utf-8")
    result = adapterkit_cli("pipeline", recipe)
    assert result.exit_code == 0, result.output
    book = Library(home).get("notes")
    logdir = Path(book.meta.tracking["tensorboard"]["logdir"])
    assert [s for s, _ in tensorboard_scalars(logdir, "train/loss")] == [1, 2]
    # the variable adapterkit set for the run is gone again
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ


def test_without_report_to_nothing_is_reported(tiny_base):
    """The default reports to no tracker (transformers would otherwise pick every installed
    one), and names the run for those that do."""
    from adapterkit.training.job import TrainJob

    def job(options: TrainOptions) -> TrainJob:
        return TrainJob(build=lambda: None, tokenizer=None, eval_data=None,
                        data=None,  # type: ignore[arg-type]
                        options=options, chat=False, output_dir=Path("x"), resume_from=None,
                        name="notes", run_name="notes-20250101T000000Z")

    assert job(TrainOptions()).training_arguments()["report_to"] == []
    args = job(TrainOptions(report_to=["tensorboard"])).training_arguments()
    assert args["report_to"] == ["tensorboard"]
    assert args["run_name"] == "notes-20250101T000000Z"


# -- the places: offline unless asked --------------------------------------------------------

def test_offline_places_unless_the_environment_says_otherwise(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "MLFLOW_TRACKING_URI",
                "TENSORBOARD_LOGGING_DIR", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    run = tracking.TrackedRun(["tensorboard", "wandb", "mlflow"], tmp_path, "notes-1")
    env = run.environment()
    assert env["WANDB_MODE"] == "offline"
    assert env["WANDB_DIR"] == str(tmp_path / "tracking")
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path.resolve()}/tracking/mlflow.db"
    assert env["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tracking" / "tensorboard" /
                                                 "notes-1")
    with run.active():
        assert os.environ["WANDB_MODE"] == "offline"
    assert "WANDB_MODE" not in os.environ  # restored

    # an API key (or WANDB_MODE) means the user asked W&B to sync; their own places win
    monkeypatch.setenv("WANDB_API_KEY", "k")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    env = run.environment()
    assert "WANDB_MODE" not in env and "MLFLOW_TRACKING_URI" not in env
    # only trackers asked for are configured
    assert tracking.TrackedRun(["tensorboard"], tmp_path, "n").environment().keys() == {
        "TENSORBOARD_LOGGING_DIR"}


def test_resume_continues_the_same_tracker_run(tmp_path):
    work = tmp_path / "runs" / "notes"
    first = tracking.start_tracking(["tensorboard"], home=tmp_path, ref="notes", workdir=work,
                                    resume=False)
    again = tracking.start_tracking(["tensorboard"], home=tmp_path, ref="notes", workdir=work,
                                    resume=True)
    assert again.run_name == first.run_name and first.run_name.startswith("notes-")
    assert again.tensorboard_dir == first.tensorboard_dir


# -- refusals: one line, before the base loads, nothing written ------------------------------

@pytest.mark.parametrize("given, expected", [
    (["--report-to", "tensorbord"], "unknown tracker 'tensorbord' (did you mean tensorboard?)"),
    (["--report-to", "none,trackio"], "none means no tracker"),
    (["--report-to", "all"], "nothing is sent anywhere unless asked"),
])
def test_unknown_trackers_are_refused(adapterkit_cli, adapterkit_data, home, given, expected):
    result = adapterkit_cli("train", "sft", "--base", "no/such-base", "--data",
                            adapterkit_data["text"], "--name", "x", *given)
    assert result.exit_code == 1
    assert expected in result.output and len(result.output.strip().splitlines()) == 1
    assert Library(home).list() == []


@pytest.mark.parametrize("name, extra", [("tensorboard", "trackers"), ("trackio", "trackers"),
                                         ("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_tracker_that_is_not_installed_names_the_extra(adapterkit_cli, adapterkit_data, home,
                                                         monkeypatch, name, extra):
    real = tracking.installed
    monkeypatch.setattr(tracking, "installed", lambda module: module != name and real(module))
    # a base that does not exist: the tracker is refused first, before any base is looked at
    result = adapterkit_cli("train", "sft", "--base", "no/such-base", "--data",
                            adapterkit_data["text"], "--name", "x", "--report-to", name)
    assert result.exit_code == 1, result.output
    assert f"{name} is not installed; install it with pip install 'adapterkit[{extra}]'" \
        in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert Library(home).list() == [] and not (home / "tracking").exists()


def test_a_tracker_installed_but_broken_is_refused_before_the_base_loads(
        adapterkit_cli, adapterkit_data, home, tmp_path, monkeypatch):
    """Found by a user: an mlflow whose import fails (a dependency missing) passed the check,
    which only asked whether the package is there, and the run's first stage ended in a
    traceback."""
    shadow = tmp_path / "shadow" / "mlflow"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("No module named \'sqlalchemy\'")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "shadow"))
    monkeypatch.delitem(sys.modules, "mlflow", raising=False)
    result = adapterkit_cli("train", "sft", "--base", "no/such-base", "--data",
                            adapterkit_data["text"], "--name", "x", "--report-to", "mlflow")
    assert result.exit_code == 1, result.output
    assert ("report_to: mlflow is installed but cannot be imported (ImportError: No module "
            "named 'sqlalchemy'); repair it") in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert Library(home).list() == [] and not (home / "tracking").exists()


def test_options_and_recipes_take_report_to(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("report_to: TensorBoard, trackio\n", encoding="utf-8")
    assert build_options(recipe).report_to == ["tensorboard", "trackio"]
    assert build_options(recipe, {"report_to": "none"}).report_to == []  # the flag wins
    with pytest.raises(ConfigError, match="unknown tracker 'tb'"):
        check_options(TrainOptions(report_to=["tb"]))


def test_report_to_does_not_change_a_stage_fingerprint(tiny_base, adapterkit_data, home,
                                                       tmp_path):
    """Adding a tracker to a recipe does not shape the pocket books: --resume still skips the
    stages that finished."""
    from adapterkit.training.recipe import load_recipe

    def fingerprint(**extra: object) -> str:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump({"base": str(tiny_base), **extra, "stages": [
            {"name": "notes", "trainer": "sft", "data": str(adapterkit_data["text"])}]}),
            encoding="utf-8")
        return load_recipe(path, home=home).stages[0].fingerprint

    plain = fingerprint()
    assert fingerprint(report_to="tensorboard") == plain
    assert fingerprint(max_steps=3) != plain


_TRAIN_SCRIPT = """
import sys
from transformers import TrainerCallback
from adapterkit import TrainOptions, train
from adapterkit.plugin_api.manager import get_plugin_manager

class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:  # after the checkpoint of step 2
            raise KeyboardInterrupt

resume = sys.argv[3] == "resume"
options = TrainOptions(max_steps=4, batch_size=4, learning_rate=1e-2, logging_steps=1,
                       save_steps=2, r=4, alpha=8, dropout=0.0, precision="fp32",
                       forgetting_budget=0, general="off", report_to=["wandb", "mlflow"])
try:
    train("sft", base=sys.argv[1], data=sys.argv[2], name="river", options=options,
          plugins=get_plugin_manager(env=False), resume=resume,
          callbacks=[] if resume else [Interrupt()])
except KeyboardInterrupt:
    sys.exit(3)
"""


@pytest.mark.slow
@pytest.mark.skipif(not (tracking.installed("wandb") and tracking.installed("mlflow")),
                    reason="needs wandb and mlflow (the test extra installs them)")
def test_a_resumed_run_continues_the_same_wandb_and_mlflow_runs(tiny_base, adapterkit_data,
                                                                 tmp_path):
    """A run killed at step 3 and resumed in a new process (from step 2's checkpoint) logs
    steps 3 and 4 to the W&B run and the MLflow run that hold steps 1 to 3 — as W&B's offline folders and MLflow's own
    client read them — instead of opening a second run of each."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(ADAPTERKIT_HOME=str(home), HF_HUB_OFFLINE="1", WANDB_SILENT="true")
    script = tmp_path / "train.py"
    script.write_text(_TRAIN_SCRIPT, encoding="utf-8")

    cwd = tmp_path / "cwd"
    cwd.mkdir()

    def run(mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), str(tiny_base),
                               str(adapterkit_data["text"]), mode], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=600)

    first = run("interrupt")
    assert first.returncode == 3, first.stderr[-3000:]
    # the interrupted run's MLflow run was ended in its store, not in a new one here
    assert list(cwd.iterdir()) == []
    second = run("resume")
    assert second.returncode == 0, second.stderr[-3000:]
    tracked = Library(home).get("river").meta.tracking

    # W&B: both processes wrote offline folders of one run id (offline-run-<time>-<id>)
    folders = sorted((home / "tracking" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2, folders
    assert {f.name.rsplit("-", 1)[1] for f in folders} == {tracked["wandb"]["run_id"]}

    # MLflow: one run in its store, with the loss of all four steps
    read = subprocess.run(
        [sys.executable, "-c", "import json, mlflow; c = mlflow.tracking.MlflowClient("
         f"{tracked['mlflow']['tracking_uri']!r}); e = c.get_experiment_by_name('adapterkit'); "
         "runs = c.search_runs([e.experiment_id]); print(json.dumps({'runs': [r.info.run_id "
         "for r in runs], 'steps': [m.step for m in c.get_metric_history(runs[0].info.run_id,"
         " 'loss')]}))"], env=env, capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr[-2000:]
    seen = json.loads(read.stdout)
    assert seen["runs"] == [tracked["mlflow"]["run_id"]]
    assert sorted(set(seen["steps"])) == [1, 2, 3, 4]


def test_a_stage_inside_a_run_gets_its_own_tracker_places_and_the_users_are_kept(
        tmp_path, monkeypatch):
    """rlhf trains its reward pocket book inside its own tracked run: the stage must log to a
    W&B run and a TensorBoard folder of its own, not to the enclosing run's (whose variables
    are set by then), while a variable the user set still wins in both."""
    for var in ("WANDB_RUN_ID", "WANDB_RESUME", "TENSORBOARD_LOGGING_DIR", "WANDB_MODE",
                "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    outer = tracking.start_tracking(["wandb", "tensorboard"], home=tmp_path, ref="kind",
                                    workdir=tmp_path / "runs" / "kind", resume=False)
    inner = tracking.start_tracking(["wandb", "tensorboard"], home=tmp_path, ref="kind-reward",
                                    workdir=tmp_path / "runs" / "kind-reward", resume=False)
    assert outer.wandb_id != inner.wandb_id
    # 48 random bits, more than W&B's own 8 characters of [a-z0-9] (41 bits)
    assert all(re.fullmatch(r"[0-9a-f]{12}", run.wandb_id) for run in (outer, inner))
    with outer.active():
        assert os.environ["WANDB_RUN_ID"] == outer.wandb_id
        with inner.active():
            assert os.environ["WANDB_RUN_ID"] == inner.wandb_id
            assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(inner.tensorboard_dir)
            assert inner.tensorboard_dir != outer.tensorboard_dir
        assert os.environ["WANDB_RUN_ID"] == outer.wandb_id  # the enclosing run's again
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(outer.tensorboard_dir)
    assert "WANDB_RUN_ID" not in os.environ
    monkeypatch.setenv("WANDB_RUN_ID", "mine")
    with outer.active(), inner.active():
        assert os.environ["WANDB_RUN_ID"] == "mine"


@pytest.mark.skipif(not tracking.installed("mlflow"), reason="needs mlflow")
def test_a_resume_whose_mlflow_run_is_gone_or_deleted_starts_a_new_one_and_says_so(
        tmp_path, monkeypatch):
    """MLflow's start_run raises for a run id it cannot continue (a store removed, a run
    deleted in its UI): that would be a traceback after the base loaded. MLflow's own client
    decides here; the resume warns and logs to a new run."""
    from mlflow.tracking import MlflowClient

    from adapterkit.errors import AdapterWarning

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    uri = f"sqlite:///{(tmp_path / 'tracking' / 'mlflow.db').resolve()}"
    (tmp_path / "tracking").mkdir()
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("adapterkit")).info.run_id

    def resumed(with_id: str) -> tracking.TrackedRun:
        return tracking.TrackedRun(["mlflow"], tmp_path, "r", mlflow_id=with_id,
                                   mlflow_uri=uri, resumed=True)

    assert resumed(run_id).environment()["MLFLOW_RUN_ID"] == run_id  # it continues
    with pytest.warns(AdapterWarning, match="cannot be continued: MLflow cannot read it"):
        assert "MLFLOW_RUN_ID" not in resumed("0" * 32).environment()
    client.delete_run(run_id)
    with pytest.warns(AdapterWarning, match="cannot be continued: it was deleted"):
        assert "MLFLOW_RUN_ID" not in resumed(run_id).environment()
