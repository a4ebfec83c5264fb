"""The frozen base: loading it (full precision, 4-bit NF4 or 8-bit) and describing its structure.

Everything that needs torch in the base's life is here, and imports it lazily, so that the
modules the fast CLI commands use never pull it in.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.base.fingerprints import fingerprint, read_safetensors_header, weight_files
from adapterkit.base.resolve import (
    BaseSource,
    Progress,
    canonical_spec,
    remember_base,
    resolve_base,
)
from adapterkit.errors import BaseLoadError, ConfigError, MissingDependency, TargetModuleError

QUANTIZATIONS = ("4bit", "8bit")


@dataclass
class BaseStructure:
    """What a base looks like, read from its config on torch's meta device (no weights loaded)."""

    architecture: str
    model_type: str
    parameters: int
    dtype: str
    vocab_size: int
    #: Full module path → ``(in_features, out_features)`` of every ``nn.Linear``.
    linear: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Full module path → ``(num_embeddings, embedding_dim)`` of every ``nn.Embedding``.
    embedding: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Parameter name → shape, for checking saved full modules (``modules_to_save``).
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: The output layer's module path (not a LoRA target in ``all-linear``).
    output_layer: str | None = None

    def target_names(self) -> list[str]:
        """Linear layer names a LoRA can target (``q_proj``, ...), the output layer excluded."""
        return sorted({p.rsplit(".", 1)[-1] for p in self.linear if p != self.output_layer})


