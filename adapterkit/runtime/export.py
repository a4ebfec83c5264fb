"""``export --merged``: a standalone model with a pocket book (or stack) folded into the base.

Where PEFT, axolotl and LLaMA-Factory users get hurt — and what is done instead:

* **4-bit bases.** Folding a QLoRA delta back into NF4 weights re-quantizes it and garbles the
  model. Here the NF4 weights the pocket book was trained against are dequantized to the compute
  dtype and the delta is added there; the result is a full-precision model (we say so).
* **Memory.** The merged weights are written tensor by tensor into safetensors shards, reading the
  base from its files (memory-mapped) — never a second full copy of the base in memory.
* **Silent damage.** Before the folder appears, the merged model's logits are compared with
  plain PEFT's on the unmerged pocket book (loaded by ``PeftModel.from_pretrained``, not by our
  own factor reading, so a bug in our LoRA math cannot certify itself) on a few prompts;
  beyond the tolerance the export is refused, with the figure, and nothing is left behind.
  What our factor path cannot fold exactly (DoRA, ``modules_to_save``...) is refused up front,
  naming the feature.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.base.fingerprints import weight_files
from adapterkit.errors import AdapterkitError, ConfigError
from adapterkit.files import check_new_folder, new_folder
from adapterkit.memory import release_memory

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.library.store import Library

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "I have had a headache for three days and", "Once upon a time"]
#: Shards are flushed at this size: the writer never holds more than one shard in memory.
SHARD_BYTES = 256 * 2**20


class MergeCheckFailed(AdapterkitError):
    """The merged model does not reproduce the unmerged session closely enough."""


@dataclass
class ExportReport:
    dest: Path
    max_logit_diff: float
    dequantized_from: str | None
    shards: int


def check_tolerance(tolerance: Any) -> None:
    """Refuse a tolerance that cannot bound a logit difference (NaN, negative, infinite):
    with NaN every comparison fails and a pocket book is recorded as drifting."""
    import math

    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) \
            or not math.isfinite(tolerance) or tolerance < 0:
        raise ConfigError(f"--tolerance must be a finite number ≥ 0 (the largest logit "
                          f"difference accepted), got {tolerance!r}")


def export_merged(library: Library, ref: str, dest: str | os.PathLike[str], *,
                  tolerance: float = 1e-2, plugins: Any = None,
                  progress: Callable[[str], None] | None = None) -> ExportReport:
    """Write ``ref`` folded into its base as a transformers model folder at ``dest``."""
    import torch

    from adapterkit.base.load import load_base
    from adapterkit.base.resolve import base_spec_for
    from adapterkit.library.integrity import check_book, recorded_structure
    from adapterkit.lora.combine import stored_base
    from adapterkit.plugin_api.manager import default_plugin_manager
    from adapterkit.runtime.peft_model import members_of, peft_model, quantization_of

    check_tolerance(tolerance)
    say = progress or (lambda m: None)
    library.check_export_dest(dest)
    dest = Path(dest)
    check_new_folder(dest)  # fail before the work
    book = library.get(ref)
    members = members_of(library, book)  # underlays at weight 1, a stack's members weighted
    structure = recorded_structure(book, library.home)
    for member, _ in members:  # a damaged folder is refused before anything is read or loaded
        check_book(member, structure)
    # refuses what a plain ΔW cannot express, before any loading
    deltas = merged_deltas(members, base_weights=stored_base(library, book))
    pm = plugins or default_plugin_manager()
    quant = quantization_of([item for item, _ in members], pm)
    spec = base_spec_for(book.meta.base, library.home)
    say(f"Loading base {spec}" + (f" ({quant}, as the pocket book was trained)" if quant else "")
        + "...")
    base = load_base(spec, quantization=quant, home=library.home, dtype=torch.float32)
    check_foldable(base.model, deltas)
    _training_numerics(base.model)
    release_memory()  # quantizing on load leaves freed float32 staging memory behind
    tok = base.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    reference_model = peft_model(base, book, weights=members)
    with torch.no_grad():
        reference = reference_model(**batch).logits.float()
    plain = reference_model.unload()  # the base layers back, LoRA gone
    # A quantized base stays resident (it is small) and is dequantized one layer at a time while
    # writing; a full-precision one is dropped now and re-read from its files, memory-mapped.
    dequantized = _Dequantizer(plain) if quant else None
    folder = base.source.folder
    del reference_model, plain, base
    release_memory()

    with new_folder(dest) as tmp:
        say("Writing merged weights shard by shard...")
        shards, folded = _write_shards(folder, tmp, deltas, dequantized)
        missed = sorted(set(deltas) - folded)
        if missed:  # a checkpoint key that is not the module's path: never drop a delta
            raise MergeCheckFailed(
                f"the base's weight files have no tensor for {', '.join(missed[:3])}, so the "
                "pocket book cannot be folded into it; nothing was written")
        for item in folder.iterdir():
            if item.is_file() and not item.name.endswith(".safetensors") and \
                    item.name != "model.safetensors.index.json" and not item.name.startswith("adapterkit"):
                shutil.copy(item, tmp / item.name)
        del deltas, dequantized
        release_memory()
        say("Checking the merged model against plain PEFT on the unmerged pocket book...")
        diff = _max_logit_diff(tmp, tok, batch, reference)
        if not diff <= tolerance:
            raise MergeCheckFailed(
                f"the merged model's logits differ from plain PEFT's by {diff:.3g} "
                f"(tolerance {tolerance:g}); nothing was written")
    return ExportReport(dest, diff, "nf4" if quant == "4bit" else quant, shards)


def check_foldable(model: Any, deltas: dict[str, Any]) -> None:
    """Refuse a delta on an output layer that shares its weight with the input embeddings:
    folded into the one shared matrix it would change the embeddings too, which the unmerged
    pocket book (PEFT's, or a session's) never does."""
    from adapterkit.errors import InvalidAdapter

    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or inputs is None or output.weight is not inputs.weight:
        return
    name = next((n for n, m in model.named_modules() if m is output), None)
    if name in deltas:
        raise InvalidAdapter(
            f"this base ties {name} to its input embeddings, so a LoRA on {name} cannot be "
            "folded into the shared weight without changing the embeddings too; use it "
            "unmerged (a session, or `adapterkit eval`/`generate`)")


def _training_numerics(model: Any) -> None:
    """bitsandbytes' CPU inference kernel rounds activations to bfloat16; training (what the
    pocket book saw) dequantizes and multiplies in float32. Compare against the latter."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def merged_deltas(members: list[tuple[Any, float]], *,
                  base_weights: Any = None) -> dict[str, tuple[Any, Any]]:
    """module path → (Σ wᵢ sᵢ Bᵢ, A) stacked: ΔW = B @ A is formed one layer at a time while
    writing, never all at once (that would be a second copy of every linear weight)."""
    from adapterkit.lora.factors import concat, read_factors

    per_module: dict[str, list[tuple[Any, float]]] = {}
    names: dict[str, list[str]] = {}
    for item, weight in members:
        for module, f in read_factors(item.path, ref=item.ref, path="export --merged",
                                      base_weights=base_weights).items():
            per_module.setdefault(module, []).append((f.float_(), weight))
            names.setdefault(module, []).append(item.ref)
    out = {}
    for module, parts in per_module.items():
        a, b = concat(parts, names=names[module])
        out[module] = (b, a)
    return out


