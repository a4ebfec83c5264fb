"""Frozen pocket books underneath a training run (``train --on NAME``).

A parent pocket book is folded in as a forward hook on each base linear layer it touches:
``y = base(x) + (x Aᵀ) Bᵀ · scale`` with its factors held as plain tensors, not parameters. So it
is exactly active (no rounding, also on a 4-bit base), never trained, never saved with the new
pocket book — and because it sits *inside* the base layer, PEFT's ``disable_adapter()`` switches
off only the new pocket book. That is what makes TRL's reference model (DPO, GRPO's KL), the
forgetting guard's anchor and the forgetting check all mean "the policy before this stage",
with no second copy of anything.

Why not PEFT's multi-adapter support for this: ``disable_adapter()`` there switches every
adapter off at once, so the reference would silently become the plain base.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import BaseMismatch, InvalidAdapter
from .library import CONFIG_FILE, Library, PocketBook

HANDLES_ATTR = "_adapterkit_underlay"


def is_reward_book(book: PocketBook) -> bool:
    """A reward pocket book scores text (LoRA + scalar head); it cannot be a policy."""
    try:
        config = json.loads((book.path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return config.get("task_type") == "SEQ_CLS"


def chain(library: Library, book: PocketBook) -> list[PocketBook]:
    """``book``'s own underlay (bottom first), then ``book`` itself: the stack it needs."""
    return [library.get(ref) for ref in book.meta.stacked_on] + [book]


def check_policy(book: PocketBook, base: Any, *, role: str) -> None:
    """Refuse a reward pocket book, or one made on another base, where a policy is expected."""
    from .session import check_base

    if book.meta.kind != "adapter":
        raise InvalidAdapter(f"{role} {book.ref} is a {book.meta.kind}; name one trained "
                             "pocket book")
    if is_reward_book(book):
        raise InvalidAdapter(f"{role} {book.ref} is a reward pocket book (it scores text, it "
                             "does not generate); name a policy pocket book")
    try:
        check_base(base, book)
    except BaseMismatch as exc:
        raise BaseMismatch(f"{role}: {exc}") from None


def apply(model: Any, books: list[PocketBook]) -> list[str]:
    """Fold ``books`` (bottom first) into ``model``'s linear layers as frozen forward hooks.

    Returns their refs. Call before wrapping the model with the new PEFT adapter.
    """
    import torch

    from .session import read_factors

    if not books:
        return []
    device = next(model.parameters()).device
    per_layer: dict[str, list[tuple[Any, Any, Any]]] = {}
    for book in books:
        loaded = read_factors(book, dtype=torch.float32, device=device)
        for path, factors in loaded.factors.items():
            per_layer.setdefault(path, []).append(factors)
    handles = getattr(model, HANDLES_ATTR, [])
    for path, factors in per_layer.items():
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            raise BaseMismatch(f"the pocket books underneath target {path}, which this base "
                               "does not have") from None
        # Concatenate ranks: one matmul pair per layer however many books are underneath.
        a = torch.cat([f[0] for f in factors])
        b = torch.cat([f[1] * f[2] for f in factors], dim=1)
        handles.append(layer.register_forward_hook(_hook(a, b)))
    setattr(model, HANDLES_ATTR, handles)
    return [book.ref for book in books]


def remove(model: Any) -> None:
    """Take the frozen pocket books back out of ``model``."""
    for handle in getattr(model, HANDLES_ATTR, []):
        handle.remove()
    if hasattr(model, HANDLES_ATTR):
        delattr(model, HANDLES_ATTR)


def _hook(a: Any, b: Any) -> Any:
    def add_delta(module: Any, inputs: tuple[Any, ...], output: Any) -> Any:
        x = inputs[0]
        delta = (x.to(a.dtype) @ a.t()) @ b.t()
        return output + delta.to(output.dtype)

    return add_delta
