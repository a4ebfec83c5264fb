"""Training precision: bfloat16 where the hardware computes it fast, float32 elsewhere.

``--precision auto`` (the default) trains in bfloat16 on a GPU that supports it (as before) and
on a CPU with bfloat16 instructions (AVX512-BF16 or AMX): the frozen base's weights are held in
bfloat16, the pocket book's weights and the optimizer stay float32, and transformers' Trainer
runs each step under ``torch.autocast`` (``bf16=True``). On the embedded base and this
project's 2-core AMX CPU that alone made the training loop 1.24x the tokens/s of the float32
TRL loop; on a 2-core AMD EPYC with AVX512-BF16, with the CPU dropout of
:mod:`adapterkit.training.dropout`, LoRA inputs left in bfloat16 under autocast
(``dropout._CastOutsideAutocast``), the kept freed memory of :mod:`adapterkit.runtime.allocator`
and the LM head on labelled positions only (:mod:`adapterkit.training.labelled_positions`, any
CPU precision), the whole command runs at 2.65x the plain script's speed
(``benchmarks/bench_train_wall.py``, README). Elsewhere, and with ``--precision fp32``, the
precision is as before.

One piece is our own: on a CPU, attention runs in float32. PyTorch's CPU flash-attention
kernel is several times slower backwards in bfloat16 than in float32 (torch.profiler on one
step of SmolLM2-135M, batch 8 x 76 tokens: 350 ms against 70 ms), so the function registered
here (through
transformers' ``AttentionInterface``, with sdpa's own mask) casts query, key and value up and
the result back; everything else is transformers' ``sdpa`` path unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapterkit.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
#: Where a run's work folder records the precision its checkpoints were trained in.
PRECISION_FILE = "precision.json"
#: The attention implementation name registered with transformers (CPU, bfloat16 weights).
FP32_ATTENTION = "adapterkit_sdpa_fp32"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls in hardware (AVX512-BF16 or AMX)."""
    import torch

    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def training_dtype(precision: str, device: str, quantization: str | None = None) -> Any:
    """The dtype the frozen base is held (or, 4-bit/8-bit, computes) in for training.

    ``auto`` on a CPU keeps float32 for a quantized base: bitsandbytes' CPU 4-bit path is
    measured and tested in float32 only.
    """
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    cuda = device.startswith("cuda")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError("--precision bf16: this GPU does not support bfloat16; use "
                              "--precision fp32 (or auto)")
        return torch.bfloat16
    if cuda:  # auto, as adapterkit always did on a GPU
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() and quantization is None else torch.float32


def check_resume(workdir: Any, name: str, *, resuming: bool, main: bool = True,
                 default: str = "fp32") -> None:
    """Refuse to resume checkpoints trained in another precision (the run would be neither);
    record this run's precision for a later ``--resume`` (main process only).

    :param default: what checkpoints without a record were trained in (runs before
        ``--precision`` existed: float32 on a CPU, bf16 on a GPU).
    """
    import json
    from pathlib import Path

    path = Path(workdir) / PRECISION_FILE
    if resuming:
        try:
            recorded = json.loads(path.read_text(encoding="utf-8")).get("precision")
        except FileNotFoundError:
            recorded = default
        except (OSError, ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, str) and recorded != name:
            raise ConfigError(f"the interrupted run trained in {recorded} and this one would "
                              f"train in {name}; resume with --precision {recorded}, or start "
                              "over with --restart")
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"precision": name}), encoding="utf-8")


def name_of(dtype: Any) -> str:
    """``bf16``, ``fp16`` or ``fp32``: how a run's precision is recorded."""
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(dtype), "fp32")


def prepare(model: Any) -> Any:
    """Make a PEFT model on a bfloat16 base train well: trainable weights in float32 (the
    optimizer's updates would round away in bfloat16), and on a CPU attention in float32."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    device = next(model.parameters()).device
    if device.type == "cpu":
        fp32_attention(model)
    return model


def fp32_attention(model: Any) -> None:
    """Switch ``model`` to the float32 attention function (see the module docstring), when
    it uses transformers' sdpa attention; other implementations are left as they are."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current not in ("sdpa", FP32_ATTENTION):
        return
    _register()
    from adapterkit.training.metrics import _base_of

    _base_of(model).set_attn_implementation(FP32_ATTENTION)


def _register() -> None:
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if FP32_ATTENTION in AttentionInterface._global_mapping:
        return

    def sdpa_fp32(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                  **kwargs: Any) -> tuple[Any, Any]:
        dtype = query.dtype
        if dtype == torch.float32:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                  for k, v in kwargs.items()}  # e.g. a position bias, added to the scores
        with torch.autocast(query.device.type, enabled=False):
            out, weights = sdpa_attention_forward(
                module, query.float(), key.float(), value.float(),
                attention_mask if attention_mask is None or attention_mask.dtype == torch.bool
                else attention_mask.float(), **kwargs)
        return out.to(dtype), weights

    AttentionInterface.register(FP32_ATTENTION, sdpa_fp32)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)


