"""A rich progress bar for training runs: steps, loss and tokens per second on stderr.

On several processes it is drawn once, by the main process, for the run as a whole: the global
batch (rows per optimizer step over all ranks) and the tokens per second of all ranks together
(the trainer gathers every rank's token count at each step).
"""

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
            if not state.is_world_process_zero:
                return  # one bar for the run, drawn by the main process
            label = description
            if args.world_size > 1:
                batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
                label += f" ×{args.world_size} (global batch {batch * args.world_size})"
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task(label, total=state.max_steps,
                                          completed=state.global_step, loss="-", tps="-")
            self.start = time.perf_counter()
            self.tokens0 = state.num_input_tokens_seen or 0

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is None:
                return
            elapsed = time.perf_counter() - self.start
            # the trainer's count is already the sum over ranks (gathered every step)
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


def last_step_logged() -> Any:
    """A transformers ``TrainerCallback`` that logs the loss at a run's last step too.

    transformers logs every ``logging_steps`` only, so the steps after the last multiple were
    in no logged loss: a run of 8 steps at 5 reported the mean of steps 1-5 as its final loss
    (and "loss 6.138 → 6.138", one log read twice), and a run stopped early the steps since
    its last log. With it the last log covers the last steps.
    """
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True
            return control

        def on_epoch_end(self, args, state, control, **kwargs):
            # stopped early (at an evaluation, after that step's log): transformers logs once
            # more after its loop when asked, and never twice for one step
            if control.should_training_stop:
                control.should_log = True
            return control

    return LogLastStep()
