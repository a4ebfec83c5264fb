"""Per-row LoRA: one forward of the base for a batch whose rows each use their own pocket book.

A session binds one pocket book's factors into every slot (:mod:`adapterkit.lora.slots`), so a
batch can only have one. Here each targeted linear layer is wrapped once in a :class:`RowLora`,
and before a forward the engine binds a :class:`Pool`: for every pocket book (or stack) some
row of the batch uses, its factors per layer — ``A`` is ``R × in``, ``B`` ``out × R`` with
PEFT's scale (and a stack's weights) already inside ``B``, exactly as
:func:`adapterkit.lora.factors.concat` builds a stack. The engine keeps the rows of one target
next to each other in the batch, so a target's rows are one slice of it, and each layer adds::

    y[s:e] = base(x)[s:e] + (x[s:e] Aᵀ) Bᵀ

for each run ``s:e`` of rows sharing a target — the segmented-LoRA idea of Punica / S-LoRA
(SGMV), written with plain torch ops on views of the batch: no gather, no copy of the factors
per row, and each row multiplies by its own target's rank only. (An earlier form multiplied every
row by the factors of every target in the batch and masked the other columns away; with 8
pocket books that was 8x the LoRA arithmetic, about a third more than the base's own per step.)
Rows on the plain base are in no run and add nothing; a layer no row's target touches skips the
matmuls. The pool holds only the targets of the batch at hand, so its size follows the batch,
not the library.
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


class Segment(NamedTuple):
    """Rows ``start:stop`` of the next forward add ``(x Aᵀ) Bᵀ`` on this layer."""

    start: int
    stop: int
    at: torch.Tensor  # Aᵀ, in × R, contiguous
    bt: torch.Tensor  # Bᵀ, R × out, contiguous


class RowLora(nn.Module):
    """A linear layer of the served base plus, per batch row, its own target's LoRA delta."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        #: Bound by :meth:`Pool.bind` before each forward; empty adds nothing.
        self.plan: tuple[Segment, ...] = ()
        #: Rows of the batch the plan is for.
        self.rows = 0

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x`` is ``rows × tokens × in``; every run of rows adds its own target's delta."""
        result = self.base_layer(x, *args, **kwargs)
        if not self.plan:
            return result
        if x.dim() != 3 or x.shape[0] != self.rows:
            # e.g. a mixture-of-experts layer fed a flattened or routed subset of tokens: which
            # token is whose row is unknown here, so the answer would be wrong
            raise RuntimeError(
                f"per-request pocket books need this layer's input as {self.rows} rows × tokens "
                f"× features; it got {tuple(x.shape)} (a mixture-of-experts layer?): serve this "
                "base with a session (adapterkit chat/generate) or --engine vllm")
        # Rows × tokens flattened, so a run of rows is a run of lines: 2-D views and two BLAS
        # calls per segment (``matmul``'s folding of 3-D operands costs more than the product
        # at decode sizes), the add done by the second GEMM into the rows' own view.
        tokens = x.shape[1]
        if not result.is_contiguous():  # e.g. a quantized layer's output: rows must be lines
            result = result.contiguous()
        flat = x.reshape(-1, x.shape[-1])
        out = result.view(-1, result.shape[-1])
        for start, stop, at, bt in self.plan:
            rows = flat[start * tokens:stop * tokens]
            if rows.dtype != at.dtype:
                rows = rows.to(at.dtype)
            if bt.dtype == out.dtype:
                out[start * tokens:stop * tokens].addmm_(rows.mm(at), bt)
            else:
                out[start * tokens:stop * tokens] += rows.mm(at).mm(bt).to(out.dtype)
        return result


class Pool:
    """The factors of the distinct targets of one batch, per layer.

    :param targets: each target's members (see :data:`Members`); a row names its target by
        its index in this list, or ``-1`` for the plain base.
    """

    def __init__(self, targets: Sequence[Members]) -> None:
        #: layer path → {target index: (Aᵀ, Bᵀ)}
        self.layers: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for index, members in enumerate(targets):
            for path in sorted({p for book, _ in members for p in book.factors}):
                parts = [(book.factors[path], float(w)) for book, w in members
                         if path in book.factors]
                a, b = concat(parts)  # the stack's exact weighted sum, scales inside B
                # stored transposed and contiguous: the GEMMs then read them row-major
                self.layers.setdefault(path, {})[index] = (a.t().contiguous(),
                                                           b.t().contiguous())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values()
                   for pair in layer.values() for t in pair)

    def bind(self, slots: dict[str, RowLora], rows: Sequence[int]) -> None:
        """Set every slot's plan for a forward whose row ``i`` uses target ``rows[i]``. Rows of
        one target need not be adjacent (each run is a segment), but the engine keeps them so:
        one segment per target."""
        runs = runs_of(rows)
        for path, slot in slots.items():
            slot.rows = len(rows)
            layer = self.layers.get(path, {})
            slot.plan = tuple(Segment(start, stop, *layer[target])
                              for target, start, stop in runs if target in layer)


def runs_of(rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(target, start, stop)`` for each run of equal targets in ``rows``, the plain base's
    (``-1``) left out."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[start]:
            if rows[start] >= 0:
                runs.append((rows[start], start, i))
            start = i
    return runs


def clear(slots: dict[str, RowLora]) -> None:
    """Every slot adds nothing (the plain base), and no pool tensor stays referenced."""
    for slot in slots.values():
        slot.plan = ()


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
