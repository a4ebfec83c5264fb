"""LoRA dropout on a CPU at a fraction of PyTorch's cost, with the same distribution.

PEFT applies ``nn.Dropout`` to the input of every LoRA layer (``lora_dropout``, 0.05 by
default). On a CPU, PyTorch computes it as a float tensor of Bernoulli draws (``bernoulli_``,
one Mersenne-Twister draw and a float conversion per element), multiplies by it, and keeps that
float tensor for the backward pass. On the embedded base (LoRA on all 7 linear layers of 30
blocks, a batch of 8 x 76 tokens) ``bernoulli_`` alone took 16% of a training step under
``torch.profiler``, and the kept masks are 4 bytes per input element at every LoRA layer.

This module draws the same mask from a quarter of the random numbers: each 64-bit draw gives
four 16-bit uniform integers, and an element is dropped when its integer falls below
``round(p * 65536)``. The drop probability is therefore ``p`` to within 1/131072
(``effective_p``) and the kept elements are scaled by ``1 / (1 - effective_p)``, so the
expectation is the input's, as with ``nn.Dropout``. The mask is kept for backward as booleans
(1 byte per element). A drop-in for ``nn.Dropout`` (a subclass), used only where PyTorch's is
slow: the CPU, in the bfloat16 training path (``--precision fp32`` keeps PyTorch's dropout, and
with it the plain PEFT script's random stream, so that path trains exactly what the plain
script trains). Seeded by ``torch.manual_seed`` like any CPU draw, so a run is reproducible and
a resume restores the stream with transformers' saved RNG state. One difference: a dropped
NaN or inf becomes 0 here (``nn.Dropout`` multiplies it by 0: NaN).

With it, a LoRA layer also takes its bfloat16 input as it is under autocast
(:class:`_CastOutsideAutocast`): PEFT would cast it up to float32 for dropout and ``lora_A``,
and autocast would cast it straight back down for the matmul.
"""

from __future__ import annotations

from typing import Any

import torch

#: Each mask element is a 16-bit uniform integer: the drop probability's resolution.
LEVELS = 1 << 16


def effective_p(p: float) -> float:
    """The drop probability the mask realises for ``p`` (``p`` rounded to 1/65536)."""
    return round(p * LEVELS) / LEVELS


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """Booleans, True with probability ``1 - effective_p(p)``, independent per element."""
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability {p} is not between 0 and 1")
    dropped = round(p * LEVELS)  # of the LEVELS values a lane takes, this many drop
    if dropped >= LEVELS:  # past the int16 range below: nothing is kept
        return torch.zeros(shape, dtype=torch.bool)
    count = 1
    for size in shape:
        count *= size
    # full 64-bit range: a plain random_() on int64 leaves the top bit 0 (values < 2**63),
    # which would bias the fourth 16-bit lane
    bits = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    lanes = bits.view(torch.int16)[:count]
    return (lanes >= dropped - LEVELS // 2).view(shape)


class _Masked(torch.autograd.Function):
    """``x`` where ``keep``, else 0, times ``scale``; backward the same on the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None, None


class CpuDropout(torch.nn.Dropout):
    """``nn.Dropout(p)`` with the mask of :func:`keep_mask` (see the module docstring); always
    out of place (LoRA's input is the hidden state the base layer reads too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, True)
        kept = 1.0 - effective_p(self.p)
        if kept <= 0:
            return x * 0.0
        return _Masked.apply(x, keep_mask(x.shape, self.p), 1.0 / kept)


class _CastOutsideAutocast:
    """A LoRA layer's ``cast_input_dtype_enabled`` that is true only outside CPU autocast.

    PEFT casts a LoRA layer's input to its factors' dtype (here: the bfloat16 hidden states up
    to float32) before dropout and ``lora_A``; under autocast ``lora_A`` casts it straight back
    down to bfloat16 for the matmul. A bfloat16 value is exact in float32, and
    :class:`CpuDropout`'s scaling rounds the same way in either dtype (PyTorch's dropout does
    not: its bfloat16 mask is scaled by a rounded 1/(1-p)), so skipping the round trip gives the
    same bits with two copies of every LoRA input fewer per step (``tests/test_dropout.py``
    compares them). Outside autocast (a forward a caller runs on the held base) PEFT's cast
    stays, as it is needed there.
    """

    def __bool__(self) -> bool:
        return not torch.is_autocast_enabled("cpu")


def use_cpu_dropout(model: torch.nn.Module) -> int:
    """Replace every LoRA layer's ``nn.Dropout`` in ``model`` by :class:`CpuDropout`, and let
    the plain LoRA layers whose dropouts are all :class:`CpuDropout` (or none) take their input
    uncast under autocast (:class:`_CastOutsideAutocast`); the number of dropouts replaced."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for key, dropout in list(dropouts.items()):
            if type(dropout) is torch.nn.Dropout:  # p=0 too: ours returns x as PyTorch's does
                dropouts[key] = CpuDropout(dropout.p).train(dropout.training)
                replaced += 1
        exact = all(isinstance(d, (CpuDropout, torch.nn.Identity)) for d in dropouts.values())
        # a variant (DoRA...) computes in its factors' dtype: it keeps PEFT's cast
        if exact and hasattr(module, "lora_A") and not getattr(module, "lora_variant", None):
            module.cast_input_dtype_enabled = _CastOutsideAutocast()  # type: ignore[assignment]
    return replaced
