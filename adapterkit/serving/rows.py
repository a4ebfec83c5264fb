"""Per-row LoRA: one forward of the base for a batch whose rows each use their own pocket book.

A session binds one pocket book's factors into every slot (:mod:`adapterkit.lora.slots`), so a
batch can only have one. Here each targeted linear layer is wrapped once in a :class:`RowLora`,
and before a forward the engine binds a :class:`Pool`: for every pocket book (or stack) some
row of the batch uses, its factors per layer — ``A`` is ``R × in``, ``B`` ``out × R`` with
PEFT's scale (and a stack's weights) already inside ``B``, exactly as
:func:`adapterkit.lora.factors.concat` builds a stack — stacked per layer, one slice per target
(ranks padded with zero columns to the layer's largest, which add exact zeros). Each layer adds::

    y[rows of t] = base(x)[rows of t] + (x[rows of t] Aₜᵀ) Bₜᵀ      for every target t

for all targets at once, as batched GEMMs (``bmm``) over the stack — the segmented-LoRA idea
of Punica / S-LoRA (SGMV), in plain torch ops. A layer's plan takes one of three forms
(:func:`layout`):

* ``views`` — the engine keeps the rows of one target next to each other and the targets in
  the pool's order, so where every target some row uses has as many rows as the others (a load
  spread evenly over pocket books), the batched operands are views of the batch and the sum is
  one in-place ``baddbmm``: two calls per layer, as for one pocket book;
* ``gather`` — otherwise each target's rows are gathered into a block padded with zero rows
  (which add exact zeros) and the products added back with ``index_add_``: six calls per layer
  whatever the number of targets, at the cost of the padding's arithmetic (every target padded
  to the longest, a target without rows between used ones a zero block); taken while the
  blocks hold at most :data:`MAX_GATHERED` times the real rows;
* ``runs`` — else (a skewed load: most rows on one pocket book, a few on others) two GEMMs per
  run of adjacent rows of one target, on views.

The stack's ranks are padded to the largest of its targets: every target in a layer multiplies
at that rank. (Before the stack, every layer did the ``runs`` form — 16 calls per layer with 8
pocket books, which left a launch-bound GPU at half the one-book speed — and before that every
row was multiplied by every target's factors and the other columns masked away: 8x the LoRA
arithmetic.)
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
    """What a layer adds in the next forward, in one of three forms (see the module's text)."""

    at: torch.Tensor  # targets × in × R: Aᵀ of the stack's targets the plan uses
    bt: torch.Tensor  # targets × R × out: their Bᵀ (scales inside)
    rows: int  # rows of the batch the plan is for
    #: ``views``: target ``k``'s rows are ``start + k·length`` … (+ ``length``).
    #: ``gather``: ``gather`` holds each target's rows (``rows`` = the zero line: padding),
    #: ``real`` the positions of real rows in it flattened, ``scatter`` their batch rows. The
    #: padding's products are never added anywhere: a pocket book with non-finite factors
    #: makes them NaN (0·inf), which must not reach another request's row.
    #: ``runs``: ``(target, start, stop)`` per run of adjacent rows of one target.
    form: str
    start: int = -1
    length: int = 0
    gather: torch.Tensor | None = None
    scatter: torch.Tensor | None = None
    runs: tuple[tuple[int, int, int], ...] = ()
    real: torch.Tensor | None = None


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
        tokens = x.shape[1]
        # rows × tokens flattened: a run of rows is a run of lines
        flat = x.reshape(-1, x.shape[-1])
        out = result.view(-1, result.shape[-1])
        if plan.form == "views":  # the batched operands are views, the sum done in place
            targets = plan.at.shape[0]
            lines = slice(plan.start * tokens, (plan.start + targets * plan.length) * tokens)
            xs = _cast(flat[lines], plan.at).view(targets, plan.length * tokens, -1)
            blocks = out[lines].view(targets, -1, out.shape[-1])
            if plan.bt.dtype == out.dtype:
                blocks.baddbmm_(xs.bmm(plan.at), plan.bt)
            else:
                blocks += xs.bmm(plan.at).bmm(plan.bt).to(out.dtype)
        elif plan.form == "gather":
            assert plan.gather is not None and plan.scatter is not None \
                and plan.real is not None
            # one line per row (a row's tokens side by side), and a zero line for the padding
            per_row = x.reshape(plan.rows, -1)
            per_row = torch.cat([per_row, per_row.new_zeros((1, per_row.shape[1]))])
            xs = _cast(per_row.index_select(0, plan.gather.view(-1)), plan.at)
            delta = xs.view(plan.at.shape[0], -1, x.shape[-1]).bmm(plan.at).bmm(plan.bt)
            delta = delta.view(-1, tokens * out.shape[-1]).index_select(0, plan.real)
            result.view(plan.rows, -1).index_add_(0, plan.scatter, delta.to(result.dtype))
        else:  # runs: two GEMMs per run, on views of the batch
            for k, start, stop in plan.runs:
                lines = slice(start * tokens, stop * tokens)
                xs = _cast(flat[lines], plan.at)
                if plan.bt.dtype == out.dtype:
                    out[lines].addmm_(xs.mm(plan.at[k]), plan.bt[k])
                else:
                    out[lines] += xs.mm(plan.at[k]).mm(plan.bt[k]).to(out.dtype)
        return result


def _cast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == like.dtype else x.to(like.dtype)


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
                a, b = concat(parts, check=False)  # the stack's exact sum (weights checked on admission)
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
        """The pool's own memory: its stacked factors."""
        return sum(t.numel() * t.element_size() for at, bt, _ in self.layers.values()
                   for t in (at, bt))

    def bind(self, slots: dict[str, RowLora], rows: Sequence[int]) -> None:
        """Set every slot's plan for a forward whose row ``i`` uses target ``rows[i]`` (``-1``:
        the plain base). Rows may lie in any order; the engine keeps each target's rows
        adjacent and the targets in the pool's order, which lets even runs be views."""
        # one layout (and one pair of index tensors) per set of held targets and device, not
        # per layer
        layouts: dict[tuple[tuple[int, ...], Any], tuple[Layout | None, Any, Any, Any]] = {}
        for path, slot in slots.items():
            layer = self.layers.get(path)
            if layer is None:
                slot.plan = None
                continue
            at, bt, held = layer
            key = (held, at.device)
            if key not in layouts:
                how, gather, scatter, real = layout(rows, held), None, None, None
                if how is not None and how.gather:
                    gather = torch.tensor(how.gather, dtype=torch.long, device=at.device)
                    real = (gather.view(-1) != len(rows)).nonzero().view(-1)
                    scatter = gather.view(-1).index_select(0, real)
                layouts[key] = (how, gather, scatter, real)
            how, gather, scatter, real = layouts[key]
            slot.plan = None if how is None else Plan(
                at[how.targets], bt[how.targets], len(rows), how.form, how.start, how.length,
                gather, scatter, how.runs, real)


class Layout(NamedTuple):
    """Which form a plan takes for one set of held targets (see :func:`layout`)."""

    form: str
    targets: slice  # the stack's targets the plan multiplies
    start: int = -1
    length: int = 0
    gather: list[list[int]] | None = None
    runs: tuple[tuple[int, int, int], ...] = ()


#: The gather form pads each target's rows to the longest; where its blocks would hold more
#: than this many times the real rows (more than one padded row per real one), a layer takes
#: two GEMMs per run of rows instead. On a CPU (embedded base, 1 thread) 25 rows on one pocket
#: book and 7 on seven others (blocks of 200 rows for 32) decoded a step in 154 ms by runs and
#: 180 ms gathered; the threshold between is a judgment, not measured (on a GPU, bound by calls
#: rather than arithmetic, more padding may pay).
MAX_GATHERED = 2


def layout(rows: Sequence[int], held: tuple[int, ...]) -> Layout | None:
    """How a layer whose stack holds the targets ``held`` adds the rows' deltas: ``views``
    when the targets rows use are adjacent in the stack and their rows even adjacent runs in
    stack order; else ``gather`` over the stack's slice from the first used target to the
    last (targets without rows, and short ones, padded with zero rows) when its blocks hold at
    most :data:`MAX_GATHERED` times the real rows; else ``runs``. None when no row uses any of
    them."""
    members = [[i for i, t in enumerate(rows) if t == target] for target in held]
    used = [k for k, m in enumerate(members) if m]
    if not used:
        return None
    span = slice(used[0], used[-1] + 1)
    length = max(len(members[k]) for k in used)
    first = members[used[0]][0]
    if len(used) == used[-1] + 1 - used[0] and all(
            members[k] == list(range(first + n * length, first + (n + 1) * length))
            for n, k in enumerate(used)):
        return Layout("views", span, first, length)
    real = sum(len(m) for m in members)
    if (used[-1] + 1 - used[0]) * length <= MAX_GATHERED * real:
        pad = len(rows)  # the zero line appended after the batch's rows
        return Layout("gather", span, length=length,
                      gather=[m + [pad] * (length - len(m)) for m in members[span]])
    index = {target: k for k, target in enumerate(held)}
    runs: list[tuple[int, int, int]] = []
    for i, target in enumerate(rows):
        k = index.get(target)
        if k is None:
            continue
        if runs and runs[-1][0] == k and runs[-1][2] == i:
            runs[-1] = (k, runs[-1][1], i + 1)
        else:
            runs.append((k, i, i + 1))
    return Layout("runs", slice(None), runs=tuple(runs))


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
    """Put every wrapped linear layer back: the base is as it was loaded (a session's
    :func:`adapterkit.lora.slots.unwrap_all`, for this module's wrapper)."""
    from adapterkit.lora import slots

    slots.unwrap_all(model, kinds=(RowLora,))
