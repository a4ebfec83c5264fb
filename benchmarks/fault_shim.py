"""Run the ``adapterkit`` CLI with the commit window held open, for the fault benchmark.

    python benchmarks/fault_shim.py <adapterkit arguments>

A crash can only corrupt a library at a few instants — a folder renamed into place, a metadata
file replaced, a catalog transaction committed — each over in microseconds, so a kill at a
random moment almost never lands there. This shim sleeps a random few tens of milliseconds
before and after every ``os.rename``, ``os.replace`` and SQLite ``COMMIT``, which widens each of
those instants into a window a random kill hits often, without changing what the command does
or in which order.

Environment:

* ``ADAPTERKIT_FAULT_PAUSE`` — ``LOW,HIGH`` seconds of each pause (default ``0.01,0.05``).
* ``ADAPTERKIT_FAULT_FD`` — a file descriptor to write one byte to as each window opens
  (``r`` rename/replace, ``c`` commit), so that the benchmark can aim a kill at the n-th one.
"""

from __future__ import annotations

import os
import random
import sqlite3
import sys
import time

_LOW, _HIGH = (float(x) for x in os.environ.get("ADAPTERKIT_FAULT_PAUSE", "0.01,0.05").split(","))
_FD = int(os.environ["ADAPTERKIT_FAULT_FD"]) if os.environ.get("ADAPTERKIT_FAULT_FD") else None


def _pause() -> None:
    time.sleep(random.uniform(_LOW, _HIGH))


def _opening(kind: bytes) -> None:
    """Announce a window, then hold it open."""
    if _FD is not None:
        try:
            os.write(_FD, kind)
        except OSError:  # the benchmark stopped listening
            pass
    _pause()


def _widened(fn):
    def wrapper(*args, **kwargs):
        _opening(b"r")
        try:
            return fn(*args, **kwargs)
        finally:
            _pause()

    wrapper.__wrapped__ = fn
    return wrapper


class _PausingConnection(sqlite3.Connection):
    """A connection whose ``COMMIT`` statements are surrounded by pauses."""

    def execute(self, sql, *args, **kwargs):
        if not sql.lstrip().upper().startswith(("COMMIT", "END")):
            return super().execute(sql, *args, **kwargs)
        _opening(b"c")
        try:
            return super().execute(sql, *args, **kwargs)
        finally:
            _pause()


def _connect(*args, _real=sqlite3.connect, **kwargs):
    kwargs.setdefault("factory", _PausingConnection)
    return _real(*args, **kwargs)


def install() -> None:
    """Widen the windows in this process (the patches are visible to every module)."""
    os.rename = _widened(os.rename)
    os.replace = _widened(os.replace)
    sqlite3.connect = _connect


if __name__ == "__main__":
    install()
    from adapterkit.cli import main

    sys.argv[0] = "adapterkit"
    main()
