"""Names and staleness of the library's work folders under ``<home>/tmp``.

Every save is written into a ``stage-…`` folder first and every removal moves the entry into a
``trash-…`` folder first; both are renamed or deleted when the command ends. A process killed
in between leaves its folder behind. The folder's name records the host and process that own
it, so a later command can tell "still being written" from "left by a dead process" at once
instead of waiting a day — and never judges a process on another host of a shared file system.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from pathlib import Path

#: Work folders older than this are stale whoever owns them (a hung or foreign process).
STALE_SECONDS = 24 * 3600
_OWNED = re.compile(r"(?:stage|trash)-(?P<host>[A-Za-z0-9.-]+)-(?P<pid>[0-9]+)-[0-9a-f]+")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:60] or "host"


def work_folder_name(kind: str) -> str:
    """A fresh ``stage-`` or ``trash-`` folder name owned by this process."""
    return f"{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def stale_reason(path: Path, *, now: float | None = None) -> str | None:
    """Why the work folder ``path`` is left over (its owner is gone, or it is over a day old),
    or ``None`` while it may still be in use."""
    match = _OWNED.fullmatch(path.name)
    if match and match["host"] == _host() and int(match["pid"]) != os.getpid():
        if not _alive(int(match["pid"])):
            return f"left by process {match['pid']}, which is no longer running"
    try:
        age = (now or time.time()) - path.lstat().st_mtime
    except OSError:
        return None
    if age > STALE_SECONDS:
        return f"untouched for {age / 3600:.0f} hours"
    return None
