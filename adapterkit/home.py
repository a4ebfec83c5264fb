"""Where adapterkit keeps its state: the library, the catalog and converted bases."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HOME_ENV = "ADAPTERKIT_HOME"


def default_home() -> Path:
    """``$ADAPTERKIT_HOME``, else the per-user data folder (XDG on Linux, Application Support on macOS)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "adapterkit"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home())) / "adapterkit"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "adapterkit"


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The adapterkit home to use: the one given, else :func:`default_home`."""
    return Path(home).expanduser() if home else default_home()


def file_in_the_way(home: Path) -> str | None:
    """How ``home`` cannot be a folder — ``"is a file"``, ``"lies under F, which is a file"``
    — or None where it can (as far as can be told: a folder it could not look at is for its
    first use to say)."""
    for folder in (home, *home.parents):
        try:
            if not folder.exists():
                continue
            if folder.is_dir():
                return None
        except OSError:
            return None
        return "is a file" if folder == home else f"lies under {folder}, which is a file"
    return None
