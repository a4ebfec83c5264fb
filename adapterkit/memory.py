"""Handing freed memory back to the operating system, and the C library that holds it."""

from __future__ import annotations

import ctypes
import gc
import platform
import sys
from typing import Any


def glibc() -> Any | None:
    """The C library this process allocates with, when it is glibc (else None)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)  # the process's own symbols: the malloc actually in use
    except OSError:
        return None


def release_memory() -> None:
    """Collect garbage and trim the C heap.

    glibc keeps freed heap pages that sit below live allocations; after dropping a model (or
    the float32 staging copies of a quantized load) they would otherwise still count as
    resident. A no-op where the C library is not glibc.
    """
    gc.collect()
    trim = getattr(glibc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
