"""The one home of the LoRA math: factors, per-layer scales, rank padding, what a path can apply.

Every path that reads LoRA factors itself instead of going through PEFT — sessions, the frozen
pocket books underneath a training run, stacks, ``stack --flatten``, the exact merges,
``export --merged``, the reward scorer — reads them here, so they agree with each other and
with PEFT. Two rules drifted when each path had its own copy (sessions honoured
``alpha_pattern``, merging did not), which is why there is exactly one copy now. (The PEFT
folder format itself — tensor names, the config file — is read in
:mod:`adapterkit.library.peft_folder`.)

What a path cannot do exactly it refuses, naming the feature (:func:`refuse_inexact`): a DoRA
magnitude, full tensors (``modules_to_save``), embedding LoRA, LoRA biases, trainable tokens,
Conv1D layers and PiSSA/OLoRA-style initialisations that rewrite the base are all PEFT
features that plain ``y = W x + s·B A x`` does not express.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterkit.errors import ConfigError, InexactAdapter, InvalidAdapter
from adapterkit.library.peft_folder import (
    BASE_REWRITING_INITS,
    PREFIX,
    WEIGHTS_FILE,
    TensorName,
    parse_key,
    pattern_value,
    rank_of,
    read_config,
)


def finite_weight(w: Any) -> bool:
    """Whether ``w`` can weigh a pocket book: a finite int or float (a bool is no weight:
    ``True`` would silently mean 1). The one rule of every combining path."""
    return isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)


def scale_of(config: dict[str, Any], module: str) -> float:
    """PEFT's ``scaling`` for ``module``: ``alpha / r`` (``alpha / √r`` with rsLoRA), with ``r``
    and ``alpha`` taken from ``rank_pattern`` / ``alpha_pattern`` where they match."""
    rank = rank_of(config, module)
    alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return float(alpha) / (rank ** 0.5 if config.get("use_rslora") else rank)


@dataclass
class Factors:
    """The LoRA of one linear layer: ``ΔW = scale · B @ A`` (``A`` is r × in, ``B`` out × r)."""

    a: Any
    b: Any
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def float_(self) -> Factors:
        """The same factors in float32 (for merging into weights)."""
        return Factors(self.a.float(), self.b.float(), self.scale)

    def scaled_b(self, weight: float = 1.0) -> Any:
        """``B · scale · weight``: the form stacks and merges concatenate."""
        return self.b * (self.scale * weight)


#: Config keys that leave ``y = W x + s · B A x`` as it is (which layers, which scale, how it
#: was trained or initialised without touching the base, bookkeeping). Every other key with a
#: value other than PEFT's default is a feature a path must apply or refuse — an allow-list,
#: so an option PEFT adds later is refused by name rather than silently ignored.
PLAIN_KEYS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "peft_version", "r", "lora_alpha", "lora_dropout", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "use_rslora", "megatron_config", "megatron_core", "eva_config", "loftq_config",
    "corda_config", "lora_ga_config", "qalora_group_size",
    # applied or refused by name below
    "init_lora_weights", "use_dora", "lora_bias", "trainable_token_indices", "modules_to_save",
    "fan_in_fan_out", "bias",
})
#: Initialisations that change only the LoRA factors' starting values, never the base.
PLAIN_INITS = ("gaussian", "eva", "orthogonal")


def features(config: dict[str, Any], names: Iterable[TensorName]) -> list[str]:
    """The PEFT features this adapter uses beyond plain linear LoRA, named for users.

    Empty means ``y = W x + s · B A x`` on the base as stored is all it does.
    """
    names = list(names)
    found = []
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        found.append(f"{init} initialisation (PEFT rewrites the base weights when it loads it)")
    elif not isinstance(init, bool) and not str(init).lower().startswith(PLAIN_INITS):
        found.append(f"init_lora_weights={init!r} (an initialisation adapterkit does not know)")
    found += _unknown_options(config)
    if config.get("use_dora") or any(n.part == "magnitude" for n in names):
        found.append("DoRA (a magnitude vector per layer)")
    if any(n.part in ("embA", "embB") for n in names):
        found.append("embedding LoRA")
    if config.get("lora_bias") or any(n.part == "B.bias" for n in names):
        found.append("lora_bias (a trained bias on lora_B)")
    if config.get("trainable_token_indices") or any(n.part == "tokens" for n in names):
        found.append("trainable tokens")
    copies = sorted({n.module for n in names if n.part == "base_layer" and not is_bias(n)})
    if copies:
        found.append(f"saved copies of base weights ({', '.join(copies[:3])}"
                     f"{', ...' if len(copies) > 3 else ''}; PEFT loads them over the base)")
    biases = sorted({n.module for n in names if is_bias(n)})
    if biases:
        found.append(f"bias={config.get('bias', 'all')} (saved biases of {', '.join(biases[:3])}"
                     f"{', ...' if len(biases) > 3 else ''})")
    full = sorted({n.module for n in names if n.part is None and not is_bias(n)})
    if full:
        what = "modules_to_save" if config.get("modules_to_save") else "full tensors"
        found.append(f"{what} ({', '.join(full[:3])}{', ...' if len(full) > 3 else ''})")
    if config.get("fan_in_fan_out"):
        found.append("fan_in_fan_out (Conv1D layers, e.g. GPT-2)")
    return found


@functools.cache
def _peft_defaults() -> dict[str, Any]:
    """PEFT's ``LoraConfig`` defaults (built once: every attach and merge asks)."""
    from peft import LoraConfig

    return LoraConfig().to_dict()


