"""Standard evaluations through lm-evaluation-harness (``adapterkit eval NAME --harness``).

The forgetting question asked on standard benchmarks: the same tasks, the same settings, run on
the plain base and on the base with the pocket book (or stack) — one resident model, the
pocket book switched off for the first run. lm-eval does everything task-related (prompts,
requests, metrics) through its ``HFLM`` wrapper around the model object adapterkit loaded;
nothing of the harness is reimplemented here. The results go into the pocket book's metadata
(``harness``) and card.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.errors import ConfigError, MissingDependency
from adapterkit.library.metadata import utc_now
from adapterkit.library.store import Library, PocketBook

#: The adapterkit extra that installs lm-evaluation-harness.
EXTRA = "eval"


def lm_eval_version() -> str:
    """The installed lm-evaluation-harness version, or :class:`MissingDependency` naming the
    extra to install."""
    if not installed("lm_eval"):
        raise MissingDependency("--harness runs lm-evaluation-harness, which is not installed; "
                                f"install it with pip install 'adapterkit[{EXTRA}]'")
    from importlib.metadata import version

    return version("lm_eval")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    return importlib.util.find_spec(module) is not None


def parse_tasks(text: str) -> list[str]:
    """``--harness``'s comma-separated task names (or task YAML files), each once."""
    tasks: list[str] = []
    for item in text.split(","):
        if item.strip() and item.strip() not in tasks:
            tasks.append(item.strip())
    if not tasks:
        raise ConfigError("--harness needs at least one task name (e.g. --harness hellaswag,"
                          "arc_easy) or a task YAML file")
    return tasks


@dataclass
class Tasks:
    """Tasks checked against lm-eval's index (and loaded once: their data is there)."""

    names: list[str]
    manager: Any


def check_tasks(names: list[str], include: list[str] | None = None) -> Tasks:
    """Find every task in lm-eval's index — the user's ``include`` folders first, lm-eval's
    own tasks only if needed (indexing those takes seconds) — and load them, so that an unknown
    task (the close names listed) or data that cannot be read is refused before the base loads.
    """
    lm_eval_version()
    from lm_eval.tasks import TaskManager

    folders = [str(Path(p).expanduser()) for p in include or []]
    missing = [p for p in folders if not Path(p).is_dir()]
    if missing:
        raise ConfigError(f"--include-path {missing[0]} is not a folder of task YAML files")
    with _quiet():
        manager = TaskManager(include_defaults=False, include_path=folders) if folders else None
        if manager is None or any(not _known(manager, n) for n in names):
            manager = TaskManager(include_path=folders or None)
    unknown = [n for n in names if not _known(manager, n)]
    if unknown:
        raise ConfigError("; ".join(_unknown_line(name, manager.all_tasks) for name in unknown))
    try:
        with _quiet():
            manager.load(names)  # reads each task's data now: nothing fails after the base loads
    except Exception as exc:  # lm-eval's or datasets' own errors: a task that cannot be built
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"lm-evaluation-harness cannot load {', '.join(names)}: {first}"
                          ) from None
    return Tasks(names, manager)


def _known(manager: Any, name: str) -> bool:
    return name in manager.task_index or (name.endswith((".yaml", ".yml"))
                                          and Path(name).is_file())


def _unknown_line(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"; close: {', '.join(close)}" if close else ""
    return (f"unknown lm-evaluation-harness task {name!r}{hint} (`lm-eval ls tasks` lists them; "
            "a task of your own: its YAML file, or --include-path FOLDER)")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's warnings about a model passed as an object (what adapterkit does on purpose)
    and its index chatter, silenced; its progress bars stay (stderr)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass
class HarnessReport:
    """Each task's metrics on the plain base and with the pocket book, side by side."""

    target: str
    lm_eval: str
    limit: int | None
    chat_template: bool
    #: task → {"metrics": {metric: {"base", "pocket_book", "base_stderr",
    #: "pocket_book_stderr", "higher_is_better"}}, "samples", "num_fewshot"}
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "lm_eval": self.lm_eval, "limit": self.limit,
                "chat_template": self.chat_template, "tasks": self.tasks}


def run_harness(model: Any, tokenizer: Any, tasks: Tasks, *, target: str,
                limit: int | None = None, chat_template: bool = False, batch_size: int = 8,
                progress: Callable[[str], None] | None = None) -> HarnessReport:
    """Run ``tasks`` on ``model`` (a PEFT model: the plain base with its adapters switched off,
    then with them on) and pair each metric.

    :param target: what the pocket book side is called (``NAME@V`` or a stack).
    :param limit: the first ``limit`` samples of each task (lm-eval's ``--limit``).
    :param chat_template: render prompts with the tokenizer's chat template.
    """
    say = progress or (lambda message: None)
    report = HarnessReport(target, lm_eval_version(), limit, chat_template)
    say(f"lm-evaluation-harness {report.lm_eval}: {', '.join(tasks.names)} on the plain base...")
    with model.disable_adapter():
        base = _evaluate(model, tokenizer, tasks, limit=limit, chat_template=chat_template,
                         batch_size=batch_size)
    say(f"... and with {target}...")
    book = _evaluate(model, tokenizer, tasks, limit=limit, chat_template=chat_template,
                     batch_size=batch_size)
    for task, metrics in book["results"].items():
        pairs = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue  # alias, sample counts, stderr (paired below)
            label = name if filt == "none" else f"{name},{filt}"
            stderr = f"{name}_stderr,{filt}"
            pairs[label] = {
                "base": base["results"].get(task, {}).get(key),
                "pocket_book": value,
                "base_stderr": _number(base["results"].get(task, {}).get(stderr)),
                "pocket_book_stderr": _number(metrics.get(stderr)),
                "higher_is_better": book.get("higher_is_better", {}).get(task, {}).get(name),
            }
        if pairs:
            report.tasks[task] = {
                "metrics": pairs,
                "samples": (book.get("n-samples", {}).get(task) or {}).get("effective"),
                "num_fewshot": book.get("n-shot", {}).get(task),
            }
    return report


def _number(value: Any) -> float | None:
    """A stderr as a number (lm-eval writes ``"N/A"`` where it has none)."""
    return float(value) if isinstance(value, (int, float)) else None


def _evaluate(model: Any, tokenizer: Any, tasks: Tasks, *, limit: int | None,
              chat_template: bool, batch_size: int) -> dict[str, Any]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.names),
                                          task_manager=tasks.manager, limit=limit,
                                          apply_chat_template=chat_template,
                                          log_samples=False)
    assert results is not None  # None only on ranks other than the first
    return dict(results)


def record_harness(library: Library, book: PocketBook, report: HarnessReport, *,
                   base: str) -> PocketBook:
    """Put ``report`` into ``book``'s metadata (``harness``, one record per task, replacing an
    earlier record of the same task) and refresh its card."""
    from adapterkit.library.card import refresh_card

    date = utc_now()

    def change(meta: Any) -> None:
        for task, rec in report.tasks.items():
            meta.harness[task] = {**rec, "lm_eval": report.lm_eval, "limit": report.limit,
                                  "chat_template": report.chat_template, "base": base,
                                  "date": date}

    updated = library.update_meta(book.ref, change)
    refresh_card(updated.path, updated.meta)
    return updated
