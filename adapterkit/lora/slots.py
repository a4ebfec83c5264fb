"""LoRA slots: the resident LoRA layers a session swaps pocket books in and out of.

Why not PEFT's own adapter switching: on a loaded model, ``load_adapter`` re-wraps modules and
``set_adapter`` walks every module on each switch (tens of milliseconds for SmolLM2-135M). Here
each targeted linear layer is wrapped once in a :class:`LoraSlot`, and every attached pocket
book is kept as ready-made tensors, one pair per slot, in a prepared list. A swap is then only
a walk over that list rebinding two tensors per layer — no copies, no module surgery — so its
cost does not depend on how many pocket books are attached.

The math is PEFT's: ``y = base(x) + (x Aᵀ) Bᵀ · scale`` (factors and scales read by
:mod:`adapterkit.lora.factors`). Tensors are padded with zeros to one
rank per session (the largest attached), so shapes never change between swaps: under
``torch.compile`` a swap is a change of input data, not of graph (as PEFT's hotswap does).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from adapterkit.errors import ConfigError


class LoraSlot(nn.Module):
    """A linear layer plus whichever pocket book's LoRA factors are bound to it right now."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.rank = 0
        self.register_buffer("lora_A", torch.zeros(0, in_features, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_B", torch.zeros(out_features, 0, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("scale", torch.zeros((), dtype=dtype, device=device),
                             persistent=False)
        self.zeros: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        #: False while the zeros are bound: the LoRA matmuls are skipped, not run on zeros.
        self.active = False

    def pad_to(self, rank: int) -> None:
        """Allocate the shared all-zero factors used when no pocket book touches this layer."""
        current: torch.Tensor = self.lora_A  # type: ignore[assignment]  # a registered buffer
        dtype, device = current.dtype, current.device
        self.rank = rank
        self.zeros = (torch.zeros(rank, self.in_features, dtype=dtype, device=device),
                      torch.zeros(self.out_features, rank, dtype=dtype, device=device),
                      torch.zeros((), dtype=dtype, device=device))
        self.bind(*self.zeros)

    def bind(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> None:
        # Straight into the buffer dict: ~20x cheaper than setattr, and the module keeps the
        # same buffers (names, shapes, dtypes) so compiled graphs stay valid.
        buffers = self._buffers
        buffers["lora_A"] = a
        buffers["lora_B"] = b
        buffers["scale"] = scale
        self.__dict__["active"] = self.zeros is None or a is not self.zeros[0]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        # No pocket book on this layer (or the session is off): skip the matmuls. Under
        # torch.compile the zeros are multiplied instead, so a swap never changes the graph.
        if not torch.compiler.is_compiling() and not self.active:
            return result
        a: torch.Tensor = self.lora_A  # type: ignore[assignment]  # registered buffers
        b: torch.Tensor = self.lora_B  # type: ignore[assignment]
        scale: torch.Tensor = self.scale  # type: ignore[assignment]
        lora = (x.to(a.dtype) @ a.t()) @ b.t()
        return result + (lora * scale).to(result.dtype)


def wrap(model: nn.Module, path: str) -> LoraSlot:
    """Replace the linear layer at ``path`` by a :class:`LoraSlot` around it (idempotent)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layer = getattr(parent, child)
    if isinstance(layer, LoraSlot):
        return layer
    in_f = getattr(layer, "in_features", None)
    out_f = getattr(layer, "out_features", None)
    if in_f is None or out_f is None:
        raise TypeError(f"{path} is a {type(layer).__name__}, not a linear layer")
    dtype = _compute_dtype(model, layer)
    device = next(layer.parameters()).device
    slot = LoraSlot(layer, in_f, out_f, dtype, device)
    setattr(parent, child, slot)
    return slot


def unwrap_all(model: nn.Module, kinds: tuple[type[nn.Module], ...] = (LoraSlot,)) -> None:
    """Put every linear layer wrapped in one of ``kinds`` back (the base is as it was loaded)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, kinds):
            parent_path, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, module.base_layer)


# -- who holds a resident base ----------------------------------------------------------------
# A resident base is shared by reference: a session's slots, a serving engine's row layers and
# a PEFT model (``peft_model``, ``train()``'s ``result.model``) all change its layers in place.
# A second user would compute with the first one's LoRA on top, or take it away on closing,
# and nothing would say so.