def _unknown_options(config: dict[str, Any]) -> list[str]:
    """Options outside :data:`PLAIN_KEYS` set to anything but PEFT's default."""
    defaults = _peft_defaults()
    out = []
    for key, value in sorted(config.items()):
        if key in PLAIN_KEYS or value in (None, {}, [], False) or value == defaults.get(key):
            continue
        out.append(f"{key}={value!r} (a PEFT option adapterkit does not apply itself)")
    return out


def is_bias(name: TensorName) -> bool:
    """A base layer's bias that PEFT saved (``bias="all"``/``"lora_only"``)."""
    return name.leaf == "bias" and name.part in (None, "base_layer")


def saved_names(folder: Path) -> list[TensorName]:
    """The parsed names of the tensors a PEFT folder saves (its header only, no tensor read)."""
    from adapterkit.base.fingerprints import read_safetensors_header

    try:
        header, _ = read_safetensors_header(folder / WEIGHTS_FILE)
    except Exception as exc:  # a damaged file: say which
        raise InvalidAdapter(f"{folder / WEIGHTS_FILE} cannot be read ({exc})") from None
    return [parse_key(k) for k in header if k != "__metadata__"]


#: What to do instead, where a path refuses an adapter it cannot apply exactly.
THROUGH_PEFT = "`adapterkit eval` and `adapterkit generate` load it through PEFT, which can"


def refuse_inexact(ref: str, config: dict[str, Any], names: Iterable[TensorName], *,
                   path: str, handled: Iterable[str] = (), instead: str = THROUGH_PEFT) -> None:
    """Raise :class:`InexactAdapter` if ``path`` (e.g. ``"a session"``) cannot reproduce
    what PEFT does with this adapter; the message names every feature in the way, and
    ``instead`` what the user can do."""
    handled = tuple(handled)
    missing = [f for f in features(config, names) if not f.startswith(handled)]
    if missing:
        raise InexactAdapter(
            f"{ref} uses {'; '.join(missing)}, which {path} cannot apply exactly; {instead}")


