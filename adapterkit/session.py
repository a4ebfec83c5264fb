"""Attaching pocket books to a resident base.

Refuses a pocket book made on another base (fingerprint mismatch) unless forced, because a LoRA
on the wrong base still "works" — it just produces quietly wrong answers.
"""

from __future__ import annotations

import warnings
from typing import Any

from .base import Base
from .errors import BaseMismatch
from .library import PocketBook


def check_base(base: Base, book: PocketBook, *, force: bool = False) -> None:
    """Raise :class:`BaseMismatch` unless ``book`` was made on ``base`` (or ``force``)."""
    if book.meta.base_fingerprint == base.fingerprint:
        return
    message = (
        f"pocket book {book.ref} was made on base {book.meta.base.get('name', '?')} "
        f"(fingerprint {book.meta.base_fingerprint[:12]}), not on {base.name} "
        f"(fingerprint {base.fingerprint[:12]})"
    )
    if not force:
        raise BaseMismatch(message + f"; load {book.meta.base.get('name', 'its base')} instead, "
                                     "or force it if you know the weights are compatible")
    warnings.warn(message + "; attached anyway because it was forced", UserWarning, stacklevel=2)


def attach(base: Base, book: PocketBook, *, adapter_name: str = "default",
           force: bool = False) -> Any:
    """Wrap ``base.model`` with ``book`` as a PEFT model (inference mode)."""
    from peft import PeftModel

    check_base(base, book, force=force)
    model = PeftModel.from_pretrained(base.model, str(book.path), adapter_name=adapter_name,
                                      is_trainable=False)
    model.eval()
    return model
