"""Pocket-book names and references (``name``, ``name@2``).

Names become folder names, so they are validated strictly: no path separators, no ``..``, a
bounded length, a leading letter or digit. A reference without ``@version`` means the latest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterkit.errors import InvalidName

MAX_NAME_LENGTH = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_name(name: str) -> str:
    """Return ``name`` unchanged if it can be a pocket-book name, else raise :class:`InvalidName`."""
    if not isinstance(name, str) or not name:
        raise InvalidName("a pocket-book name cannot be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(
            f"pocket-book name is {len(name)} characters long; use at most {MAX_NAME_LENGTH}"
        )
    if "/" in name or "\\" in name or ".." in name or not _NAME.fullmatch(name):
        raise InvalidName(
            f"invalid pocket-book name {name!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return name


@dataclass(frozen=True)
class Ref:
    """A reference to a pocket book: a name and an optional explicit version."""

    name: str
    version: int | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def parse_ref(text: str) -> Ref:
    """Parse ``name`` or ``name@N`` (N ≥ 1) into a :class:`Ref`."""
    name, sep, version = str(text).partition("@")
    validate_name(name)
    if not sep:
        return Ref(name)
    if not version.isdigit() or int(version) < 1:
        raise InvalidName(f"invalid version in {text!r}: write NAME@N with N a positive integer")
    return Ref(name, int(version))