def inspect_structure(folder: Path) -> BaseStructure:
    """Build the model from its config on the meta device and record its layers and shapes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise BaseLoadError(f"cannot build a causal LM from {folder}: {type(exc).__name__}: {exc}") from None
    dtypes: Counter[str] = Counter()
    for path in weight_files(folder):
        header, _ = read_safetensors_header(path)
        dtypes.update(v["dtype"] for k, v in header.items() if k != "__metadata__")
    output = model.get_output_embeddings()
    structure = BaseStructure(
        architecture=type(model).__name__,
        model_type=str(config.model_type),
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=dtypes.most_common(1)[0][0] if dtypes else "unknown",
        vocab_size=int(getattr(config, "vocab_size", 0) or 0),
        params={n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)},
    )
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            structure.linear[name] = (module.in_features, module.out_features)
            if module is output:
                structure.output_layer = name
        elif isinstance(module, torch.nn.Embedding):
            structure.embedding[name] = (module.num_embeddings, module.embedding_dim)
        elif type(module).__name__ == "Conv1D":  # GPT-2's linear layers, weight stored (in, out)
            structure.linear[name] = (int(module.weight.shape[0]), int(module.nf))
    return structure


def check_targets(structure: BaseStructure, targets: str | list[str]) -> str | list[str]:
    """Validate LoRA target modules against the base; return them normalised.

    ``all-linear`` (PEFT's own shorthand) is always valid when the base has linear layers.
    Otherwise every name must match at least one linear layer, so a typo never silently trains
    nothing.
    """
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not structure.target_names():
        raise TargetModuleError("this base has no linear layers a LoRA could target")
    if targets in (["all-linear"], []):
        return "all-linear"
    known = structure.target_names()
    unknown = [t for t in targets if not any(p == t or p.endswith("." + t) for p in structure.linear)]
    if unknown:
        raise TargetModuleError(
            f"target module(s) {', '.join(unknown)} match no linear layer of this base; "
            f"it has: {', '.join(known)} (or use all-linear)"
        )
    return list(targets)


def targeted_layers(structure: BaseStructure, targets: str | list[str]) -> list[str]:
    """The linear layers a LoRA with ``targets`` (as :func:`check_targets` returns them) sits
    on: every one but the output layer for ``all-linear``, else those named by their last
    part(s)."""
    if targets == "all-linear":
        return [p for p in structure.linear if p != structure.output_layer]
    return [p for p in structure.linear if any(p == t or p.endswith("." + t) for t in targets)]


def check_rank(structure: BaseStructure, targets: str | list[str], rank: int) -> None:
    """Refuse a LoRA rank above what the smallest targeted layer can hold.

    A rank-``r`` update of a layer with ``in`` inputs and ``out`` outputs cannot have a rank
    above ``min(in, out)``: a larger ``r`` only adds memory (and a file to match), never
    expressiveness. Checked from the structure, before a LoRA is built.
    """
    layers = targeted_layers(structure, targets)
    if not layers:
        return
    layer = min(sorted(layers), key=lambda p: min(structure.linear[p]))
    fan_in, fan_out = structure.linear[layer]
    limit = min(fan_in, fan_out)
    if rank > limit:
        raise ConfigError(
            f"LoRA rank {rank} is above what layer {layer} ({fan_in} → {fan_out} features) can "
            f"use: at most {limit}. Use --rank {limit} or less"
            + ("" if targets == "all-linear" else ", or target larger layers")
        )


@dataclass
class Base:
    """A frozen base model, resident in memory, with its identity."""

    source: BaseSource
    fingerprint: str
    model: Any
    tokenizer: Any
    quantization: str | None = None
    #: The dtype the base computes in (a quantized base: its compute dtype), as loaded or as
    #: a training run holds it (adapterkit.training.precision).
    dtype: Any = None
    #: Set while a training run holds the resident weights in another dtype: the dtype to give
    #: them back in (float32 from bfloat16: read again from the base's files).
    rounded_from: Any = None

    @property
    def name(self) -> str:
        return self.source.name

    def identity(self) -> dict[str, Any]:
        """What a pocket book records about the base it was made on."""
        return {"name": self.name, "fingerprint": self.fingerprint,
                "provenance": dict(self.source.provenance)}

    def structure(self) -> BaseStructure:
        return inspect_structure(self.source.folder)


def default_dtype(device: str | None = None) -> Any:
    """float32 on CPU (fast and exact there), bfloat16 on a GPU that supports it."""
    import torch

    if (device or "").startswith("cuda") or (device is None and torch.cuda.is_available()):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(quantization: str, compute_dtype: Any, *, for_fsdp: bool = False) -> Any:
    """The bitsandbytes config for ``4bit`` (NF4, double quantization) or ``8bit``.

    ``for_fsdp``: keep the packed 4-bit weights in tensors of the compute dtype
    (``bnb_4bit_quant_storage``), which FSDP needs to shard them with the rest, as the PEFT
    and TRL QLoRA + FSDP guides set it.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingDependency(
            f"{quantization} bases need bitsandbytes: pip install 'adapterkit[quant]' "
            "(or pip install bitsandbytes)"
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            **({"bnb_4bit_quant_storage": compute_dtype} if for_fsdp else {}),
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"unknown quantization {quantization!r}; use one of {QUANTIZATIONS}")


def load_base(spec: str, *, quantization: str | None = None, dtype: Any = None,
              device: str | None = None, home: str | os.PathLike[str] | None = None,
              progress: Progress | None = None, for_fsdp: bool = False) -> Base:
    """Load a frozen base: no parameter requires grad, eval mode.

    :param spec: Hub id, local folder, ``.gguf`` file or alias (``smollm2-135m``).
    :param quantization: ``None``, ``"4bit"`` (NF4 + double quantization) or ``"8bit"``.
    :param dtype: weights/compute dtype (default: float32 on CPU, bfloat16 on GPU).
    :param device: ``"cpu"``, ``"cuda"``... (default: CUDA when available).
    :param for_fsdp: a 4-bit base that FSDP will shard (see :func:`quantization_config`).

    A 4-bit base is left as one fixed base on every path: taking a state dict of it (PEFT
    does when it wraps it) never changes its weights (see :func:`_state_dicts_read_only`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r}; use one of "
                          f"{', '.join(QUANTIZATIONS)} (or None)")
    _check_device(device)
    source = resolve_base(spec, home, progress=progress)
    fp = fingerprint(source.folder)
    remember_base(home, fp, canonical_spec(spec, source))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization:
        kwargs["quantization_config"] = quantization_config(quantization, dtype,
                                                            for_fsdp=for_fsdp)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.folder)
    except MissingDependency:
        raise
    except Exception as exc:
        raise BaseLoadError(f"cannot load base {spec!r}: {type(exc).__name__}: {exc}") from None
    if not quantization:
        model.to(device)  # type: ignore[arg-type]
    else:
        _own_memory(model)
        _state_dicts_read_only(model)
    model.requires_grad_(False)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Base(source=source, fingerprint=fp, model=model, tokenizer=tokenizer,
                quantization=quantization, dtype=dtype)


def keep_4bit_layout(model: Any) -> None:
    """Keep 4-bit weights in the one layout they were quantized to (training does this).

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight in place the first
    time it runs in eval mode without gradients, and unpacks it when a state dict is taken; both
    conversions round (measured on a tiny base: logits move by 0.05 when packed, and by 0.03
    for good after one round trip). A QLoRA run evaluates (reference log-probs, the forgetting
    guard) between training steps and saves checkpoints, so the base would drift under the
    pocket book being trained. Inference-only loads keep bitsandbytes' repacking: it makes CPU
    4-bit generation 1.7x faster on SmolLM2-135M.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def relaid_for_inference(model: Any) -> bool:
    """Whether a 4-bit layer of ``model`` holds the layout bitsandbytes makes for inference on
    a CPU with AVX512-BF16 (its first forward without gradients does): scales rounded to bf16,
    so not the base a fresh load gives, which :func:`keep_4bit_layout` keeps for training."""
    return any(getattr(getattr(getattr(m, "weight", None), "quant_state", None),
                       "packing_format_for_cpu", False)
               for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu"))


def _check_device(device: str | None) -> None:
    """Refuse a device torch does not know, or CUDA where there is none, before any loading."""
    import torch

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device; use 'cpu' or 'cuda' "
                          "(or 'cuda:N')") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this machine has no CUDA GPU torch can use; "
                          "use 'cpu'")


