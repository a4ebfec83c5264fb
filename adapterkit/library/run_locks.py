"""Which names a training run in progress will save under.

A run of ``NAME`` holds ``<home>/locks/run-NAME.lock`` (``fcntl.flock``) from before its first
step until it ends (:mod:`adapterkit.training.run` takes it). The library asks here before it
saves a pocket book under a name, so that an ``import``, ``pull`` or saved stack cannot take
the name a run will save under: the run would train to the end and then find its name taken,
its finished weights only in a checkpoint that no ``--resume`` could save.
"""

from __future__ import annotations

import errno
from pathlib import Path

#: The folder of an adapterkit home holding the run locks.
LOCKS = "locks"


def run_lock_path(home: Path, name: str) -> Path:
    """The lock file of runs of ``name`` (a bare name, no ``@V``) in ``home``."""
    return home / LOCKS / f"run-{name}.lock"


def training_now(home: Path, name: str) -> str | None:
    """Who holds the run lock of ``name`` in ``home`` — what the run wrote there (``pid N``) —
    or None when no run of ``name`` is training. A lock held in this process counts too (an
    import from a training callback, say): ``flock`` tells open files apart, not processes, so
    the run's own save says it is the run instead of asking (``Library.commit(run=True)``).

    Asked without taking the lock for long: a shared, non-blocking ``flock`` on a file of its
    own opening, let go at once. Where the platform or file system has no locks, None (as the
    run itself then goes on unlocked).
    """
    path = run_lock_path(home, name)
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        return None
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 (closed below)
    except OSError:  # no run of that name (none ever, or it ended and removed its file)
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            try:
                return handle.read().strip() or "another process"
            except (OSError, ValueError):
                return "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None
