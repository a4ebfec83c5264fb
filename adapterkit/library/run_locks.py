"""Which names a training run in progress will save under.

A run of ``NAME`` holds ``<home>/locks/run-NAME.lock`` (``fcntl.flock``) from before its first
step until it ends (:func:`hold_run`, taken by :mod:`adapterkit.training.run`; a search holds
its NAME for the whole search, a pipeline every stage's name still to train, handing each to
its stage's run). The library asks here before it saves a pocket book under a name, so that
an ``import``, ``pull`` or saved stack cannot take the name a run will save under: the run
would train to the end and then find its name taken, its finished weights only in a
checkpoint that no ``--resume`` could save.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterkit.errors import RunStateError

#: The folder of an adapterkit home holding the run locks.
LOCKS = "locks"

#: Locks their holders handed on (:meth:`RunLock.hand_over`), by lock file and thread: the
#: next :func:`hold_run` of that name on that thread takes the lock as it is, never letting go
#: of it; another thread's is refused as before.
_handed: dict[tuple[Path, int], RunLock] = {}
#: The folders taking run locks in this process created (a home, its ``locks/``; absolute),
#: innermost last: a release removes those on its lock's path that are empty again, so the
#: home is left as it was found whichever of several locks (a pipeline's stages) goes last.
_made: list[Path] = []
#: Guards ``_handed`` and ``_made`` (runs may train on threads of one process).
_guard = threading.Lock()


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


def hold_run(home: Path, name: str, *,
             instead: str = "train under another --name") -> RunLock | None:
    """Hold ``home``'s lock for runs of ``name``, or refuse, offering ``instead`` (the
    caller's way to another name): a second run under that name would clear the first one's
    run folder as it starts, and whichever saved second would find the name taken and lose its
    whole run. A lock a holder handed on to this thread (:meth:`RunLock.hand_over`) is taken
    as it is. None where the platform has no ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        return None
    home = Path(home).absolute()  # (a release after a chdir finds the same files)
    path = run_lock_path(home, name)
    with _guard:
        handed = _handed.pop((_key(path), threading.get_ident()), None)
        if handed is not None and not handed.released:
            return handed
        folder = path.parent
        _made.extend(d for d in (home, folder) if not d.exists() and d not in _made)
        folder.mkdir(parents=True, exist_ok=True)  # (under the guard: fewer races with a
        # release removing it; one left behind is only an empty folder)
    waits = 10  # an import or pull asking whether a run holds the name (run_locks.training_now)
    while True:  # holds it for a moment: asked again for up to about a fifth of a second
        try:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held until the end)
        except FileNotFoundError:  # a run ending now removed the folder it had made
            folder.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) and waits:
                waits -= 1
                handle.close()
                time.sleep(0.02)
                continue
            handle.seek(0)
            who = handle.read().strip() or "another process"
            handle.close()
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                RunLock(None, path).release()  # a filesystem without locks (some network
                return None  # mounts): the run goes on unlocked, as before
            RunLock(None, path, owned=False).release()
            raise RunStateError(f"another run of {name} is training in {home} ({who}): wait "
                                f"for it to finish, or {instead}") from None
        try:  # the file a run that just ended removed is not the lock: take the new one
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return RunLock(handle, path)


def handed_here(home: Path, name: str) -> bool:
    """Whether the run lock of ``name`` in ``home`` was handed to this thread and not taken
    yet (:meth:`RunLock.hand_over`): a pipeline's stage saving, itself, a pocket book its run
    declares it saves besides its own (``Trainer.also_saves``) is that name's run."""
    with _guard:
        lock = _handed.get((_key(run_lock_path(home, name)), threading.get_ident()))
        return lock is not None and not lock.released


def _key(path: Path) -> Path:
    """One spelling of a lock file's path (a home given relative, or through a link)."""
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


@dataclass
class RunLock:
    """A held run lock: the locked file."""

    handle: Any
    path: Path
    #: Whether the file at ``path`` is this lock's (a refused run removes only its folders).
    owned: bool = True
    #: Set by :meth:`release` (a second call does nothing).
    released: bool = False

    def hand_over(self) -> None:
        """Keep holding the lock for the next :func:`hold_run` of its name on this thread to
        take as it is (a pipeline, to the run of its stage): no moment in between when another
        process could take the name. Whoever holds it still releases it; a release after the
        taker's does nothing."""
        with _guard:
            if not self.released:
                _handed[(_key(self.path), threading.get_ident())] = self

    def release(self) -> None:
        """Remove the lock file where it is still this lock's, then let go of the lock (in that
        order: a run starting now locks a file of its own), and the folders taking locks here
        created where they are empty: a run that failed leaves the home as it found it."""
        with _guard:
            if self.released:
                return
            self.released = True
            for key in [k for k, lock in _handed.items() if lock is self]:
                del _handed[key]
        try:
            if self.owned:
                try:
                    if self.handle is None or \
                            os.stat(self.path).st_ino == os.fstat(self.handle.fileno()).st_ino:
                        self.path.unlink()
                except FileNotFoundError:
                    pass
        finally:  # let go of the lock even where its file could not be removed
            if self.handle is not None:
                self.handle.close()
        locks = self.path.parent.absolute()
        with _guard:
            for folder in (locks, locks.parent):  # (its locks/ folder, then its home)
                if folder not in _made:
                    continue
                try:
                    folder.rmdir()
                except FileNotFoundError:  # removed by someone else: nothing of ours to keep
                    pass
                except OSError:  # not empty (another lock, or the run wrote there): kept
                    break
                _made.remove(folder)


def release_all(held: list[RunLock]) -> None:
    """Release every lock in ``held`` (a run's, however it ends), and forget them. A lock
    file that could not be removed (its lock is let go all the same, and a later run takes
    it as its own) is warned of after all are released, never raised: it must not replace the
    exception a failed run is on its way out with, nor fail a run that saved."""
    failed: list[tuple[RunLock, Exception]] = []
    for lock in held:
        try:
            lock.release()
        except Exception as exc:  # (a file system error removing the lock file)
            failed.append((lock, exc))
    held.clear()
    for lock, why in failed:
        try:
            warnings.warn(f"the run lock {lock.path} could not be removed ({why}); it holds "
                          "nothing now: remove it by hand if it stays", RuntimeWarning,
                          stacklevel=2)
        except Warning as warning:  # (warnings as errors: said, still not raised)
            print(f"Warning: {warning}", file=sys.stderr)
