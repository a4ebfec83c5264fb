"""Keep freed memory in the process instead of handing it back to the kernel after every step.

PyTorch on a CPU allocates through the C library's ``malloc``. With glibc's defaults, a block
over the (dynamic, at most 32 MB) mmap threshold gets pages of its own from the kernel and
returns them on ``free``, and a free top of the heap is trimmed back to the kernel past 128 KB.
A training step allocates and frees the same large activations and logit tiles every step, so
every step pays the kernel to fault in and zero the same pages again: on the embedded base
(``train sft``, 20 steps of 8, measured with ``/usr/bin/time``) 13 million minor page faults
and 22 s of system time in a 65 s loop. Raising both thresholds lets glibc reuse the freed
blocks: 0.9 million faults and 3 s of system time. In ``benchmarks/bench_train_wall.py``
(README) the loop then ran 1.26x faster for it (289 against 230 tokens/s) at 1.17x the peak
resident memory (3.31 against 2.83 GB): the freed blocks stay resident. Most of those blocks
were the LM head's tiles over every position; since the head projects only the labelled ones
(:mod:`adapterkit.training.labelled_positions`) the same comparison gives 1.04x (529 against
507 tokens/s) at 1.02x the memory (2.30 against 2.25 GB). PyTorch's CPU tuning guide
recommends a caching allocator (jemalloc or tcmalloc through ``LD_PRELOAD``) for this; those
need a restart under an environment variable and a native library installed, while glibc's own
``mallopt`` can be set by the running process, so that is what this does.

It changes the whole process and was measured on CPU training only, so :func:`adapterkit.train`
sets it when the process has no GPU (the ``adapterkit train`` command, pipelines, the
quickstart, each rank of a multi-process run); ``ADAPTERKIT_MALLOC=system`` keeps the C
library's defaults. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os

from adapterkit.errors import ConfigError
from adapterkit.memory import glibc

#: ``ADAPTERKIT_MALLOC=system`` leaves glibc's defaults alone (unset or ``keep``: kept memory).
MALLOC_ENV = "ADAPTERKIT_MALLOC"
MALLOC_CHOICES = ("keep", "system")
#: glibc's ``mallopt`` parameter numbers (``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: A block this large or larger still gets pages of its own (a big base's 1 GB-and-up weight
#: tensors are allocated once and are better returned when freed); a free heap top is kept up
#: to this size. ``mallopt`` takes a C ``int``, so both stay under 2 GiB.
KEEP_BYTES = 1 << 30
#: The largest mmap threshold ``mallopt(3)`` documents for 64-bit glibc: the fallback where a
#: glibc refuses :data:`KEEP_BYTES`.
DOCUMENTED_MMAP_MAX = 32 << 20

_done: bool | None = None


def malloc_choice() -> str:
    """``keep`` or ``system``, from :data:`MALLOC_ENV`; another value is refused."""
    value = os.environ.get(MALLOC_ENV, "").strip().lower() or "keep"
    if value not in MALLOC_CHOICES:
        raise ConfigError(f"{MALLOC_ENV}={os.environ[MALLOC_ENV]!r}: use `system` for the C "
                          "library's allocator defaults, or leave it unset (freed memory "
                          "kept for reuse)")
    return value


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once for this process (idempotent).

    Returns whether the setting is in force: False elsewhere than glibc on Linux, or where
    ``ADAPTERKIT_MALLOC=system`` asks for the defaults.
    """
    global _done
    if malloc_choice() == "system":
        return False
    if _done is not None:
        return _done
    _done = False
    libc = glibc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # each independently: a glibc that refuses the larger mmap threshold still takes the
    # documented one and the trim threshold
    mapped = bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) or bool(
        mallopt(M_MMAP_THRESHOLD, DOCUMENTED_MMAP_MAX))
    trimmed = bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
    _done = mapped and trimmed
    return _done