def read_factors(folder: Path, *, ref: str, path: str, dtype: Any = None, device: Any = "cpu",
                 extra: dict[str, Any] | None = None, base_weights: Any = None,
                 handles: Iterable[str] = (), instead: str = THROUGH_PEFT
                 ) -> dict[str, Factors]:
    """Every linear layer's LoRA factors in the PEFT folder ``folder``, with PEFT's scales.

    Refuses (:func:`refuse_inexact`) what ``path`` cannot apply exactly. Full tensors (a
    reward head's ``modules_to_save``) are collected into ``extra`` when the caller handles them.
    ``base_layer`` copies that PEFT saves beside ``lm_head`` LoRA are checked against the base
    (``base_weights(module, leaf) -> tensor``; :func:`stored_tensors` reads them from the
    base's files) when given: equal, they change nothing; without it they are refused. ``handles``
    names features (as :func:`features` words them) the caller applies itself.
    """
    from safetensors.torch import load_file

    config = read_config(folder)
    try:
        state = load_file(str(folder / WEIGHTS_FILE), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise InvalidAdapter(f"{ref}: {folder / WEIGHTS_FILE} cannot be read ({exc})") from None
    names = [parse_key(k) for k in state]
    handled = (("modules_to_save", "full tensors") if extra is not None else ()) + tuple(handles)
    if base_weights is not None:  # saved copies of base tensors are checked against the base
        handled += ("bias=", "saved copies of base weights")
    refuse_inexact(ref, config, names, path=path, handled=handled, instead=instead)
    pairs: dict[str, dict[str, Any]] = {}
    for name in names:
        tensor = state[name.key]
        if name.part in ("A", "B"):
            pairs.setdefault(name.module, {})[name.part] = tensor
        elif name.part == "base_layer" or is_bias(name):
            _check_base_copy(ref, name, tensor, base_weights)
        elif extra is not None:  # full tensors, allowed by the caller
            extra[name.key.removeprefix(PREFIX)] = tensor
    out = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise InvalidAdapter(f"{ref}: {module} has lora_{next(iter(pair))} but not both "
                                 "factors; the adapter is damaged")
        a, b = pair["A"], pair["B"]
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        out[module] = Factors(a, b, scale_of(config, module))
    return out


def check_base_copies(folder: Path, *, ref: str, base_weights: Callable[[str, str], Any],
                      instead: str) -> None:
    """Check every base tensor PEFT saved in ``folder`` (``base_layer`` copies beside an
    ``lm_head`` LoRA, biases) against ``base_weights`` (:func:`resident_tensors`,
    :func:`stored_tensors`): equal copies change nothing, so a path that cannot apply a
    different one may still take the adapter. Raises :class:`InexactAdapter` (with ``instead``:
    what the user can do) for a copy that differs or cannot be compared. Reads only those
    tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as fh:
            for key in fh.keys():
                name = parse_key(key)
                if name.part == "base_layer" or is_bias(name):
                    _check_base_copy(ref, name, fh.get_tensor(key), base_weights,
                                     instead=instead)
    except InexactAdapter:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise InvalidAdapter(f"{ref}: {folder / WEIGHTS_FILE} cannot be read ({exc})") from None


def _check_base_copy(ref: str, name: TensorName, tensor: Any, base_weights: Any, *,
                     instead: str | None = None) -> None:
    """A base tensor PEFT saved with the adapter (an ``lm_head`` weight, a bias) changes
    nothing if it equals the base's; if it differs, PEFT would overwrite the base: refuse
    (``instead``: what to do, for a path that is itself PEFT's)."""
    if base_weights is None:
        return
    leaf = name.leaf or "weight"
    weight = base_weights(name.module, leaf)
    if weight is None:
        raise InexactAdapter(
            f"{ref} saves its own {name.module}.{leaf}, which PEFT loads over the base's, and "
            f"the base here has no separate {name.module}.{leaf} to compare it with (a tied "
            "or quantized weight); this path cannot tell whether it changes anything. "
            f"{instead or 'Use a session, or `adapterkit eval`/`generate`'}")
    if tuple(weight.shape) == tuple(tensor.shape) and bool(
            (weight.float().cpu() == tensor.float().cpu()).all()):
        return
    raise InexactAdapter(
        f"{ref} saves its own {name.module}.{leaf}, and it differs from this base's (a trained "
        "bias, a resized or retrained layer); PEFT overwrites the base with it, which this path "
        f"cannot. {instead or 'Use it through `adapterkit eval`/`generate`'}")


def pad(a: Any, b: Any, rank: int) -> tuple[Any, Any]:
    """Zero-pad ``A`` (r × in) and ``B`` (out × r) to ``rank``: the same product, one shape."""
    import torch

    r = a.shape[0]
    if r >= rank:
        return a, b
    return (torch.cat([a, a.new_zeros(rank - r, a.shape[1])]),
            torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1))


def concat(members: list[tuple[Factors, float]], *, check: bool = True,
           names: list[str] | None = None) -> tuple[Any, Any]:
    """``(A, B)`` with ``B @ A = Σ wᵢ sᵢ Bᵢ Aᵢ`` exactly: ranks concatenated, scales in ``B``.

    Raises :class:`ConfigError` where a weight makes finite factors overflow their number
    format (``a*1e300``): the result could only add infinities (unless not ``check``: the
    server checks its weights when a request is admitted, where a refusal fails that request
    alone, and leaves a row with non-finite logits to fail alone). ``names``: the members'
    pocket books, for the message."""
    import torch

    b = torch.cat([f.scaled_b(w) for f, w in members], dim=1)
    if check and not bool(torch.isfinite(b).all()):
        for i, (f, w) in enumerate(members):
            if bool(torch.isfinite(f.b).all()) and not bool(torch.isfinite(f.scaled_b(w)).all()):
                raise WeightOverflow(w, peak_of([f]), f.b.dtype,
                                     ref=names[i] if names else "")
    return torch.cat([f.a for f, _ in members]), b


def peak_of(factors: Iterable[Factors]) -> float:
    """The largest ``|s·B|`` over ``factors`` (0 for none): a weight ``w`` keeps them finite
    while ``|w| · peak`` stays within their number format (see :class:`WeightOverflow`)."""
    return max((float(f.scaled_b().abs().max()) for f in factors if f.b.numel()), default=0.0)


class WeightOverflow(ConfigError):
    """A weight that makes a pocket book's scaled LoRA factors overflow their number format."""

    def __init__(self, weight: float, peak: float, dtype: Any, *, ref: str = "") -> None:
        import torch

        largest = torch.finfo(dtype).max
        of = f" of {ref}" if ref else ""
        super().__init__(
            f"weight {weight:g} makes the largest LoRA factor{of} {abs(weight) * peak:.3g}, "
            f"past the {largest:.3g} that {str(dtype).removeprefix('torch.')} holds: give a "
            f"weight below {largest / peak:.3g} in magnitude")

    @staticmethod
    def check(weight: float, peak: float, dtype: Any, *, ref: str = "") -> None:
        """Raise for ``weight`` on factors whose largest ``|s·B|`` is ``peak`` (not finite:
        left to the caller, the factors themselves are broken)."""
        import torch

        if math.isfinite(peak) and abs(weight) * peak > torch.finfo(dtype).max:
            raise WeightOverflow(weight, peak, dtype, ref=ref)


def plain_config(template: dict[str, Any], *, rank: int, target_modules: list[str]
                 ) -> dict[str, Any]:
    """A PEFT config for a combined adapter whose scale is already inside ``B``: ``alpha = r``,
    no patterns, no rsLoRA, no layer filter, no DoRA — nothing a member's config could carry
    over that would change the result (PEFT's ``add_weighted_adapter`` copies the first
    member's ``use_rslora`` and ``layers_to_transform``)."""
    drop = ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "modules_to_save",
            "layers_to_transform", "layers_pattern", "lora_bias", "trainable_token_indices",
            "init_lora_weights", "exclude_modules")
    config = {k: v for k, v in template.items() if k not in drop}
    config.update(r=rank, lora_alpha=rank, target_modules=sorted(target_modules),
                  rank_pattern={}, alpha_pattern={}, use_rslora=False, use_dora=False,
                  bias="none", init_lora_weights=True)
    return config


