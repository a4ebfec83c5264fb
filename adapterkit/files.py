"""Small crash-safe file helpers: write-to-temp, fsync, rename — and work folders that say
who owns them.

A folder is built under a temporary name and renamed into place when whole. A process killed
in between leaves the temporary folder behind; its name records the host and process that own
it, so a later run can tell "still being written" from "left by a dead process" at once,
instead of waiting a day, and never judges a process on another host of a shared file system.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapterkit.errors import NameTaken


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_mode() -> int:
    """The permissions ``open()`` gives a new file under this process's umask (0o644 under
    umask 022). ``tempfile.mkstemp`` and safetensors' writer make files 0o600, which would
    keep the library and its exports from the accounts the umask lets read them (a server's)."""
    try:  # Linux says it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status", encoding="ascii") as fh:
            mask = next((int(line.split()[1], 8) for line in fh if line.startswith("Umask:")),
                        None)
    except (OSError, ValueError, IndexError):
        mask = None
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def give_file_modes(folder: Path) -> None:
    """Give every regular file below ``folder`` the permissions of :func:`file_mode` (links
    are left alone), before the folder joins the library or appears as an export."""
    mode = file_mode()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never half;
    the new file has the permissions ``open()`` would give it (:func:`file_mode`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """:func:`atomic_write_text` for bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, file_mode())  # mkstemp's 0o600 would hide it from other accounts
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_tree(path: Path) -> None:
    """fsync every file below ``path`` and the folders themselves, before an atomic rename."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: Work folders older than this are stale whoever owns them (a hung or foreign process).
STALE_SECONDS = 24 * 3600
_OWNED = re.compile(r"(?P<prefix>.+)-(?P<host>[A-Za-z0-9.]+)-(?P<pid>[0-9]+)-[0-9a-f]{12}")
#: Out-of-space errors: raised while writing, so the destination is what is full.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", ".", socket.gethostname())[:60] or "host"


def owned_name(prefix: str) -> str:
    """A fresh folder name starting with ``prefix`` and owned by this process."""
    return f"{prefix}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, but belongs to another user
    return True


def stale_reason(path: Path, *, now: float | None = None) -> str | None:
    """Why the work folder ``path`` is left over (its owner is gone, or it is over a day old),
    or ``None`` while it may still be in use."""
    match = _OWNED.fullmatch(path.name)
    if match and match["host"] == _host():
        pid = int(match["pid"])
        if pid == os.getpid() or _alive(pid):
            return None  # its owner runs: however long it takes, it is still in use
        return f"left by process {pid}, which is no longer running"
    try:  # an owner on another host (a shared file system), or a name we did not give
        age = (now or time.time()) - path.lstat().st_mtime
    except OSError:
        return None
    if age > STALE_SECONDS:
        return f"untouched for {age / 3600:.0f} hours"
    return None


def move_back(moved: list[tuple[Path, Path]]) -> None:
    """Undo ``(done_to, came_from)`` renames, last first (a transaction that did not commit
    puts its folders back, so a failure changes nothing)."""
    while moved:
        src, dst = moved.pop()
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)


def remove_tree(path: Path) -> None:
    """Remove a folder (or a stray file or link) without following links."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_new_folder(dest: Path) -> None:
    """Raise :class:`NameTaken` unless ``dest`` can become a new folder: it is not a file, not
    a folder with something in it, and no folder above it is a file. Every export checks its
    destination with this before any work, so each says the same thing."""
    if dest.exists() and not dest.is_dir():
        raise NameTaken(f"export destination {dest} is a file; pick a new folder")
    if dest.exists() and any(dest.iterdir()):
        raise NameTaken(f"export destination {dest} exists and is not empty; pick a new folder")
    for above in dest.parents:
        if above.exists():
            if not above.is_dir():
                raise NameTaken(f"export destination {dest} is inside {above}, which is a "
                                "file; pick a folder elsewhere")
            break


@contextmanager
def new_folder(dest: Path) -> Iterator[Path]:
    """Build a folder that appears at ``dest`` whole, or not at all.

    Refuses a ``dest`` that exists and is not empty; yields a hidden sibling to fill, renamed
    to ``dest`` when the block succeeds and removed when it fails. Such siblings left in the
    same folder by earlier runs that were killed (their process is gone) are removed first.
    Its files get the permissions ``open()`` would give them (:func:`give_file_modes`).
    """
    check_new_folder(dest)
    if dest.parent.is_dir():
        for left in dest.parent.iterdir():  # only ".NAME.partial-HOST-PID-TAG": ours, by name
            match = _OWNED.fullmatch(left.name)
            if (match and match["prefix"].startswith(".") and match["prefix"].endswith(".partial")
                    and stale_reason(left) is not None):
                remove_tree(left)
    prefix = f".{dest.name}.partial"
    tmp = dest.with_name(owned_name(prefix))
    tmp.mkdir(parents=True)
    try:
        yield tmp
        give_file_modes(tmp)
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in NO_SPACE:
            raise OSError(exc.errno, exc.strerror, str(dest)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