def _state_dicts_read_only(model: Any) -> None:
    """Make taking a state dict of a 4-bit layer leave the layer as it was.

    On CPUs with AVX512-BF16, bitsandbytes re-lays a ``Linear4bit`` weight out for a faster
    kernel the first time it runs without gradients (plain transformers + PEFT do the same on
    such a CPU, so the base still answers as theirs does), and a state dict undoes that in
    place by quantizing the scales again: every later answer moves (0.05 logits on a tiny
    base, 0.9 on SmolLM2-135M), silently. PEFT takes one whenever it wraps the base, so a
    ``peft_model`` after a first forward no longer computed on the base it was given. Here the
    layer's own tensors are put back once its state dict is written (the dict gets the undone
    copy, as before). :func:`keep_4bit_layout` (training) avoids the new layout altogether.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.register_state_dict_pre_hook(_remember_4bit_layout)
            module.register_state_dict_post_hook(_restore_4bit_layout)


def _remember_4bit_layout(module: Any, prefix: str, keep_vars: bool) -> None:
    if keep_vars:  # the dict holds the live Parameter: putting the layout back would change
        return     # the dict's weight under its quantization entries (nobody asks so today)
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        module._adapterkit_layout = (module.weight.data, state, dict(vars(state)))


def _restore_4bit_layout(module: Any, state_dict: Any, prefix: str, metadata: Any) -> None:
    saved = module.__dict__.pop("_adapterkit_layout", None)
    if saved is not None:  # bitsandbytes changed the state object in place: its fields back
        data, state, fields = saved
        vars(state).clear()
        vars(state).update(fields)
        module.weight.data = data
        module.weight.quant_state = state
        module.quant_state = state


def _own_memory(model: Any) -> None:
    """Copy the tensors that are still views of the memory-mapped weights file into memory.

    A quantized load keeps the norms and embeddings as views of the float32 file; that pins
    the whole mapping, so every page the quantizer read stays resident (for SmolLM2-135M,
    ~420 MB on top of a 160 MB model). Copying the few unquantized tensors lets it go.
    """
    from adapterkit.memory import release_memory

    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type == "cpu" and tensor.is_floating_point():
            tensor.data = tensor.data.clone()
    release_memory()


def describe_base(spec: str, home: str | os.PathLike[str] | None = None, *,
                  progress: Progress | None = None) -> dict[str, Any]:
    """What ``adapterkit base show`` prints: structure, fingerprint and provenance."""
    source = resolve_base(spec, home, progress=progress)
    structure = inspect_structure(source.folder)
    fp = fingerprint(source.folder)
    remember_base(home, fp, canonical_spec(spec, source))
    return {
        "name": source.name,
        "architecture": structure.architecture,
        "model_type": structure.model_type,
        "parameters": structure.parameters,
        "dtype": structure.dtype,
        "vocab_size": structure.vocab_size,
        "lora_targets": structure.target_names(),
        "output_layer": structure.output_layer,
        "fingerprint": fp,
        "provenance": source.provenance,
        "folder": str(source.folder),
    }
