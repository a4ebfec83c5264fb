"""Frozen pocket books underneath a training run (``train --on NAME``).

A parent pocket book is folded in as a forward hook on each base linear layer it touches:
``y = base(x) + (x Aᵀ) Bᵀ · scale`` with its factors held as plain tensors, not parameters. So it
is exactly active (no rounding, also on a 4-bit base), never trained, never saved with the new
pocket book — and because it sits *inside* the base layer, PEFT's ``disable_adapter()`` switches
off only the new pocket book. That is what makes TRL's reference model (DPO, GRPO's KL), the
forgetting guard's anchor and the forgetting check all mean "the policy before this stage",
with no second copy of anything.

Every pocket book another one needs — underneath it, or as a member of a saved stack — is
fetched and checked here (:func:`below`, :func:`stack_members`): the one recorded with its
weights' hash must still hold those weights, and one removed is refused by name.

Why not PEFT's multi-adapter support for this: ``disable_adapter()`` there switches every
adapter off at once, so the reference would silently become the plain base.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from adapterkit.errors import BaseMismatch, InvalidAdapter, PocketBookNotFound
from adapterkit.library.integrity import check_book, held_weights
from adapterkit.library.names import weight_text
from adapterkit.library.peft_folder import read_config
from adapterkit.library.store import Library, PocketBook
from adapterkit.lora.factors import (
    Factors,
    concat,
    finite_weight,
    read_factors,
    resident_tensors,
)

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.base.load import BaseStructure

HANDLES_ATTR = "_adapterkit_underlay"


def is_reward_book(book: PocketBook) -> bool:
    """A reward pocket book scores text (LoRA + scalar head); it cannot be a policy."""
    try:
        config = read_config(book.path)
    except InvalidAdapter:  # a damaged folder is refused where it is read
        return False
    return config.get("task_type") == "SEQ_CLS"


def refuse_reward(book: PocketBook) -> None:
    """A reward pocket book cannot be attached for generation."""
    if is_reward_book(book):
        raise InvalidAdapter(f"{book.ref} is a reward pocket book: it scores text, it does not "
                             "generate. Use it with `adapterkit train rlhf --reward`")


def chain(library: Library, book: PocketBook) -> list[PocketBook]:
    """``book``'s own underlay (bottom first), then ``book`` itself: the stack it needs."""
    return [*below(library, book), book]


def below(library: Library, book: PocketBook) -> list[PocketBook]:
    """The pocket books ``book`` was trained on top of (``--on``), bottom first, each checked
    to be the one it was trained on (:func:`check_under`)."""
    out = []
    for ref in book.meta.stacked_on:
        under = needed(library, book, ref)
        check_under(book, under)
        out.append(under)
    return out


def stack_members(library: Library, book: PocketBook) -> list[tuple[PocketBook, float]]:
    """A saved stack's members with their saved weights, each checked to be the pocket book
    the stack was saved with (:func:`check_under`): the one place a saved stack is expanded
    (sessions, plain PEFT, ``verify``, exports, the servers). A member removed since, or a
    weight that is not a number, is refused by name (:class:`InvalidAdapter`); a stack saved
    before member hashes were recorded is expanded as saved."""
    saved = book.meta.hyperparameters.get("weights")
    if book.meta.kind != "stack" or not isinstance(saved, dict) or not saved:
        raise InvalidAdapter(f"{book.ref} is not a saved stack with members; save it again "
                             "with `adapterkit stack`")
    for ref, weight in saved.items():
        if not finite_weight(weight):
            raise InvalidAdapter(f"saved stack {book.ref} gives {ref} the weight {weight!r}; "
                                 "re-save it with numbers")
    out = []
    for ref, weight in saved.items():
        member = needed(library, book, ref)
        check_under(book, member)
        out.append((member, float(weight)))
    return out


def with_underlays(library: Library, explicit: list[tuple[PocketBook, float]]
                   ) -> list[tuple[PocketBook, float]]:
    """``explicit`` (pocket books with their weights) with what each was trained ``--on``
    underneath at weight 1 — unless ``explicit`` names that one itself, whose weight then wins
    (as in :meth:`Session.stack`). Underlays first, each checked (:func:`check_under`)."""
    named = {book.ref for book, _ in explicit}
    under: dict[str, PocketBook] = {}
    for book, _ in explicit:
        for lower in below(library, book):
            if lower.ref not in named:
                under.setdefault(lower.ref, lower)
    return [*((b, 1.0) for b in under.values()), *explicit]


def needed(library: Library, book: PocketBook, ref: str) -> PocketBook:
    """``ref``, which ``book`` needs (trained on top of it, or a stack of it); a refusal naming
    both where the library no longer holds it (``rm --force``)."""
    try:
        return library.get(ref)
    except PocketBookNotFound:
        raise InvalidAdapter(
            f"{book.ref} {_needs(book)} {ref}, which this library no longer holds (removed with "
            f"`rm --force`?): import or pull it again as {ref} to use {book.ref}") from None


