"""Per-row LoRA: one forward of the base for a batch whose rows each use their own pocket book.

A session binds one pocket book's factors into every slot (:mod:`adapterkit.lora.slots`), so a
batch can only have one. Here each targeted linear layer is wrapped once in a :class:`RowLora`,
and before a forward the engine binds a :class:`Pool`: for every pocket book (or stack) some
row of the batch uses, its factors per layer — ``A`` is ``R × in``, ``B`` ``out × R`` with
PEFT's scale (and a stack's weights) already inside ``B``, exactly as
:func:`adapterkit.lora.factors.concat` builds a stack — stacked per layer, one slice per target
(ranks padded with zero columns to the layer's largest, which add exact zeros). Each layer adds::

    y[rows of t] = base(x)[rows of t] + (x[rows of t] Aₜᵀ) Bₜᵀ      for every target t

for all targets at once, as two batched GEMMs (``bmm``) over the stack — the segmented-LoRA
idea of Punica / S-LoRA (SGMV), in plain torch ops. The engine keeps the rows of one target
next to each other and the targets in the pool's order, so where every target has as many rows
as the others (a load spread evenly over pocket books) the batched operands are views of the
batch and the sum is one in-place ``baddbmm``: the same two calls per layer as one pocket book.
Otherwise each target's rows are gathered into a block padded with zero rows (which add exact
zeros) and the products added back with ``index_add_``: five calls per layer whatever the number
of targets. (Earlier forms did two GEMMs per run of rows — 16 calls per layer with 8 pocket
books, which left a launch-bound GPU at half the one-book speed — and before that multiplied
every row by every target's factors and masked the other columns away: 8x the LoRA arithmetic.)
Rows on the plain base belong to no target and add nothing; a layer no row's target touches
skips the matmuls. The pool holds only the targets of the batch at hand, so its size follows the
batch, not the library.
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
    """What a layer adds in the next forward: target ``k`` of the stack to its rows."""

    at: torch.Tensor  # targets × in × R: each target's Aᵀ
    bt: torch.Tensor  # targets × R × out: each target's Bᵀ (scales inside)
    rows: int  # rows of the batch the plan is for
    #: Even runs: target ``k``'s rows are ``start + k·length`` … (+ ``length``), so the batched
    #: operands are views. ``start`` is -1 where they are not.
    start: int
    length: int
    #: Otherwise: ``targets × L`` row indices (``rows`` = a zero row: padding) to gather, and
    #: the same flattened with padding sent to row 0 (where it adds exact zeros) to add back.
    gather: torch.Tensor | None = None
    scatter: torch.Tensor | None = None


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
        """``x`` is ``rows × tokens × in``; every row adds its own target's delta."""
        result = self.base_layer(x, *args, **kwargs)
        plan = self.plan
        if plan is None:
            return result
        if x.dim() != 3 or x.shape[0] != plan.rows:
            # e.g. a mixture-of-experts layer fed a flattened or routed subset of tokens: which
            # token is whose row is unknown here, so the answer would be wrong
            raise RuntimeError(
                f"per-request pocket books need this layer's input as {plan.rows} rows × tokens "
                f"× features; it got {tuple(x.shape)} (a mixture-of-experts layer?): serve this "
                "base with a session (adapterkit chat/generate) or --engine vllm")
        if not result.is_contiguous():  # e.g. a quantized layer's output: rows must be lines
            result = result.contiguous()
        targets, tokens = plan.at.shape[0], x.shape[1]
        if plan.start >= 0:  # even runs: views of the batch, the sum done in place
            lines = slice(plan.start * tokens, (plan.start + targets * plan.length) * tokens)
            xs = x.reshape(-1, x.shape[-1])[lines].view(targets, plan.length * tokens, -1)
            out = result.view(-1, result.shape[-1])[lines].view(targets, -1, result.shape[-1])
            if xs.dtype != plan.at.dtype:
                xs = xs.to(plan.at.dtype)
            if plan.bt.dtype == out.dtype:
                out.baddbmm_(xs.bmm(plan.at), plan.bt)
            else:
                out += xs.bmm(plan.at).bmm(plan.bt).to(out.dtype)
            return result
        assert plan.gather is not None and plan.scatter is not None
        # one line per row (a row's tokens side by side), and a zero line for the padding
        per_row = x.reshape(plan.rows, -1)
        per_row = torch.cat([per_row, per_row.new_zeros((1, per_row.shape[1]))])
        xs = per_row.index_select(0, plan.gather.view(-1)).view(targets, -1, x.shape[-1])
        if xs.dtype != plan.at.dtype:
            xs = xs.to(plan.at.dtype)
        delta = xs.bmm(plan.at).bmm(plan.bt).view(-1, tokens * result.shape[-1])
        result.view(plan.rows, -1).index_add_(0, plan.scatter, delta.to(result.dtype))
        return result


