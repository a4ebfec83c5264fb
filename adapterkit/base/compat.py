"""Whether a pocket book belongs on a base: the fingerprint check every attach path makes.

A LoRA on the wrong base still "works" — it just produces quietly wrong answers — so every
path that puts a pocket book on a base (sessions, PEFT attach, underlays, the reward scorer)
asks here first.
"""

from __future__ import annotations

import warnings
from typing import Any

from adapterkit.errors import BaseMismatch


def check_base(base: Any, book: Any, *, force: bool = False) -> None:
    """Raise :class:`BaseMismatch` unless ``book`` was made on ``base`` (or ``force``)."""
    if book.meta.base_fingerprint == base.fingerprint:
        return
    message = (
        f"pocket book {book.ref} was made on base {book.meta.base.get('name', '?')} "
        f"(fingerprint {book.meta.base_fingerprint[:12]}), not on {base.name} "
        f"(fingerprint {base.fingerprint[:12]})"
    )
    if not force:
        raise BaseMismatch(message + f"; load {book.meta.base.get('name', 'its base')} instead "
                                     "(only if you know the weights are compatible, `generate` "
                                     "and `swap` attach it anyway with --force)",
                           mismatch=message)
    warnings.warn(message + "; attached anyway because it was forced", UserWarning, stacklevel=2)
