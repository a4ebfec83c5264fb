"""`adapterkit eval NAME --harness TASKS`: lm-evaluation-harness on the plain base and with the
pocket book (or a stack), side by side, offline on a local task over a bundled JSONL; the
scores checked against log-likelihoods computed with plain transformers and PEFT, and recorded
in the metadata and card."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapterkit import Library, TrainOptions, train
from adapterkit.cli import build_cli
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.runtime import harness

DATA = Path(__file__).parent / "data" / "triage_choice.jsonl"
CHOICES = ["cardiology", "dermatology"]
TASK = """\
task: triage_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{complaint}}}}\\nSpecialist:"
doc_to_choice: {choices}
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
ROWS = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """A folder with the local task: multiple-choice triage over the bundled JSONL."""
    folder = tmp_path_factory.mktemp("harness-tasks")
    (folder / "triage_choice.yaml").write_text(
        TASK.format(data=DATA, choices=json.dumps(CHOICES)), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory) -> Path:
    """A library with `triage`, trained on the task's own complaints (so it should score
    higher than the random base), and `other`, an unrelated adapter made with plain PEFT."""
    from adapterkit.plugin_api.testing import make_peft_adapter

    home = tmp_path_factory.mktemp("harness-home")
    text = home / "triage.jsonl"
    text.write_text("".join(json.dumps({"text": f"{r['complaint']}\nSpecialist: "
                                                f"{CHOICES[r['label']]}"}) + "\n"
                            for r in ROWS * 4), encoding="utf-8")
    options = TrainOptions(max_steps=30, learning_rate=3e-2, batch_size=8, r=8, alpha=16,
                           dropout=0.0, chat=False, logging_steps=10)
    train("sft", base=str(tiny_base), data=str(text), name="triage", options=options,
          home=home, plugins=get_plugin_manager(env=False))
    Library(home).import_peft(make_peft_adapter(tiny_base, home / "other-peft", seed=3),
                              "other", base=str(tiny_base))
    return home


def cli(home: Path, *args: object):
    return CliRunner().invoke(build_cli(get_plugin_manager(env=False)),
                              ["--home", str(home), *map(str, args)])


def accuracy_by_hand(model, tokenizer, rows) -> float:
    """What lm-eval's `acc` is for a multiple-choice task, computed here with plain torch: the
    choice whose continuation (" " + choice after the prompt) has the highest summed
    log-likelihood, against the label."""
    import torch

    right = 0
    for row in rows:
        context = f"{row['complaint']}\nSpecialist:"
        scores = []
        for choice in CHOICES:
            whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
            start = len(tokenizer(context, add_special_tokens=False).input_ids)
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(start, len(whole))))
        right += int(max(range(len(CHOICES)), key=scores.__getitem__) == row["label"])
    return right / len(rows)


