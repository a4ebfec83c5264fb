"""``adapterkit quickstart`` (adapterkit/quickstart.py): the main job from any folder, with the
data shipped in the package; examples/quickstart*.py are thin wrappers over the same code."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from adapterkit.quickstart import DATA_FILES

ROOT = Path(__file__).resolve().parents[1]


def test_data_dir_is_the_packaged_copy_of_the_examples_data(adapterkit_cli):
    result = adapterkit_cli("quickstart", "--data-dir")
    assert result.exit_code == 0, result.output
    folder = Path(result.output.strip())
    import adapterkit

    assert folder == Path(adapterkit.__file__).parent / "data" / "quickstart"
    for name in DATA_FILES:  # one home: examples/data is these very files
        assert hashlib.sha256((folder / name).read_bytes()).digest() == \
            hashlib.sha256((ROOT / "examples" / "data" / name).read_bytes()).digest()


def test_missing_data_is_one_line_naming_the_files(adapterkit_cli, tmp_path, monkeypatch):
    import adapterkit.quickstart as qs

    (tmp_path / "data" / "quickstart").mkdir(parents=True)
    (tmp_path / "data" / "quickstart" / "triage_train.jsonl").write_text("{}\n")
    monkeypatch.setattr(qs.resources, "files", lambda package: tmp_path)
    result = adapterkit_cli("quickstart", "--part", "1")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: the quickstart's data is missing from {tmp_path / 'data' / 'quickstart'} "
        "(triage_test.jsonl, preferences_train.jsonl, preferences_test.jsonl): reinstall "
        "adapterkit, or in a checkout run python examples/make_triage_data.py"]


def test_part_two_without_part_one_is_refused_in_one_line_before_loading(adapterkit_cli, home):
    result = adapterkit_cli("quickstart", "--part", "2", "--base", "no/such-base")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: No triage pocket book yet: run part one first (adapterkit quickstart --part 1, "
        "or python examples/quickstart.py), or pass --on NAME"]
    assert not (home / "library").exists() or not any((home / "library").iterdir())


@pytest.mark.parametrize("script", ["quickstart.py", "quickstart_bedside.py"])
def test_example_scripts_still_run_as_thin_wrappers(script):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--help"],
                         capture_output=True, text=True, cwd=ROOT / "examples")
    assert out.returncode == 0, out.stderr
    assert "--steps" in out.stdout and "--json" in out.stdout
    if script == "quickstart_bedside.py":
        assert "--batch-size" in out.stdout and "--budget" in out.stdout


def test_the_recipe_trains_part_two_as_the_scripts_do(home):
    """examples/quickstart_recipe.yaml and quickstart part two: the same steps, batch and
    forgetting budget."""
    from adapterkit.quickstart import PART_TWO_BATCH, PART_TWO_STEPS
    from adapterkit.training.recipe import load_recipe

    recipe = load_recipe(ROOT / "examples" / "quickstart_recipe.yaml", home=home)
    bedside = next(stage for stage in recipe.stages if stage.name == "bedside")
    assert bedside.trainer == "dpo"
    o = bedside.options
    assert (o.max_steps, o.batch_size, o.forgetting_budget) == (PART_TWO_STEPS, PART_TWO_BATCH, 1.0)
    # part one: the quickstart's own guard weight, not sft's default
    from adapterkit.training.build import DEFAULT_GUARD_WEIGHT

    triage = next(stage for stage in recipe.stages if stage.name == "triage")
    o = triage.options
    assert (o.learning_rate, o.forgetting_budget, o.guard_weight, o.general) == (
        1e-3, 1.0, DEFAULT_GUARD_WEIGHT, "general")


@pytest.mark.slow
def test_quickstart_runs_both_parts_in_order_into_the_given_home(adapterkit_cli, tiny_base,
                                                                  home, tmp_path):
    """--part all: triage, then bedside on top of it, in the --home given (not the env's),
    each step cap honoured, both tagged and verified against PEFT, the figures printed."""
    from adapterkit.library.store import Library

    mine = tmp_path / "quickstart-home"
    result = adapterkit_cli("quickstart", "--base", tiny_base, "--max-steps", "1",
                            "--home", mine)
    assert result.exit_code == 0, result.output
    out = result.stdout  # the quickstart's report; the libraries' progress bars go to stderr
    assert "Held-out accuracy: " in out and "(48 complaints)" in out
    assert "Held-out preference accuracy (implicit reward margin > 0): " in out
    assert out.index("Saved triage@1") < out.index("Training bedside")
    verified = [line for line in out.splitlines() if line.startswith("Verify: ")]
    assert len(verified) == 2 and all("exact on" in line for line in verified), verified

    library = Library(mine)
    triage, bedside = library.get("triage@1"), library.get("bedside@1")
    assert bedside.meta.stacked_on == ["triage@1"] and bedside.meta.parents == ["triage@1"]
    assert triage.meta.metrics["steps"] == 1 and bedside.meta.metrics["steps"] == 1
    assert {b.name for b in library.list(tag="quickstart")} == {"triage", "bedside"}
    assert not (home / "library").exists() or not any((home / "library").iterdir())


def test_right_advice_scores_each_answer_against_its_complaints_urgency(monkeypatch):
    """The figure part two prints: answers written by hand for three held-out complaints (one
    of each urgency), scored by the urgency_advice plugin against the bundled data's urgency."""
    import json

    import adapterkit.quickstart as qs
    import adapterkit.training.metrics as metrics

    data = qs.data_dir()
    rows = [json.loads(line) for line in (data / "triage_test.jsonl").read_text().splitlines()]
    picked = [next(r for r in rows if r["urgency"] == u) for u in ("high", "medium", "low")]
    advice = {"high": "Please call emergency services now.",
              "medium": "Please book an appointment in the next day or two.",
              "low": "A routine appointment is fine."}
    answers = [f"{picked[0]['completion']}\n{advice['high']}",     # right
               f"{picked[1]['completion']}\n{advice['high']}",     # an emergency for medium
               f"{picked[2]['completion']}\n{advice['low']}"]      # right
    monkeypatch.setattr(metrics, "generate", lambda *a, **k: answers)
    got = qs.right_advice(None, None, [r["prompt"] for r in picked], data)
    assert (got["right"], got["complaints"]) == (2, 3) and got["answers"] == answers


def test_the_trained_model_is_freed_before_verify_loads_the_base_again(tiny_base, tmp_path,
                                                                       monkeypatch):
    """verify loads a fresh float32 base for its plain-PEFT reference: the run's own model is
    gone by then, in both parts, so the two copies are never resident together."""
    import gc
    import weakref

    import adapterkit
    from adapterkit import quickstart as qs

    trained: list[weakref.ref] = []
    real_train, real_check = adapterkit.train, qs.check_paths

    def train(*args, **kwargs):
        result = real_train(*args, **kwargs)
        trained.append(weakref.ref(result.model.get_base_model()))  # what holds the weights
        return result

    alive_at_verify: list[bool] = []

    def check_paths(library, ref):
        gc.collect()
        alive_at_verify.append(trained[-1]() is not None)
        real_check(library, ref)

    monkeypatch.setattr(adapterkit, "train", train)
    monkeypatch.setattr(qs, "check_paths", check_paths)
    home = tmp_path / "home"
    qs.part_one(base=str(tiny_base), steps=1, home=home)
    qs.part_two(base=str(tiny_base), steps=1, home=home)
    assert alive_at_verify == [False, False]


def test_part_two_finds_part_ones_triage_under_a_later_version(home, tiny_base, peft_adapter,
                                                               monkeypatch):
    """triage@1 made by part one (tagged), then a triage@2 made otherwise: part two trains on
    triage@1, where it said no triage existed."""
    import adapterkit
    from adapterkit import quickstart

    library = adapterkit.Library(home)
    library.import_peft(peft_adapter, "triage", base=str(tiny_base))
    library.tag("triage@1", "quickstart")
    library.import_peft(peft_adapter, "triage@2", base=str(tiny_base))

    class Found(Exception):
        pass

    def stop(base, **_):
        raise Found
    monkeypatch.setattr(adapterkit, "load_base", stop)
    seen = []
    real_get = adapterkit.Library.get
    monkeypatch.setattr(adapterkit.Library, "get",
                        lambda self, ref: seen.append(str(ref)) or real_get(self, ref))
    with pytest.raises(Found):
        quickstart.part_two(base=str(tiny_base), home=home)
    assert seen == ["triage@1"]


def test_the_training_line_says_when_the_saved_weights_are_an_earlier_steps():
    """"Training: 30 steps" stood alone where the forgetting guard had kept step 10's
    weights: the saved pocket book is then that step's, and a line says so."""
    from adapterkit.quickstart import training_lines

    m = {"steps": 30, "train_seconds": 196.4, "tokens_per_second": 89.2}
    assert training_lines(m, 318.2) == [
        "Training: 30 steps, 196 s, 89 tokens/s; total wall time 318 s"]
    kept = {**m, "weights_step": 10, "weights_kept_by": "the forgetting guard's fallback",
            "train_loss_kept": 0.588, "train_loss_kept_step": 10}
    assert training_lines(kept, 318.2, reference="read from the cache") == [
        "Training: 30 steps, 196 s, 89 tokens/s, reference log-probs read from the cache; "
        "total wall time 318 s",
        "Saved pocket book: weights kept: step 10's, the forgetting guard's fallback; train "
        "loss logged at step 10: 0.588"]


def test_a_rerun_never_trains_under_a_removed_number(library, tiny_base, peft_adapter):
    """It computed the next version from the versions present: after `rm triage@2` a rerun
    trained triage@2 again, with other weights than the one removed."""
    from adapterkit.quickstart import _next_name

    assert _next_name(library, "triage") == "triage"
    library.import_peft(peft_adapter, "triage", base=str(tiny_base))
    library.import_peft(peft_adapter, "triage@2", base=str(tiny_base))
    assert _next_name(library, "triage") == "triage@3"
    library.remove("triage@2")
    assert _next_name(library, "triage") == "triage@3"
    library.remove("triage@1")
    assert _next_name(library, "triage") == "triage@3"