def check_under(book: PocketBook, under: PocketBook) -> None:
    """Refuse ``under`` beneath ``book``, or as a member of the saved stack ``book``, if its
    weights are not those ``book`` was trained on or saved with (where recorded: books trained
    since 0.2, stacks saved since member hashes were recorded): the same name, another pocket
    book (``rm --force``, then an import under that name), would answer otherwise."""
    wanted = book.meta.stacked_on_sha256.get(under.ref)
    if not wanted:
        return
    held = held_weights(under)
    if held != wanted:
        again = ""
        if book.meta.kind == "stack":
            saved = book.meta.hyperparameters.get("weights") or {}
            again = (f", or save the stack again with what {under.ref} is now (`adapterkit stack "
                     f"{' '.join(saved)} --weights {','.join(weight_text(w) for w in saved.values())} "
                     "--name NAME`)")
        raise InvalidAdapter(
            f"{book.ref} {_needs(book)} {under.ref} with weights {wanted[:12]}, and this "
            f"library's {under.ref} holds other weights ({held[:12]}): another pocket book "
            f"under that name. Pull or import the one it was "
            f"{'saved with' if book.meta.kind == 'stack' else 'trained on'} as {under.ref} to "
            f"use {book.ref}{again}")


def _needs(book: PocketBook) -> str:
    """How ``book`` needs another pocket book, as a refusal says it."""
    return "is a stack of" if book.meta.kind == "stack" else "was trained on top of"


def check_policy(book: PocketBook, base: Any, *, role: str) -> None:
    """Refuse a stack, or a pocket book made on another base, where a policy is expected
    (reward pocket books are refused before the base loads: ``adapterkit.training.build.parent_of``)."""
    from adapterkit.base.compat import check_base

    if book.meta.kind != "adapter":
        raise InvalidAdapter(f"{role} {book.ref} is a {book.meta.kind}; name one trained "
                             "pocket book")
    try:
        check_base(base, book)
    except BaseMismatch as exc:
        raise BaseMismatch(f"{role}: {exc}") from None


class Gate:
    """Whether a set of folded-in pocket books is active right now (a reward pocket book is
    folded in switched off, and switched on only while it scores)."""

    def __init__(self, on: bool = True) -> None:
        self.on = on

    @contextmanager
    def set(self, on: bool) -> Iterator[None]:
        previous, self.on = self.on, on
        try:
            yield
        finally:
            self.on = previous


def apply(model: Any, books: list[PocketBook], *, gate: Gate | None = None,
          extra: dict[str, Any] | None = None,
          path_name: str = "training on top of it (--on)",
          structure: BaseStructure | None = None) -> Gate:
    """Fold ``books`` (bottom first) into ``model``'s linear layers as frozen forward hooks.

    Returns the :class:`Gate` that switches them (on unless ``gate`` says otherwise). Tensors
    that are not LoRA factors (a reward head) are refused unless ``extra`` collects them. Each
    book's files are checked first (:func:`adapterkit.library.integrity.check_book`; their
    shapes against ``structure``, the base's, where given).
    """
    import torch

    gate = gate or Gate()
    if not books:
        return gate
    for book in books:
        check_book(book, structure)
    device = next(model.parameters()).device
    per_layer: dict[str, list[tuple[Factors, float]]] = {}
    for book in books:
        book_factors = read_factors(
            book.path, ref=book.ref, path=path_name, dtype=torch.float32, device=device,
            extra=extra, base_weights=resident_tensors(model),
            instead="train on the plain base, or on a plain LoRA pocket book, instead")
        for path, f in book_factors.items():
            per_layer.setdefault(path, []).append((f, 1.0))
    handles = getattr(model, HANDLES_ATTR, [])
    for path, factors in per_layer.items():
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            raise BaseMismatch(f"the pocket books underneath target {path}, which this base "
                               "does not have") from None
        # Concatenate ranks: one matmul pair per layer however many books are underneath.
        a, b = concat(factors)
        handles.append((layer.register_forward_hook(_hook(a, b, gate)), gate))
    setattr(model, HANDLES_ATTR, handles)
    return gate


def remove(model: Any, gate: Gate | None = None) -> None:
    """Take the frozen pocket books back out of ``model`` (only ``gate``'s, if given)."""
    keep = []
    for handle, owner in getattr(model, HANDLES_ATTR, []):
        if gate is None or owner is gate:
            handle.remove()
        else:
            keep.append((handle, owner))
    if keep:
        setattr(model, HANDLES_ATTR, keep)
    elif hasattr(model, HANDLES_ATTR):
        delattr(model, HANDLES_ATTR)


@contextmanager
def suspended(model: Any, keep: Gate | None = None) -> Iterator[None]:
    """Every folded-in pocket book of ``model`` off (but ``keep``'s), e.g. while a reward
    pocket book scores text on the plain base."""
    gates = {id(g): g for _, g in getattr(model, HANDLES_ATTR, []) if g is not keep}
    previous = {k: g.on for k, g in gates.items()}
    for g in gates.values():
        g.on = False
    try:
        yield
    finally:
        for k, g in gates.items():
            g.on = previous[k]


def _hook(a: Any, b: Any, gate: Gate) -> Any:
    def add_delta(module: Any, inputs: tuple[Any, ...], output: Any) -> Any:
        if not gate.on:
            return output
        x = inputs[0]
        delta = (x.to(a.dtype) @ a.t()) @ b.t()
        return output + delta.to(output.dtype)

    return add_delta