class Pool:
    """The factors of the distinct targets of one batch, stacked per layer.

    :param targets: each target's members (see :data:`Members`); a row names its target by
        its index in this list, or ``-1`` for the plain base.
    """

    def __init__(self, targets: Sequence[Members]) -> None:
        #: layer path → (Aᵀ stack, Bᵀ stack, the targets it holds in stack order)
        self.layers: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
        pairs: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for index, members in enumerate(targets):
            for path in sorted({p for book, _ in members for p in book.factors}):
                parts = [(book.factors[path], float(w)) for book, w in members
                         if path in book.factors]
                a, b = concat(parts)  # the stack's exact weighted sum, scales inside B
                pairs.setdefault(path, []).append((index, a, b))
        for path, held in pairs.items():
            rank = max(a.shape[0] for _, a, _ in held)
            a0, b0 = held[0][1], held[0][2]
            at = a0.new_zeros((len(held), a0.shape[1], rank))
            bt = b0.new_zeros((len(held), rank, b0.shape[0]))
            for k, (_, a, b) in enumerate(held):
                at[k, :, :a.shape[0]] = a.t()
                bt[k, :b.shape[1], :] = b.t()
            self.layers[path] = (at, bt, tuple(index for index, _, _ in held))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for at, bt, _ in self.layers.values()
                   for t in (at, bt))

    def bind(self, slots: dict[str, RowLora], rows: Sequence[int]) -> None:
        """Set every slot's plan for a forward whose row ``i`` uses target ``rows[i]`` (``-1``:
        the plain base). Rows need not be in any order; the engine keeps each target's rows
        adjacent and the targets in the pool's order, which lets even runs be views."""
        layouts: dict[tuple[int, ...], tuple[slice, int, int, Any, Any]] = {}
        for path, slot in slots.items():
            layer = self.layers.get(path)
            if layer is None:
                slot.plan = None
                continue
            at, bt, held = layer
            if held not in layouts:
                layouts[held] = _layout(rows, held, at.device)
            targets, start, length, gather, scatter = layouts[held]
            slot.plan = None if length == 0 else Plan(at[targets], bt[targets], len(rows),
                                                      start, length, gather, scatter)


def _layout(rows: Sequence[int], held: tuple[int, ...], device: Any
            ) -> tuple[slice, int, int, Any, Any]:
    """Which of the held targets (a slice of the stack) the plan multiplies, and where their
    rows are: ``(targets, start, length, None, None)`` when the targets some row uses are
    adjacent in the stack and their rows even adjacent runs in stack order, else
    ``(all, -1, longest, gather, scatter)``; length 0 when no row uses any of them."""
    members = [[i for i, t in enumerate(rows) if t == target] for target in held]
    used = [k for k, m in enumerate(members) if m]
    if not used:
        return slice(0, 0), -1, 0, None, None
    length = max(len(members[k]) for k in used)
    first = members[used[0]][0]
    if used == list(range(used[0], used[-1] + 1)) and all(
            members[k] == list(range(first + n * length, first + (n + 1) * length))
            for n, k in enumerate(used)):
        return slice(used[0], used[-1] + 1), first, length, None, None
    pad = len(rows)  # the zero line appended after the batch's rows
    gather = torch.tensor([m + [pad] * (length - len(m)) for m in members],
                          dtype=torch.long, device=device)
    scatter = torch.where(gather == pad, 0, gather).view(-1)
    return slice(0, len(held)), -1, length, gather, scatter


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
