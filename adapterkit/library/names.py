"""Pocket-book names and references (``name``, ``name@2``).

Names become folder names, so they are validated strictly: no path separators, no ``..``, a
bounded length, a leading letter or digit. A reference without ``@version`` means the latest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterkit.errors import InvalidName

MAX_NAME_LENGTH = 100
MAX_VERSION = 10**9
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# ASCII digits only: ``str.isdigit`` also accepts "²" (which ``int`` refuses) and "١" (which
# ``int`` reads as 1, so ``x@١`` would silently mean ``x@1``).
_VERSION = re.compile(r"[0-9]+")


def validate_name(name: str) -> str:
    """Return ``name`` unchanged if it can be a pocket-book name, else raise :class:`InvalidName`."""
    if not isinstance(name, str):
        raise InvalidName(f"a pocket-book name must be a string, got {name!r}")
    if not name:
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


def parse_ref(text: str | Ref) -> Ref:
    """Parse ``name`` or ``name@N`` (1 ≤ N ≤ 10⁹, ASCII digits) into a :class:`Ref`; a
    :class:`Ref` is returned as it is."""
    if isinstance(text, Ref):
        return text
    if not isinstance(text, str):  # str(5) would be the valid name "5"; str(None) "None"
        raise InvalidName(f"a pocket-book reference must be a string such as NAME or NAME@2, "
                          f"got {text!r}")
    name, sep, version = text.partition("@")
    validate_name(name)
    if not sep:
        return Ref(name)
    digits = version.lstrip("0")
    if not _VERSION.fullmatch(version) or not digits:
        raise InvalidName(f"invalid version in {text!r}: write NAME@N with N a positive integer "
                          "(ASCII digits)")
    # Compared as digits first: ``int`` refuses over 4,300 digits, and a huge version would
    # overflow SQLite's integers later.
    if len(digits) > len(str(MAX_VERSION)) or int(digits) > MAX_VERSION:
        raise InvalidName(f"invalid version in {text!r}: versions go from 1 to {MAX_VERSION}")
    return Ref(name, int(digits))


def weight_text(weight: float) -> str:
    """The shortest text that reads back as ``weight`` exactly (``1``, ``0.5``, ``1e30``): in a
    command to run again or a stack's model name every digit counts (``:g`` keeps six), and an
    exponent has no ``+``, where a stack's name would part."""
    text = repr(float(weight)).replace("e+", "e")
    return text[:-2] if text.endswith(".0") else text