def plain_models(tiny_base, *adapters: Path):
    """The plain base, and the base with ``adapters`` active together, loaded by plain PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                      str(adapters[0]), adapter_name="a0")
    for i, folder in enumerate(adapters[1:], 1):
        model.load_adapter(str(folder), adapter_name=f"a{i}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])  # type: ignore[operator]
    return tokenizer, base, model.eval()


@pytest.mark.slow
def test_base_and_book_scores_side_by_side_match_plain_peft_and_are_recorded(
        trained, tasks, tiny_base):
    out = cli(trained, "eval", "triage", "--harness", "triage_choice", "--include-path", tasks,
              "--limit", "6", "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.output[out.output.index("{"):])
    acc = report["tasks"]["triage_choice"]["metrics"]["acc"]
    book = Library(trained).get("triage")
    tokenizer, base, with_book = plain_models(tiny_base, book.path)
    # the first 6 samples (--limit), scored independently of lm-eval and of adapterkit
    assert acc["base"] == pytest.approx(accuracy_by_hand(base, tokenizer, ROWS[:6]))
    assert acc["pocket_book"] == pytest.approx(accuracy_by_hand(with_book, tokenizer, ROWS[:6]))
    assert acc["pocket_book"] > acc["base"]  # trained on these complaints: it should help
    assert report["tasks"]["triage_choice"]["samples"] == 6
    assert report["limit"] == 6 and report["lm_eval"] == version("lm_eval")
    assert report["recorded_in"] == "triage@1"

    record = book.meta.harness["triage_choice"]
    assert record["metrics"]["acc"] == acc
    assert (record["limit"], record["lm_eval"], record["samples"]) == (6, version("lm_eval"), 6)
    card = (book.path / "README.md").read_text(encoding="utf-8")
    row = next(line for line in card.splitlines() if line.startswith("| triage_choice | acc"))
    assert f"| {acc['base']:.4g} | {acc['pocket_book']:.4g} |" in row

    # the table: both columns, headed by the base and the pocket book
    text = cli(trained, "eval", "triage", "--harness", "triage_choice", "--include-path", tasks,
               "--limit", "6").output
    assert "plain base" in text and "triage@1" in text
    assert f"{acc['base']:.4f}" in text and f"{acc['pocket_book']:.4f}" in text


@pytest.mark.slow
def test_an_inline_stack_is_evaluated_and_reported_not_recorded(trained, tasks, tiny_base):
    before = Library(trained).get("triage").meta.harness
    task_file = tasks / "triage_choice.yaml"  # a task YAML given directly, no --include-path
    out = cli(trained, "eval", "triage+other", "--harness", task_file, "--json")
    assert out.exit_code == 0, out.output
    assert f"Loading base {tiny_base} in float32..." in out.output  # (the precision said)
    report = json.loads(out.output[out.output.index("{"):])
    assert report["target"] == "triage@1*1+other@1*1" and report["recorded_in"] is None
    acc = report["tasks"]["triage_choice"]["metrics"]["acc"]
    library = Library(trained)
    tokenizer, base, stacked = plain_models(tiny_base, library.get("triage").path,
                                            library.get("other").path)
    assert acc["base"] == pytest.approx(accuracy_by_hand(base, tokenizer, ROWS))
    assert acc["pocket_book"] == pytest.approx(accuracy_by_hand(stacked, tokenizer, ROWS))
    assert report["tasks"]["triage_choice"]["samples"] == len(ROWS)
    assert library.get("triage").meta.harness == before
    assert library.get("other").meta.harness == {}


# -- refusals: one line, exit 1, before the base loads, nothing written ----------------------

@pytest.fixture
def no_base_load(monkeypatch):
    import adapterkit.base.load

    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded before the refusal")

    monkeypatch.setattr(adapterkit.base.load, "load_base", refuse)


@pytest.fixture
def library_with_book(tmp_path, tiny_base, peft_adapter) -> Path:
    home = tmp_path / "home"
    Library(home).import_peft(peft_adapter, "pe", base=str(tiny_base))
    return home


def refused(out, *expected: str) -> None:
    assert out.exit_code == 1, out.output
    assert len(out.output.strip().splitlines()) == 1, out.output
    for text in expected:
        assert text in out.output


def test_harness_without_lm_eval_names_the_extra(library_with_book, tasks, monkeypatch,
                                                 no_base_load):
    monkeypatch.setattr(harness, "installed", lambda module: False)
    out = cli(library_with_book, "eval", "pe", "--harness", "triage_choice",
              "--include-path", tasks)
    refused(out, "lm-evaluation-harness, which is not installed",
            "pip install 'adapterkit[eval]'")
    assert Library(library_with_book).get("pe").meta.harness == {}


@pytest.mark.slow
def test_an_unknown_task_lists_the_close_ones(library_with_book, tasks, no_base_load):
    out = cli(library_with_book, "eval", "pe", "--harness", "triage_choise,hellaswg",
              "--include-path", tasks)
    refused(out, "unknown lm-evaluation-harness task 'triage_choise'; close: triage_choice",
            "unknown lm-evaluation-harness task 'hellaswg'; close: hellaswag")
    assert Library(library_with_book).get("pe").meta.harness == {}


@pytest.mark.parametrize("args, expected", [
    (["--harness", "triage_choice", "--data", "x.jsonl"], "--data evaluate on your own data"),
    (["--harness", "triage_choice", "--general", "general"], "--general evaluate on your own"),
    (["--data", "x.jsonl", "--limit", "3"], "--limit: only with --harness TASKS"),
    ([], "give --data FILE (evaluation data) or --harness TASKS"),
    (["--harness", " , "], "--harness needs at least one task name"),
])
def test_options_that_do_not_go_together_are_refused(library_with_book, tasks, no_base_load,
                                                     args, expected):
    out = cli(library_with_book, "eval", "pe", *args, "--include-path", tasks) \
        if "--harness" in args else cli(library_with_book, "eval", "pe", *args)
    refused(out, expected)
    assert Library(library_with_book).get("pe").meta.harness == {}


def test_a_task_whose_data_cannot_be_read_is_refused_before_the_base_loads(
        library_with_book, tmp_path, no_base_load):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "broken.yaml").write_text(
        TASK.format(data=tmp_path / "missing.jsonl", choices=json.dumps(CHOICES)).replace(
            "task: triage_choice", "task: broken"), encoding="utf-8")
    out = cli(library_with_book, "eval", "pe", "--harness", "broken", "--include-path", folder)
    refused(out, "lm-evaluation-harness cannot load broken")


def test_chat_renders_the_tasks_with_the_chat_template(library_with_book, tasks, monkeypatch):
    """--chat reaches lm-eval (apply_chat_template) for both runs, and the record says so."""
    calls = []

    def fake(model, tokenizer, tasks, *, limit, chat_template, batch_size):
        calls.append(chat_template)
        return {"results": {"triage_choice": {"acc,none": 0.5 + 0.25 * len(calls),
                                              "acc_stderr,none": 0.1}},
                "n-samples": {"triage_choice": {"effective": 8}}, "n-shot": {}}

    monkeypatch.setattr(harness, "_evaluate", fake)
    out = cli(library_with_book, "eval", "pe", "--harness", "triage_choice", "--include-path",
              tasks, "--chat", "--json")
    assert out.exit_code == 0, out.output
    assert calls == [True, True]
    record = Library(library_with_book).get("pe").meta.harness["triage_choice"]
    assert record["chat_template"] is True
    assert record["metrics"]["acc"]["base"] == 0.75  # the first run is the plain base
    assert record["metrics"]["acc"]["pocket_book"] == 1.0