class _Dequantizer:
    """module path → float32 weight of a 4-bit/8-bit linear layer (what the LoRA saw), on demand."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.layers = {}
        for name, module in model.named_modules():
            if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
                self.layers[name] = module

    def get(self, module: str) -> Any:
        """The weight exactly as the layer's forward uses it: the layer applied to the
        identity matrix. Public API only — bitsandbytes repacks 4-bit weights for its CPU
        kernels, so reading the raw packed data would need its private helpers."""
        import torch

        layer = self.layers.get(module)
        if layer is None:
            return None
        dtype = getattr(layer, "compute_dtype", None) or torch.float32
        device = layer.weight.device
        with torch.no_grad():
            w_t = layer(torch.eye(layer.in_features, dtype=dtype, device=device))
            if getattr(layer, "bias", None) is not None:
                w_t = w_t - layer.bias
        return w_t.t().float().contiguous()


def _write_shards(folder: Path, out: Path, deltas: dict[str, tuple[Any, Any]],
                  dequantized: _Dequantizer | None) -> tuple[int, set[str]]:
    """Write the base's tensors with the deltas added; returns (shard count, modules folded)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folded: set[str] = set()
    shard: dict[str, Any] = {}
    size = 0
    names: list[str] = []
    index: dict[str, str] = {}

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(names) + 1:05d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            names.append(name)
            index.update({k: name for k in shard})
            shard, size = {}, 0

    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                module = key.removesuffix(".weight")
                tensor = dequantized.get(module) if dequantized is not None and \
                    key.endswith(".weight") else None
                if tensor is None:
                    tensor = fh.get_tensor(key)
                if key.endswith(".weight") and module in deltas:
                    folded.add(module)
                    b, a = deltas[module]
                    tensor = (tensor.float() + b @ a).to(tensor.dtype)
                shard[key] = tensor.contiguous()
                size += tensor.numel() * tensor.element_size()
                if size >= SHARD_BYTES:
                    flush()
    flush()
    total = len(names)
    final = {}
    for i, name in enumerate(names, 1):
        new = f"model-{i:05d}-of-{total:05d}.safetensors" if total > 1 else "model.safetensors"
        os.rename(out / name, out / new)
        final[name] = new
    if total > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: final[v] for k, v in index.items()}}, indent=2))
    return total, folded


def _max_logit_diff(folder: Path, tok: Any, batch: Any, reference: Any) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**batch).logits.float()
    diff = (logits - reference).abs()
    mask = batch["attention_mask"].bool()
    return float(diff[mask].max())