def hold(base: Any, dtype: Any) -> None:
    """Hold a full-precision resident base in ``dtype`` for a run's steps, when it can be given
    back exactly afterwards (:func:`restore_exact`): widened (float16 or bfloat16 → float32),
    or rounded from float32 weights that equal its safetensors files. Otherwise it is left as
    it is, and the run computes in the dtype it has. (A quantized base computes in the dtype it
    was loaded with: :func:`adapterkit.training.build.load_for_method` refuses another.)"""
    import torch

    if base.quantization is not None or base.model.dtype == dtype:
        if base.quantization is None:
            base.dtype = dtype
        return
    if base.rounded_from is not None and base.rounded_from == dtype:  # back where it was
        if not restore_exact(base):
            raise ConfigError(f"the resident base {base.name} holds {name_of(base.model.dtype)} "
                              f"weights and its exact {name_of(dtype)} ones cannot be read back "
                              "(no safetensors files by those names); load it again, or train "
                              "this stage on its own")
        return
    if base.rounded_from is None:
        widening = dtype == torch.float32
        if not widening and not (base.model.dtype == torch.float32 and restorable(base)):
            return  # it could not be given back exactly: left as it is
        base.rounded_from = base.model.dtype
    _cast_parameters(base.model, dtype)
    base.dtype = dtype


def restorable(base: Any) -> bool:
    """Whether :func:`restore_exact` can give ``base`` back exactly: every frozen weight is in
    its safetensors files under its name, with the value the resident base holds (a caller may
    have changed weights in memory, which a reload would undo)."""
    import torch

    files = _weight_files(base)
    own = dict(_own(base.model))
    found: set[str] = set()
    for key, param, tensor in _from_files(files, own):
        if not torch.equal(tensor, param.detach().float()):
            return False
        found.add(key)
    return bool(files) and found == set(own)


def _weight_files(base: Any) -> list[Path]:
    return sorted(base.source.folder.glob("*.safetensors"))


def _from_files(files: list[Path], own: dict[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    """``(name, parameter, its float32 value in the safetensors ``files``)`` for each of
    ``own`` the files hold, on the parameter's device."""
    import torch
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                param = own.get(key)
                if param is not None:
                    yield key, param, fh.get_tensor(key).to(param.device, torch.float32)


def _own(model: Any) -> list[tuple[str, Any]]:
    """The base's own floating-point weights, named as its files name them (PEFT's wrappers
    and every adapter's weights left out)."""
    return [(n.replace(".base_layer.", ".").replace(".original_module.", "."), p)
            for n, p in model.named_parameters()
            if not p.requires_grad and p.is_floating_point() and "lora_" not in n
            and "modules_to_save" not in n]


def _cast_parameters(model: Any, dtype: Any) -> None:
    """Cast the floating-point parameters only: buffers such as rotary ``inv_freq`` stay in
    float32, as ``from_pretrained(dtype=torch.bfloat16)`` keeps them (``model.to(dtype)`` would
    round them, and casting back would not undo it)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def restore_exact(base: Any) -> bool:
    """Give a base held by :func:`hold` (or loaded in bfloat16 for training on a CPU) its
    weights back as inference loads them, so that a run's figures (held-out loss, forgetting)
    and the model it returns are what the pocket book gives on that base, not on a rounded copy.

    From bfloat16 back to float32 the weights are read again from the base's safetensors files
    (rounding cannot be undone); PEFT's wrapped layers (``...q_proj.base_layer.weight``,
    ``...original_module.weight``) get theirs by name, trainable parameters are left alone.
    Any other way back (a widening cast undone) is exact. Returns whether the weights are back;
    if they cannot be read, the base stays as it is and the run records its figures as
    measured in that dtype.
    """
    import torch

    model, original = base.model, base.rounded_from
    current = base.dtype if base.dtype is not None else model.dtype
    if original is None or base.quantization is not None or current == original:
        base.rounded_from = None
        return original is not None and current == original
    frozen = _own(model)
    if not (original == torch.float32 and current == torch.bfloat16):
        for _, param in frozen:  # bfloat16 or float16 widened for the run: exact both ways
            param.data = param.data.to(original)
        sdpa_again(model)
        base.rounded_from, base.dtype = None, original
        return True
    files = _weight_files(base)
    if not files:
        return False
    own = dict(frozen)
    exact = {id(param): tensor for _, param, tensor in _from_files(files, own)}
    if any(id(p) not in exact for p in own.values()):  # e.g. weights renamed on loading
        return False
    with torch.no_grad():
        for param in own.values():
            param.data = exact[id(param)]
    sdpa_again(model)
    base.rounded_from, base.dtype = None, torch.float32
    return True


def sdpa_again(model: Any) -> None:
    """Undo :func:`fp32_attention` (it only ever replaces ``sdpa``)."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == FP32_ATTENTION:
        model.set_attn_implementation("sdpa")