#: model → what holds its layers (weakly: a holder dropped without closing frees it), how a
#: refusal names it ("a session is open on this base") and the call that frees it.
_HOLDERS: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ReferenceType[Any], str, str]] = \
    weakref.WeakKeyDictionary()
#: model → who put the PEFT LoRA layers on it, and how to take them off (for messages only).
_WRAPPED_BY: weakref.WeakKeyDictionary[nn.Module, tuple[str, str]] = \
    weakref.WeakKeyDictionary()
#: The module types holders wrap linear layers in (each keeps the layer as ``base_layer``):
#: what is left of a holder dropped without closing, taken off by the base's next user. The
#: server's ``RowLora`` is added by its engine's claim (this package may not import serving).
_WRAPPERS: set[type[nn.Module]] = {LoraSlot}


def claim(model: nn.Module, holder: Any, *, wanted: str, held: str, free: str,
          wrapper: type[nn.Module] = LoraSlot) -> None:
    """Make ``holder`` (a session, a serving engine: anything with ``describe()``) the one user
    of ``model``'s layers, refused if another holds them. ``held`` and ``free`` are how a later
    refusal names it and the call that frees the base; ``wrapper`` the module type it wraps
    layers in, taken off if it is dropped without ``free``."""
    refuse_held(model, wanted=wanted)
    _WRAPPERS.add(wrapper)
    _HOLDERS[model] = (weakref.ref(holder), held, free)


def release(model: nn.Module, holder: Any) -> None:
    """``holder`` has taken its layers off: the base is free again."""
    record = _HOLDERS.get(model)
    if record is not None and record[0]() is holder:
        del _HOLDERS[model]


def wrapped_by(model: nn.Module, holder: str, give_back: str) -> None:
    """Record who put PEFT LoRA layers on ``model`` and the call that takes them off, so a
    refusal can name both."""
    _WRAPPED_BY[model] = (holder, give_back)


def refuse_held(model: nn.Module, *, wanted: str) -> None:
    """Refuse ``wanted`` on a base whose layers a session, a serving engine or a PEFT model
    still holds, and take off what nobody holds any more (the slots of a session or the row
    layers of an engine dropped without closing, the frozen underlay a training run left under
    a result that was unloaded): all are exact to remove, and left on they would silently add
    their LoRA to every answer. "Load the base again" is offered too: a holder kept alive by,
    say, a stored traceback cannot be closed by a user who dropped it."""
    record = _HOLDERS.get(model)
    holder = record[0]() if record is not None else None
    if record is not None and holder is not None:
        _, held, free = record
        raise ConfigError(f"{held} ({holder.describe()}); close it ({free}) before {wanted}, "
                          "or load the base again")
    _HOLDERS.pop(model, None)  # (a holder dropped without closing: its layers go below)
    adapters = _peft_adapters(model)
    if adapters:
        by, how = _WRAPPED_BY.get(model, ("a PEFT model", "its .unload()"))
        raise ConfigError(f"this base still carries the PEFT LoRA layers of {by} (adapter "
                          f"{', '.join(adapters)}); call {how} before {wanted}, or load the "
                          "base again")
    clear_leftovers(model)


def clear_leftovers(model: nn.Module) -> None:
    """Take off what no session, engine or PEFT model holds any more (call only when none
    does)."""
    _WRAPPED_BY.pop(model, None)
    unwrap_all(model, kinds=tuple(_WRAPPERS))
    from adapterkit.lora.underlay import remove

    remove(model)


def _peft_adapters(model: nn.Module) -> list[str]:
    """The names of the PEFT adapters whose layers sit in ``model`` (none: PEFT never ran)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sorted({name for module in model.modules() if isinstance(module, BaseTunerLayer)
                   for name in module.active_adapters})


def _compute_dtype(model: nn.Module, layer: nn.Module) -> torch.dtype:
    weight = getattr(layer, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    # a quantized (bitsandbytes) layer: LoRA runs in its compute dtype
    compute: Any = getattr(layer, "compute_dtype", None) or getattr(model, "dtype", None)
    return compute or torch.float32