def tensors_of(factors: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """``{module: (A, B)}`` → PEFT tensor names, as ``save_pretrained`` writes them."""
    out = {}
    for module, (a, b) in factors.items():
        out[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
        out[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()
    return out



def stored_tensors(folder: Path) -> Callable[[str, str], Any]:
    """``(module, leaf) -> tensor`` read from a base model folder's safetensors files (or None
    where it has no such tensor): the base as stored, for paths that have no base loaded."""
    from safetensors import safe_open

    from adapterkit.base.fingerprints import weight_files

    where: dict[str, Path] = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as fh:
            where.update(dict.fromkeys(fh.keys(), file))

    def get(module: str, leaf: str) -> Any:
        file = where.get(f"{module}.{leaf}")
        if file is None:
            return None
        with safe_open(str(file), framework="pt") as fh:
            return fh.get_tensor(f"{module}.{leaf}")

    return get


def resident_tensors(model: Any) -> Callable[[str, str], Any]:
    """``(module, leaf) -> tensor`` of a resident base model (inside any LoRA wrapper), or None
    where it has none in full precision (a 4-bit weight cannot be compared bit for bit)."""
    def get(module: str, leaf: str) -> Any:
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            return None
        layer = getattr(layer, "base_layer", layer)
        tensor = getattr(layer, leaf, None)
        return tensor if tensor is not None and tensor.is_floating_point() else None

    return get
