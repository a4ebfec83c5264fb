"""A rich progress bar for training runs: steps, loss and tokens per second on stderr."""

from __future__ import annotations

import time
from typing import Any


def progress_callback(description: str = "training") -> Any:
    """A transformers ``TrainerCallback`` that draws a progress bar (replaces tqdm's)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Progress | None = None
            self.task: Any = None
            self.start = 0.0
            self.tokens0 = 0
            self.loss: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task(description, total=state.max_steps,
                                          completed=state.global_step, loss="-", tps="-")
            self.start = time.perf_counter()
            self.tokens0 = state.num_input_tokens_seen or 0

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is None:
                return
            elapsed = time.perf_counter() - self.start
            tokens = (state.num_input_tokens_seen or 0) - self.tokens0
            tps = f"{tokens / elapsed:.0f}" if elapsed > 0 and tokens else "-"
            self.bar.update(self.task, completed=state.global_step, tps=tps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.update(self.task, loss=f"{float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.stop()
                self.bar = None

    return RichProgress()
