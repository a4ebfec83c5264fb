"""Base fingerprints: a cheap, stable identity for a set of base weights.

A pocket book only makes sense on the base it was trained on, so each records the base's
fingerprint. It must be cheap (computed at every load) and stable across machines, and it must
not depend on how the base is loaded (full precision, 4-bit, 8-bit): a QLoRA pocket book fits
the full-precision base it was quantised from. So it is computed from the files on disk, never
from tensors in memory:

* the model config, minus fields that do not change the weights (``transformers_version``...);
* every tensor's name, dtype and shape, from the safetensors headers;
* a sample of every tensor's bytes: all of it when small, else 16 evenly spaced 4 KiB blocks.

Sampling keeps the cost at a few milliseconds for any model size. Any change that touches a whole
matrix (fine-tuning, a merged adapter, another quantisation) changes the sampled blocks; a change
of single scalars between samples would not, which is the accepted trade-off.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from pathlib import Path

from adapterkit.errors import BaseLoadError

_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "_commit_hash", "use_cache", "torch_dtype", "dtype",
    "quantization_config", "architectures", "output_attentions", "output_hidden_states",
}
_SMALL = 64 * 1024
_BLOCK = 4096
_BLOCKS = 16
FINGERPRINT_VERSION = "fp1"


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header without torch: ``(header, offset of the data section)``."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > size - 8 or n > 100_000_000:
                raise ValueError("header length points past the end of the file (truncated?)")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        raise BaseLoadError(f"cannot read safetensors file {path}: {exc}") from None
    problem = _header_problem(header)
    if problem:
        raise BaseLoadError(f"cannot read safetensors file {path}: malformed header ({problem})")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise BaseLoadError(
            f"safetensors file {path} is truncated ({size} bytes, its header needs {8 + n + end})"
        )
    return header, 8 + n


def _header_problem(header: object) -> str | None:
    """What is wrong with a parsed safetensors header, or ``None``: every reader of a header
    (fingerprints, dtypes, adapter shapes) may then index ``dtype``/``shape``/``data_offsets``."""
    if not isinstance(header, dict):
        return "not a JSON object"
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return f"entry {name!r} is not an object"
        for key in ("dtype", "shape", "data_offsets"):
            if key not in info:
                return f"entry {name!r} has no {key!r}"
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(info["dtype"], str):
            return f"entry {name!r} has a dtype that is not a string"
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            return f"entry {name!r} has shape {shape!r}, not a list of sizes"
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_natural(o) for o in offsets) or offsets[0] > offsets[1]):
            return f"entry {name!r} has data_offsets {offsets!r}, not [start, end]"
    return None


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a model folder, in a stable order."""
    return sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))


def fingerprint(folder: Path) -> str:
    """The fingerprint of the model stored in ``folder`` (config + safetensors)."""
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BaseLoadError(f"cannot read {folder / 'config.json'}: {exc}") from None
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(stable, sort_keys=True).encode())
    files = weight_files(folder)
    if not files:
        raise BaseLoadError(
            f"{folder} has no .safetensors weights; adapterkit does not load pickled (.bin) "
            "base weights. Convert them with transformers' save_pretrained(safe_serialization=True)"
        )
    entries = []
    for path in files:
        header, data_start = read_safetensors_header(path)
        for name, info in header.items():
            if name != "__metadata__":
                entries.append((name, info, path, data_start))
    entries.sort(key=lambda e: e[0])
    handles: dict[Path, mmap.mmap] = {}
    try:
        for name, info, path, data_start in entries:
            h.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
            if path not in handles:
                with open(path, "rb") as fh:
                    handles[path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            buf = handles[path]
            start, end = (data_start + o for o in info["data_offsets"])
            if end - start <= _SMALL:
                h.update(buf[start:end])
            else:
                step = (end - start - _BLOCK) // (_BLOCKS - 1)
                for i in range(_BLOCKS):
                    pos = start + i * step
                    h.update(buf[pos:pos + _BLOCK])
    finally:
        for buf in handles.values():
            buf.close()
    return h.hexdigest()[:32]
