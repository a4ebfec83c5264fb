"""Per-row LoRA: one forward of the base for a batch whose rows each use their own pocket book.

A session binds one pocket book's factors into every slot (:mod:`adapterkit.lora.slots`), so a
batch can only have one. Here each targeted linear layer is wrapped once in a :class:`RowLora`,
and before a forward the engine binds a :class:`Pool`: for every pocket book (or stack) some
row of the batch uses, its factors concatenated along the rank — ``A`` is ``R × in``, ``B``
``out × R`` with PEFT's scale (and a stack's weights) already inside ``B``, exactly as
:func:`adapterkit.lora.factors.concat` builds a stack — plus, per rank column, which of those
targets owns it. A row then keeps only its own target's columns::

    y = base(x) + ((x Aᵀ) ⊙ mask_row) Bᵀ

which is that row's ``s·B A x`` (the other columns contribute exact zeros), for all rows in two
dense matmuls per layer however many pocket books share the batch — the segmented-LoRA idea of
Punica / S-LoRA written with plain torch ops instead of a custom gather kernel. Rows on the plain
base own no column and add nothing; a layer no row's target touches skips the matmuls. The pool
holds only the targets of the batch at hand, so its size follows the batch, not the library.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from adapterkit.lora.factors import concat

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.runtime.session import LoadedBook

#: One target as the pool receives it: its pocket books with their weights (underlays first).
Members = Sequence[tuple["LoadedBook", float]]


class Plan(NamedTuple):
    """What one layer adds in the next forward: the pool's factors and each row's mask."""

    a: torch.Tensor  # R × in
    b: torch.Tensor  # out × R
    mask: torch.Tensor  # rows × 1 × R, 1 where the row's own target owns the rank column


class RowLora(nn.Module):
    """A linear layer of the served base plus, per batch row, its own target's LoRA delta."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        #: Bound by :meth:`Pool.bind` before each forward; None adds nothing.
        self.plan: Plan | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x`` is ``rows × tokens × in``; every row adds its own delta."""
        result = self.base_layer(x, *args, **kwargs)
        plan = self.plan
        if plan is None:
            return result
        xa = (x.to(plan.a.dtype) @ plan.a.t()) * plan.mask
        return result + (xa @ plan.b.t()).to(result.dtype)


class _Layer(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor
    owner: torch.Tensor  # R, long: the index of the target owning each rank column


class Pool:
    """The factors of the distinct targets of one batch, concatenated per layer.

    :param targets: each target's members (see :data:`Members`); a row names its target by
        its index in this list, or ``-1`` for the plain base.
    """

    def __init__(self, targets: Sequence[Members]) -> None:
        paths = sorted({p for members in targets for book, _ in members for p in book.factors})
        self.layers: dict[str, _Layer] = {}
        owners: dict[tuple[tuple[int, int], ...], torch.Tensor] = {}
        for path in paths:
            a_parts, b_parts, segments = [], [], []
            for index, members in enumerate(targets):
                parts = [(book.factors[path], float(w)) for book, w in members
                         if path in book.factors]
                if not parts:
                    continue
                a, b = concat(parts)  # the stack's exact weighted sum, scales inside B
                a_parts.append(a)
                b_parts.append(b)
                segments.append((index, int(a.shape[0])))
            key = tuple(segments)
            if key not in owners:  # layers with the same owners share one tensor (and mask)
                owners[key] = torch.tensor([i for i, width in segments for _ in range(width)],
                                           device=a_parts[0].device)
            self.layers[path] = _Layer(torch.cat(a_parts), torch.cat(b_parts, dim=1),
                                       owners[key])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values()
                   for t in (layer.a, layer.b))

    def bind(self, slots: dict[str, RowLora], rows: Sequence[int]) -> None:
        """Set every slot's plan for a forward whose row ``i`` uses target ``rows[i]``."""
        masks: dict[int, torch.Tensor | None] = {}
        index: torch.Tensor | None = None
        for path, slot in slots.items():
            layer = self.layers.get(path)
            if layer is None:
                slot.plan = None
                continue
            if id(layer.owner) not in masks:
                if index is None:
                    index = torch.tensor(list(rows), device=layer.owner.device)
                hit = index[:, None] == layer.owner[None, :]
                masks[id(layer.owner)] = hit.to(layer.a.dtype)[:, None, :] if bool(
                    hit.any()) else None
            mask = masks[id(layer.owner)]
            slot.plan = None if mask is None else Plan(layer.a, layer.b, mask)


def clear(slots: dict[str, RowLora]) -> None:
    """Every slot adds nothing (the plain base), and no pool tensor stays referenced."""
    for slot in slots.values():
        slot.plan = None


def wrap(model: nn.Module, path: str) -> RowLora:
    """Replace the linear layer at ``path`` by a :class:`RowLora` around it (idempotent)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layer = getattr(parent, child)
    if isinstance(layer, RowLora):
        return layer
    in_f, out_f = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
    if in_f is None or out_f is None:
        raise TypeError(f"{path} is a {type(layer).__name__}, not a linear layer")
    slot = RowLora(layer, int(in_f), int(out_f))
    setattr(parent, child, slot)
    return slot


def unwrap_all(model: nn.Module) -> None:
    """Put every wrapped linear layer back: the base is as it was loaded."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RowLora):
            parent_path, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, module.base_layer)
