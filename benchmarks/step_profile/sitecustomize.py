"""Per-step timings and a torch.profiler trace of chosen training steps, for any process that
runs a transformers ``Trainer`` (adapterkit's commands and the plain TRL scripts alike), with no
change to the code under test: put this folder first on ``PYTHONPATH``.

    PYTHONPATH=benchmarks/step_profile STEP_PROFILE_OUT=/tmp/prof STEP_PROFILE_TAG=ours \\
        [STEP_PROFILE_STEPS=6,7] python benchmarks/bench_train_wall.py ...

Writes ``$STEP_PROFILE_OUT/$STEP_PROFILE_TAG-<pid>.txt``: every step's wall time (from one
``training_step`` call, a micro-batch under gradient accumulation, to the next: the optimizer
step, logging and any evaluation between them included, the last to the end of ``train()``; on
a GPU each boundary waits for the device), the median of the steps after the second, and for
the profiled steps the ops with the most self CPU (and CUDA) time, the number of ops, and the
host-device synchronisations (``aten::item``/``_local_scalar_dense``, ``cudaStreamSynchronize``,
device-to-host copies).
Only ``training_step`` is wrapped: it is where TRL's SFT and DPO trainers do their work.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

OUT = os.environ.get("STEP_PROFILE_OUT")
STEPS = {int(s) for s in os.environ.get("STEP_PROFILE_STEPS", "6,7").split(",") if s}
TAG = os.environ.get("STEP_PROFILE_TAG", "run")  # "run": named after the script and --name
SHAPES = os.environ.get("STEP_PROFILE_SHAPES") == "1"
SYNC_NAMES = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
              "cudaMemcpyAsync", "cudaEventSynchronize")


def _patch(trainer_module) -> None:
    import atexit
    import statistics

    import torch

    Trainer = trainer_module.Trainer
    original = Trainer.training_step
    marks: list[float] = []
    lines: list[str] = []
    cuda = torch.cuda.is_available()

    def now() -> float:
        if cuda and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def training_step(self, *args, **kwargs):
        step = len(marks)
        marks.append(now())
        if step not in STEPS:
            return original(self, *args, **kwargs)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, record_shapes=SHAPES) as prof:
            result = original(self, *args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        ops = sum(e.count for e in events if e.key.startswith("aten::"))
        syncs = {e.key: e.count for e in events if e.key in SYNC_NAMES}
        lines.append(f"== step {step}: {ops} aten ops, synchronisations {syncs}")
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        lines.append(events.table(sort_by="self_cpu_time_total", row_limit=25))
        if cuda:
            lines.append(events.table(sort_by=sort, row_limit=15))
        if SHAPES:  # which matmuls: by operand shapes
            shaped = prof.key_averages(group_by_input_shape=True)
            rows = sorted(((e.count, str(e.input_shapes)) for e in shaped
                           if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
                          reverse=True)
            lines.append("matmuls by input shapes (count, shapes):")
            lines.extend(f"  {n:5d} {shapes}" for n, shapes in rows[:40])
        return result

    def write() -> None:
        if not ended:
            marks.append(now())
        gaps = [b - a for a, b in zip(marks, marks[1:])]
        steady = gaps[2:] or gaps
        head = [f"{TAG}: {len(gaps)} steps, median after the second "
                f"{statistics.median(steady) * 1000:.1f} ms" if gaps else f"{TAG}: no steps",
                "step seconds: " + " ".join(f"{g:.3f}" for g in gaps)]
        tag = TAG
        if tag == "run":  # the script's name and the run's --name, where it has one
            tag = os.path.basename(sys.argv[0]).removesuffix(".py")
            if "--name" in sys.argv[:-1]:
                tag += "-" + sys.argv[sys.argv.index("--name") + 1]
            head[0] = tag + head[0][len(TAG):]
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, f"{tag}-{os.getpid()}.txt"), "w") as fh:
            fh.write("\n".join(head + lines) + "\n")

    train = Trainer.train

    def train_then_mark(self, *args, **kwargs):
        try:
            return train(self, *args, **kwargs)
        finally:  # the last step ends with the loop (not with what the process does after)
            marks.append(now())
            ended.append(True)

    ended: list[bool] = []
    Trainer.training_step = training_step
    Trainer.train = train_then_mark
    atexit.register(write)


class _Finder(importlib.abc.MetaPathFinder):
    """Patches ``transformers.trainer`` right after it is imported (importing it here would
    slow every process that never trains)."""

    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = patched  # type: ignore[method-assign]
        return spec


if OUT:
    sys.meta_path.insert(0, _Finder())
