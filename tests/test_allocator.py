"""The C allocator keeps freed memory for reuse: counted by the kernel, not by us.

Each case runs in a fresh interpreter (``mallopt`` changes the whole process) that allocates,
touches and frees a 64 MB block 20 times and reports its minor page faults
(``getrusage``). With glibc's defaults every such block is new pages from the kernel; kept,
only the first allocation faults.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's")

ROUNDS = 20
BLOCK = 64 << 20

FAULTS = f"""
import ctypes, resource, sys
SETUP
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({ROUNDS}):
    block = libc.malloc({BLOCK})
    ctypes.memset(block, 1, {BLOCK})
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

DIRECT = "from adapterkit.runtime.allocator import keep_freed_memory; print(keep_freed_memory())"


def _faults(setup: str, **env: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS.replace("SETUP", setup)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout
    return int(out.split()[-1])


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    """Compared with the same loop on glibc's defaults (the negative control), in ratios: with
    transparent huge pages a block faults in 2 MB pieces, not 4 KB ones."""
    defaults = _faults("", ADAPTERKIT_MALLOC="")
    kept = _faults(DIRECT, ADAPTERKIT_MALLOC="")
    opted_out = _faults(DIRECT, ADAPTERKIT_MALLOC="system")
    assert kept * 4 < defaults, (kept, defaults)  # the first block's pages, then reuse
    assert opted_out * 2 > defaults, (opted_out, defaults)


def test_an_unknown_choice_is_refused():
    from adapterkit.errors import ConfigError
    from adapterkit.runtime.allocator import keep_freed_memory

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERKIT_MALLOC", "off")
        with pytest.raises(ConfigError, match="use `system`"):
            keep_freed_memory()


def test_train_sets_it_without_a_gpu(monkeypatch, tmp_path):
    """``train()`` asks for it before any work (also when the run is then refused)."""
    import torch

    from adapterkit.errors import AdapterkitError
    from adapterkit.runtime import allocator
    from adapterkit.training.run import train

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        with pytest.raises(AdapterkitError):
            train("sft", base="no-such-base", data=str(tmp_path / "missing.jsonl"), name="x",
                  home=tmp_path)
    assert calls == [1]  # not where a GPU is: measured on CPU training only
    monkeypatch.setenv("ADAPTERKIT_MALLOC", "off")  # refused there too, before any work
    with pytest.raises(AdapterkitError, match="ADAPTERKIT_MALLOC='off'"):
        train("sft", base="no-such-base", data=str(tmp_path / "missing.jsonl"), name="x",
              home=tmp_path)
