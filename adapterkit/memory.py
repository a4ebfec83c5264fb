"""Handing freed memory back to the operating system."""

from __future__ import annotations

import gc


def release_memory() -> None:
    """Collect garbage and trim the C heap.

    glibc keeps freed heap pages that sit below live allocations; after dropping a model (or
    the float32 staging copies of a quantized load) they would otherwise still count as
    resident. A no-op where the C library is not glibc.
    """
    from adapterkit.runtime.allocator import glibc

    gc.collect()
    trim = getattr(glibc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
