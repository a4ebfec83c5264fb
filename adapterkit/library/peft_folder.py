"""Reading PEFT adapter folders and checking that an adapter really fits a base.

PEFT loads an adapter whose keys do not match the model with only a warning, and then the model
answers exactly like the plain base. An adapter made for another architecture, with a target
module the base lacks, or for a resized vocabulary, must therefore be refused here — with the
reason — before it joins the library.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.base.fingerprints import read_safetensors_header
from adapterkit.errors import (
    AdapterWarning,
    BaseMismatch,
    BaseNotFound,
    InvalidAdapter,
    UnsafeWeights,
)
from adapterkit.library.metadata import (
    CARD_FILE,
    CONFIG_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    PocketBookMeta,
)
from adapterkit.library.record import PROSE, Origin, read_record, record_meta, verify_record

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.base.load import BaseStructure
    from adapterkit.base.resolve import BaseSource
    from adapterkit.library.store import Library, PocketBook

PREFIX = "base_model.model."

#: The PEFT name part → our short name for it.
_PARTS = {
    "lora_A": "A", "lora_B": "B", "lora_embedding_A": "embA", "lora_embedding_B": "embB",
    "lora_magnitude_vector": "magnitude", "base_layer": "base_layer",
    "trainable_tokens_delta": "tokens", "token_adapter": "tokens",
}

#: Initialisations with which PEFT rewrites the base weights when the adapter is loaded
#: (unless the adapter was converted when saved): ``W_base`` is not the base on disk.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class TensorName:
    """A saved PEFT tensor name, parsed: the base module it belongs to and which part it is.

    ``part`` is ``"A"``, ``"B"``, ``"B.bias"`` (``lora_bias``), ``"embA"``, ``"embB"``,
    ``"magnitude"`` (DoRA), ``"base_layer"`` (a copy of a base weight PEFT saves with embedding
    or ``lm_head`` LoRA), ``"tokens"`` (trainable tokens) or ``None`` (a full tensor: a
    ``modules_to_save`` layer or a bias).
    """

    key: str
    module: str
    part: str | None
    leaf: str  # "weight", "bias", or "" for parameters saved without one


def parse_key(key: str) -> TensorName:
    """``base_model.model.X.lora_A.weight`` → ``TensorName(module="X", part="A")``."""
    body = key.removeprefix(PREFIX)
    parts = body.split(".")
    for i, piece in enumerate(parts):
        if piece in _PARTS:
            leaf = ".".join(parts[i + 1:])
            part = _PARTS[piece]
            if part == "B" and leaf == "bias":
                part = "B.bias"
            return TensorName(key, ".".join(parts[:i]), part, leaf)
    module, _, leaf = body.rpartition(".")
    return TensorName(key, module, None, leaf)


def read_config(folder: Path) -> dict[str, Any]:
    """A PEFT folder's ``adapter_config.json``, or :class:`InvalidAdapter` saying why not."""
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidAdapter(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{path} is not a JSON object")
    return config


PICKLE_FILE = "adapter_model.bin"

#: safetensors dtype → bytes per element (the format's own table), to check that each tensor's
#: stored size matches its shape. A dtype not listed here is not size-checked.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2,
                "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


@dataclass
class AdapterFiles:
    """A PEFT LoRA folder, parsed: its config and the name → shape of every saved tensor."""

    folder: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    pickled: bool


def own_file(folder: Path, name: str, *, within: Path | None = None) -> Path | None:
    """The regular file ``folder/name`` to read, or None where there is none.

    A link is followed only while it stays inside ``within`` (default: ``folder`` itself; a Hub
    download passes its cache repo, whose snapshot files are links to its blobs). A link that
    leaves it is refused: importing it would copy some other file of this machine into the
    library, and from there into exports and onto the Hub.
    """
    path = folder / name
    if not path.is_symlink():
        return path if path.is_file() else None
    target = path.resolve()
    root = (within or folder).resolve()
    if not target.is_relative_to(root):
        raise InvalidAdapter(f"{path} is a link to {target}, outside {root}; adapterkit copies "
                             "only the adapter's own files: put the file itself in the folder")
    return target if target.is_file() else None


def read_adapter(folder: Path, *, trust_pickle: bool = False,
                 within: Path | None = None) -> AdapterFiles:
    """Parse a PEFT adapter folder; refuses pickled weights unless ``trust_pickle``, and links
    that leave ``within`` (see :func:`own_file`)."""
    if not folder.is_dir():
        raise InvalidAdapter(f"{folder} is not a folder")
    files = {n: own_file(folder, n, within=within)
             for n in (CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE, CARD_FILE)}
    if files[CONFIG_FILE] is None:
        raise InvalidAdapter(f"{folder} is not a PEFT adapter: it has no {CONFIG_FILE}")
    config = read_config(folder)
    if str(config.get("peft_type", "")).upper() != "LORA":
        kind = config.get("peft_type")
        raise InvalidAdapter(f"{folder} is a {kind or 'unknown'} adapter; adapterkit handles LoRA")
    wrong = type_problems(config)
    if wrong:
        raise InvalidAdapter(f"{folder / CONFIG_FILE} holds values of the wrong type: "
                             f"{'; '.join(wrong)}")
    weights = files[WEIGHTS_FILE]
    if weights is not None:
        return AdapterFiles(folder, config, read_shapes(weights), pickled=False)
    if files[PICKLE_FILE] is not None:
        if not trust_pickle:
            raise UnsafeWeights(
                f"{folder} holds pickled weights ({PICKLE_FILE}), which can run arbitrary code "
                "when loaded. If you made them or trust their source, pass --trust-pickle; they "
                "are then converted to safetensors"
            )
        state = _load_pickle(folder / PICKLE_FILE)
        return AdapterFiles(folder, config, {k: tuple(v.shape) for k, v in state.items()},
                            pickled=True)
    raise InvalidAdapter(f"{folder} is not a PEFT adapter: it has no {WEIGHTS_FILE}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _names(v: Any) -> bool:
    return isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v)


#: The LoRA config keys every path reads, with the types PEFT's ``LoraConfig`` gives them
#: (``None`` is PEFT's "unset" for each): a value of another type would pass our checks and
#: break PEFT's load later, with a traceback from inside PEFT.
_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "r": ("a positive whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)
          and v > 0),
    "lora_alpha": ("a number", _number),
    "target_modules": ("a module name, a pattern or a list of names", _names),
    "exclude_modules": ("a module name, a pattern or a list of names", _names),
    "modules_to_save": ("a list of module names", lambda v: isinstance(v, list)
                        and all(isinstance(x, str) for x in v)),
    "rank_pattern": ("a mapping of module patterns to ranks", lambda v: isinstance(v, dict)
                     and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                             for x in v.values())),
    "alpha_pattern": ("a mapping of module patterns to numbers", lambda v: isinstance(v, dict)
                      and all(_number(x) for x in v.values())),
    "layers_to_transform": ("a layer index or a list of them", lambda v: isinstance(v, int)
                            and not isinstance(v, bool) or isinstance(v, list)
                            and all(isinstance(x, int) and not isinstance(x, bool)
                                    for x in v)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
}


def type_problems(config: dict[str, Any]) -> list[str]:
    """One line for each key of ``config`` whose value is not of the type PEFT gives it."""
    return [f"{key} must be {what}, not {json.dumps(config[key])[:60]}"
            for key, (what, ok) in _TYPES.items()
            if config.get(key) is not None and not ok(config[key])]


def _load_pickle(path: Path) -> dict[str, Any]:
    """Trusted pickled weights, loaded with torch's ``weights_only`` unpickler (which runs no
    code: anything beyond tensors and plain containers is refused, and said so in one line)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (refused globals), a broken or truncated file
        raise UnsafeWeights(f"{path} refused: the pickle could not be loaded safely "
                            f"({_unpickling_reason(exc)})") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InvalidAdapter(f"{path} is not a state dict (tensor name → tensor); it cannot be "
                             "an adapter's weights")
    return state


def _unpickling_reason(exc: Exception) -> str:
    """torch's own reason, without its advice to load the file with ``weights_only=False``
    (which would run whatever code it holds)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    words = " ".join(text.split())
    return f"{type(exc).__name__}: {words[:200]}" if words else type(exc).__name__


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from a safetensors header (no tensor is read), after checking that
    the header is whole (:func:`~adapterkit.base.fingerprints.read_safetensors_header`) and
    that each tensor's stored size is its shape's. :class:`InvalidAdapter` says what is wrong."""
    header, _ = _header(path)
    shapes: dict[str, tuple[int, ...]] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = tuple(entry["shape"])
        (start, end), dtype = entry["data_offsets"], entry["dtype"]
        count = 1
        for d in shape:
            count *= d
        if dtype in _DTYPE_BYTES and end - start != count * _DTYPE_BYTES[dtype]:
            raise InvalidAdapter(f"{path}: tensor {key} of shape {list(shape)} ({dtype}) does "
                                 f"not match the {end - start} bytes stored for it")
        shapes[key] = shape
    return shapes


def _header(path: Path) -> tuple[dict, int]:
    try:
        return read_safetensors_header(path)
    except Exception as exc:  # BaseLoadError speaks of bases; say "adapter" here
        raise InvalidAdapter(str(exc).replace("safetensors file", "adapter weights")) from None


_PASS_BASE = "pass the base it was made on with --base"


def check_fits(adapter: AdapterFiles, structure: BaseStructure, *, label: str | None = None,
               advice: str = _PASS_BASE) -> None:
    """Raise :class:`BaseMismatch` unless every tensor of the adapter lands on the base.

    :param label: what to call the adapter (default: ``adapter in <its folder's name>``).
    :param advice: what the user can do, closing the message.
    """
    if not adapter.shapes:
        raise InvalidAdapter(f"{adapter.folder} has no tensors: it would change nothing")
    problems = fit_problems(adapter, structure)
    if problems:
        raise BaseMismatch(
            f"{label or f'adapter in {adapter.folder.name}'} does not fit base "
            f"{structure.architecture}: " + summarize(problems)
            + ". PEFT would load it with warnings and leave those layers as the plain base has "
            f"them; {advice}"
        )
    problems = config_problems(adapter, structure)
    if problems:
        raise InvalidAdapter(
            f"{label or f'adapter in {adapter.folder.name}'}: {summarize(problems)}. Its "
            f"{CONFIG_FILE} does not describe its weights: correct it, or save the adapter "
            "again with PEFT")


def summarize(problems: list[str]) -> str:
    """The first three problems, and how many more there are."""
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def fit_problems(adapter: AdapterFiles, structure: BaseStructure) -> list[str]:
    """Every way the adapter's tensors and target modules do not land on ``structure``.

    A reward pocket book's head (``task_type`` ``SEQ_CLS``, the ``modules_to_save`` it names)
    is not part of the causal base and is not checked here; its scorer checks it.
    """
    problems: list[str] = []
    ranks: dict[str, int] = {}
    heads = set(adapter.config.get("modules_to_save") or []) \
        if adapter.config.get("task_type") == "SEQ_CLS" else set()
    for key, shape in sorted(adapter.shapes.items()):
        name = parse_key(key)
        module, part = name.module, name.part
        if part is None and module.split(".")[0] in heads:
            continue
        if part in (None, "base_layer"):  # a full tensor, or PEFT's copy of a base weight
            param = f"{module}.{name.leaf or 'weight'}"
            expected = structure.params.get(param)
            if expected is None:
                problems.append(f"{param} does not exist in the base")
            elif tuple(expected) != tuple(shape):
                problems.append(_shape_problem(param, shape, expected, structure))
            continue
        if part in ("A", "B", "tokens", "embA", "embB") and len(shape) != 2:
            problems.append(f"{key}: shape {list(shape)} is not a matrix")
            continue
        if part == "tokens":
            if module not in structure.embedding or shape[-1] != structure.embedding[module][1]:
                problems.append(f"{key}: trainable tokens of width {shape[-1]} do not fit "
                                f"{module}")
            continue
        if part in ("A", "B", "B.bias", "magnitude"):
            if module not in structure.linear:
                where = "is not a linear layer of" if module in structure.params or any(
                    p.startswith(module + ".") for p in structure.params) else "does not exist in"
                problems.append(f"LoRA module {module} {where} the base")
                continue
            fan_in, fan_out = structure.linear[module]
            if part == "A" and shape[1] != fan_in:
                problems.append(f"{key}: shape {list(shape)} does not fit in_features={fan_in}")
            if part == "B" and shape[0] != fan_out:
                problems.append(f"{key}: shape {list(shape)} does not fit out_features={fan_out}")
            if part in ("B.bias", "magnitude") and tuple(shape) != (fan_out,):
                problems.append(f"{key}: shape {list(shape)} does not fit out_features={fan_out}")
        else:
            if module not in structure.embedding:
                problems.append(f"LoRA embedding {module} does not exist in the base")
                continue
            vocab, dim = structure.embedding[module]
            size = shape[1] if part == "embA" else shape[0]
            want = vocab if part == "embA" else dim
            if size != want:
                problems.append(_shape_problem(key, shape, (vocab, dim), structure))
        if part in ("A", "embA"):
            ranks[module] = shape[0]
        elif part in ("B", "embB") and module in ranks and shape[-1] != ranks[module]:
            problems.append(f"{module}: lora_A rank {ranks[module]} but lora_B rank {shape[-1]}")
    _check_config_targets(adapter.config, structure, problems)
    return problems


def pattern_value(pattern: dict[str, Any] | None, module: str, default: Any) -> Any:
    """The value ``pattern`` (``rank_pattern``/``alpha_pattern``) gives ``module``, resolved
    exactly as PEFT does: the *first* key (in the config's order) that matches the end of the
    module path wins. PEFT's own function, so a change in PEFT's rule reaches us too."""
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(pattern.keys()), module)
    return pattern.get(key, default)


def rank_of(config: dict[str, Any], module: str) -> int:
    """The configured rank of ``module`` (``r`` or its ``rank_pattern`` entry)."""
    return int(pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))


#: Tensor parts that exist only on a layer PEFT wrapped with LoRA, i.e. a layer it targets.
_LORA_PARTS = ("A", "B", "B.bias", "magnitude", "embA", "embB")


def config_problems(adapter: AdapterFiles, structure: BaseStructure) -> list[str]:
    """Every way the adapter's LoRA tensors disagree with its own config, so that PEFT would
    load it otherwise than its tensors say (run after :func:`fit_problems` found none).

    Factors on a module the config does not target (``target_modules``, ``exclude_modules``,
    ``layers_to_transform``...): PEFT builds no LoRA layer there and drops them, while paths
    that read the factors themselves would apply them. Factors of another rank than ``r`` /
    ``rank_pattern`` give that module: PEFT refuses the file (size mismatch), while those
    paths would scale them by the wrong ``r``.
    """
    problems: list[str] = []
    lora: dict[str, int | None] = {}  # module → its rank (lora_A's rows), if it has an A
    for key, shape in adapter.shapes.items():
        name = parse_key(key)
        if name.part in _LORA_PARTS:
            lora.setdefault(name.module, None)
            if name.part in ("A", "embA"):
                lora[name.module] = shape[0]
    targeted = _targeting(adapter.config, structure)
    ignored = sorted(m for m in lora if not targeted(m))
    if ignored:
        problems.append(
            f"it holds LoRA factors for {_listed(ignored)}, which its target_modules/"
            "layers_to_transform/exclude_modules do not target: PEFT would ignore them")
    wrong: dict[tuple[int, int], list[str]] = {}  # (rank, configured rank) → modules
    for module, rank in sorted(lora.items()):
        try:
            configured = rank_of(adapter.config, module)
        except (TypeError, ValueError):  # a value PEFT cannot read either: PEFT says so
            continue
        if rank is not None and module not in ignored and rank != configured:
            wrong.setdefault((rank, configured), []).append(module)
    for (rank, configured), modules in wrong.items():
        problems.append(
            f"{_listed(modules)} {'has' if len(modules) == 1 else 'have'} factors of rank "
            f"{rank}, but its config gives r={configured} (r/rank_pattern): PEFT refuses to "
            "load it (size mismatch)")
    return problems


def _listed(modules: list[str]) -> str:
    more = f" (and {len(modules) - 3} more)" if len(modules) > 3 else ""
    return ", ".join(modules[:3]) + more


def _targeting(config: dict[str, Any], structure: BaseStructure) -> Callable[[str], bool]:
    """Whether PEFT would build a LoRA layer on a module from ``config``: PEFT's own test, on the
    config as PEFT reads it when it injects the adapter — ``all-linear`` expanded on the base,
    and a list of at least ``MIN_TARGET_MODULES_FOR_OPTIMIZATION`` names shortened to the
    suffixes that single them out, after which ``layers_to_transform`` filters them (PEFT's
    ``inject_adapter``). A config this cannot judge (no ``target_modules``,
    ``target_parameters``, an invalid pattern or value, which PEFT or :func:`fit_problems`
    reports) counts as targeting every module."""
    import re
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    targets = config.get("target_modules")
    if targets is None or config.get("target_parameters"):
        return lambda module: True
    if isinstance(targets, str) and targets.lower() == "all-linear":
        # every linear layer but the output layer, by full name, as PEFT expands it
        targets = {m for m in structure.linear if m != structure.output_layer}
    if isinstance(targets, (list, set)):
        targets = _shortened(set(targets), structure)
    fields = ("exclude_modules", "modules_to_save", "target_parameters", "layers_to_transform",
              "layers_pattern")
    view = SimpleNamespace(target_modules=targets, **{f: config.get(f) for f in fields})

    def targeted(module: str) -> bool:
        try:
            return bool(check_target_module_exists(view, module))
        except (re.error, TypeError, ValueError):  # a pattern or value PEFT cannot read
            return True
    return targeted


def _shortened(targets: set[str], structure: BaseStructure) -> set[str]:
    """``targets`` as PEFT's ``inject_adapter`` rewrites a long list: the shortest suffixes
    that match them and no other module (here: no other linear layer, the only modules whose
    names could share a target's suffix); PEFT's own private helper, so a version without it
    leaves the list as it is."""
    try:
        from peft.tuners.tuners_utils import _find_minimal_target_modules
        from peft.utils.constants import MIN_TARGET_MODULES_FOR_OPTIMIZATION
    except ImportError:
        return targets
    if len(targets) < MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        return targets
    suffixes = tuple("." + t for t in targets)
    others = [m for m in structure.linear if m not in targets and not m.endswith(suffixes)]
    try:
        shorter = set(_find_minimal_target_modules(targets, others))
    except ValueError:  # a list PEFT refuses itself (an empty name...): PEFT says so
        return targets
    return shorter if len(shorter) < len(targets) else targets


def _shape_problem(name: str, shape: tuple, expected: tuple, structure: BaseStructure) -> str:
    if structure.vocab_size and structure.vocab_size in expected and shape and (
        shape[0] != expected[0] or shape[-1] != expected[-1]
    ):
        return (f"{name} was trained with a vocabulary of {max(shape)} tokens, the base has "
                f"{structure.vocab_size}")
    return f"{name}: shape {list(shape)} but the base has {list(expected)}"


def _check_config_targets(config: dict, structure: BaseStructure, problems: list[str]) -> None:
    import re

    targets = config.get("target_modules")
    if not targets or targets == "all-linear":
        return
    modules = list(structure.linear) + list(structure.embedding)
    if isinstance(targets, str):
        try:  # PEFT reads a string as a regular expression
            pattern = re.compile(targets)
        except re.error as exc:
            problems.append(f"target_modules {targets!r} is not a valid regular expression "
                            f"({exc})")
            return
        if not any(pattern.fullmatch(m) for m in modules):
            problems.append(f"target_modules pattern {targets!r} matches no module of the base")
        return
    # PEFT accepts a list of which only some names exist in the model (one list serves
    # several architectures); it refuses only when none matches, and so do we.
    if not any(m == t or m.endswith("." + t) for t in targets for m in modules):
        problems.append(f"none of the target modules {', '.join(targets)} exists in the base")


def _refuse_base_rewriting(adapter: AdapterFiles) -> None:
    """PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA adapters saved without conversion need the base
    rewritten as PEFT rewrites it on load; sessions, stacks and merges use the base as stored.
    Refuse them."""
    init = adapter.config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise InvalidAdapter(
            f"{adapter.folder.name} was saved with init_lora_weights={init!r} and not converted: "
            "PEFT rewrites the base weights when it loads it, so on the base as stored it gives "
            "other answers. Save it again with PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) (PiSSA, OLoRA, "
            "CorDA) to get a plain LoRA on the original base, then import that")


def _same_base(recorded: str, folder: Path, home: Path) -> bool:
    """Whether the base an adapter's config names is the one given (the same folder or the
    same weights), where that can be told on this machine."""
    from adapterkit.base.fingerprints import fingerprint
    from adapterkit.base.resolve import resolve_base
    from adapterkit.errors import AdapterkitError

    if not Path(recorded).expanduser().exists():  # a Hub id: never download just to compare
        return False
    try:
        other = resolve_base(recorded, home).folder
    except AdapterkitError:
        return False
    return other.resolve() == folder.resolve() or fingerprint(other) == fingerprint(folder)


def _as_alias(home: Path, fp: str, source: BaseSource, spec: str) -> tuple[BaseSource, str]:
    """``source`` as the alias it is known by, with that alias, where it is the folder an
    alias's GGUF was converted to (``<home>/bases/...``): an import pointed at that folder then
    records the base as every pocket book trained on the alias does, so ``list --base ALIAS``
    and the BASE column agree. Otherwise ``source`` and ``spec`` unchanged."""
    from adapterkit.base.fingerprints import fingerprint
    from adapterkit.base.resolve import ALIASES, find_base, resolve_base
    from adapterkit.errors import AdapterkitError

    if source.provenance.get("alias") or source.provenance.get("kind") != "gguf":
        return source, spec
    known = find_base(home, fp)
    for alias in sorted(ALIASES, key=lambda a: a != known):  # the one this home knows first
        if alias != known and ALIASES[alias].filename != source.provenance.get("file"):
            continue
        try:
            aliased = resolve_base(alias, home)
        except AdapterkitError:  # its package is gone: keep what was given
            continue
        if aliased.folder.resolve() == source.folder.resolve() or \
                fingerprint(aliased.folder) == fp:
            return aliased, alias
    return source, spec


def _all_b_zero(weights: Path) -> bool:
    """True when every ``lora_B`` tensor is zero (PEFT's initialisation: no effect at all)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as fh:
        keys = [k for k in fh.keys() if parse_key(k).part in ("B", "embB")]
        return bool(keys) and all(not bool(fh.get_tensor(k).any()) for k in keys)


def convert_pickle(folder: Path, staged: Path) -> None:
    """Write ``folder``'s trusted pickled weights as safetensors into ``staged``."""
    from safetensors.torch import save_file

    state = _load_pickle(folder / PICKLE_FILE)
    save_file({k: v.contiguous() for k, v in state.items()}, staged / WEIGHTS_FILE,
              metadata={"format": "pt"})
    (staged / PICKLE_FILE).unlink(missing_ok=True)


def check_on_base(adapter: AdapterFiles, base_folder: Path, *, name: str,
                  label: str | None = None, advice: str = _PASS_BASE) -> None:
    """What import checks before an adapter joins the library, for import and pull alike:
    refuse one that needs a rewritten base (PiSSA...) or does not fit ``base_folder``'s model
    (:class:`BaseMismatch`, see :func:`check_fits` for ``label`` and ``advice``), and warn
    (naming the pocket book ``name``) when it is untrained."""
    from adapterkit.base.load import inspect_structure

    _refuse_base_rewriting(adapter)
    check_fits(adapter, inspect_structure(base_folder), label=label, advice=advice)
    if not adapter.pickled and _all_b_zero(adapter.folder / WEIGHTS_FILE):
        warnings.warn(f"{name} looks untrained: every lora_B is zero, so its LoRA changes "
                      "nothing", AdapterWarning, stacklevel=3)


def copy_files(adapter: AdapterFiles, staged: Path, names: tuple[str, ...], *,
               within: Path | None = None) -> None:
    """Copy the contents of ``adapter``'s files ``names`` (those it has) into ``staged``, its
    pickled weights as safetensors; links are followed only inside ``within`` (see
    :func:`own_file`), and only file contents are copied, never links or permissions."""
    for name in names:
        if name == WEIGHTS_FILE and adapter.pickled:
            convert_pickle(adapter.folder, staged)
            continue
        source = own_file(adapter.folder, name, within=within)
        if source is not None:
            shutil.copyfile(source, staged / name)
    if (staged / WEIGHTS_FILE).is_file():
        _refuse_non_finite(staged / WEIGHTS_FILE, adapter.folder)


def non_finite(tensors: Iterable[tuple[str, Any]]) -> list[str]:
    """The names, in order, of the floating-point tensors among ``(name, tensor)`` that hold
    inf or NaN: an adapter of them answers NaN on every use. (float8 has no ``isfinite`` of
    its own: widened first.)"""
    import torch

    return [name for name, t in tensors if t.is_floating_point()
            and not bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())]


def _refuse_non_finite(weights: Path, folder: Path) -> None:
    """Refuse weights holding inf or NaN: every answer through them would be NaN (or one
    row's failure in the server), found only at use. One read of each tensor, on the way in."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:  # one tensor in memory at a time
        broken = non_finite((key, f.get_tensor(key)) for key in f.keys())
    if broken:
        raise InvalidAdapter(f"{folder}'s weights hold values that are not finite numbers (inf "
                             f"or NaN) in {len(broken)} tensor(s), first {broken[0]}: it was "
                             "saved broken; nothing was imported")


#: LoRA settings that change what the adapter does, with PEFT's defaults: an imported
#: adapter records those it sets otherwise, so its card and ``show`` tell its true ranks and
#: scales (``rank_pattern``, ``use_rslora``...), not ``r`` and ``lora_alpha`` alone.
_LORA_BASICS = ("r", "lora_alpha", "lora_dropout", "target_modules")
_LORA_DEFAULTS: dict[str, Any] = {
    "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
    "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
    "modules_to_save": None, "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
    "target_parameters": None, "trainable_token_indices": None,
}


def lora_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters an imported adapter's pocket book records: rank, alpha, dropout
    and targets, and every other :data:`_LORA_DEFAULTS` setting its config sets otherwise."""
    settings: dict[str, Any] = {k: config[k] for k in _LORA_BASICS if k in config}
    settings.update({k: config[k] for k, default in _LORA_DEFAULTS.items()
                     if config.get(k) not in (default, None, {}, [], "")})
    return settings


def _checkable(recorded: dict[str, Any] | None, folder: Path) -> dict[str, Any] | None:
    """``recorded`` where it hashes the config and weights it describes; else None, said: a
    record that proves nothing about the files beside it is not attached to them (its method,
    metrics and base could be another pocket book's), and the folder imports as plain PEFT."""
    if recorded is None:
        return None
    hashed = recorded.get("files")
    if isinstance(hashed, dict) and all(isinstance(hashed.get(n), str)
                                        for n in (CONFIG_FILE, WEIGHTS_FILE)):
        return recorded
    warnings.warn(f"{folder}: its {METADATA_FILE} records no SHA-256 of {CONFIG_FILE} and "
                  f"{WEIGHTS_FILE}, so it cannot show it describes them: its record (method, "
                  "trainer, metrics, base) is not used, and the folder is imported as a plain "
                  "PEFT adapter", AdapterWarning, stacklevel=3)
    return None


def import_peft_folder(library: Library, folder: Path, name: str, *, base: str | None = None,
                       trust_pickle: bool = False, source: dict[str, Any] | None = None,
                       within: Path | None = None) -> PocketBook:
    """Check a PEFT adapter against its base and add it to ``library``.

    A folder with a pocket book's record (``adapterkit.json``: an export) joins with that
    record — method, trainer, data, metrics, base — once the files it hashes are shown to be
    these (a file that differs is refused), and with a card rendered for the new entry; its base
    is the recorded one (``--base`` is checked against it), found on this machine by its
    fingerprint or name. A plain PEFT folder is recorded as ``lora`` made on ``base`` (default:
    the base its config names).

    Only the folder's own files are copied: a link that leads out of it (out of ``within``,
    for a Hub download its cache repo) is refused.

    :param source: where it came from, recorded in the metadata (default: this folder).
    """
    from adapterkit.base.fingerprints import fingerprint
    from adapterkit.base.resolve import canonical_spec, remember_base, resolve_base
    from adapterkit.library.card import config_base

    ref = library.reserve(name)
    adapter = read_adapter(folder, trust_pickle=trust_pickle, within=within)
    origin = Origin(str(folder), "exported", "it was changed since, or the copy is damaged",
                    advice=_RECORD_ADVICE, category=AdapterWarning)
    recorded = _checkable(read_record(own_file(folder, METADATA_FILE, within=within), origin),
                          folder)
    if recorded is not None:  # a pocket book's own folder: its record, not a plain "lora"
        meta = record_meta(recorded, origin)
        files = recorded_files(adapter, within=within, card=False)
        # the loss curve is shown, never loaded: a record without its hash is no warning
        verify_record(recorded, files, origin, cover=tuple(n for n in files
                                                           if not n.endswith(PROSE)))
        check_on_recorded_base(library, adapter, meta, base, name=ref.name, origin=origin,
                               by_name=True)
        source = dict(source or {"kind": "import", "folder": folder.resolve().name},
                      recorded_as=f"{meta.name}@{meta.version}")
        return import_recorded(library, adapter, meta, str(ref), files=files, source=source,
                               within=within, origin=origin, card=True)
    base_spec = base or adapter.config.get("base_model_name_or_path")
    if not base_spec:
        raise BaseMismatch(f"{folder} does not name its base; pass --base")
    _refuse_base_rewriting(adapter)  # before resolving: that may download the base
    base_source = resolve_base(str(base_spec), library.home)
    check_on_base(adapter, base_source.folder, name=ref.name)
    recorded = adapter.config.get("base_model_name_or_path")
    if base and recorded and str(recorded) != str(base) and not _same_base(
            str(recorded), base_source.folder, library.home):
        warnings.warn(f"{ref.name}: the adapter's config names base {recorded}; it is recorded "
                      f"as made on {base} because you passed --base", AdapterWarning,
                      stacklevel=2)
    fp = fingerprint(base_source.folder)
    base_source, base_spec = _as_alias(library.home, fp, base_source, str(base_spec))
    remember_base(library.home, fp, canonical_spec(str(base_spec), base_source))
    meta = PocketBookMeta(
        name=ref.name, version=library.version_to_save(ref),
        base={"name": base_source.name, "fingerprint": fp,
              "provenance": base_source.provenance},
        method="lora",  # a PEFT config does not record how its base was quantized
        hyperparameters=lora_settings(adapter.config),
        source=dict(source or {"kind": "import", "folder": folder.resolve().name},
                    pickled=adapter.pickled),
    )
    with library.draft() as staged:
        # named as a trained pocket book names its base: a Hub id where known, never a path
        config = dict(adapter.config, base_model_name_or_path=config_base(meta))
        (staged / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
        copy_files(adapter, staged, (WEIGHTS_FILE, CARD_FILE), within=within)
        return library.commit(staged, meta, name=str(ref))


#: what to do with a folder whose record does not match its files
_RECORD_ADVICE = (" — export it again, or, to import these files as a plain PEFT adapter "
                  f"without their record, move {METADATA_FILE} out of the folder")


def recorded_files(adapter: AdapterFiles, *, within: Path | None,
                   card: bool) -> dict[str, Path | None]:
    """The files of a folder with a record that join the library, name → the path to read:
    config, weights, loss-curve pictures, and with ``card`` its model card."""
    weights = PICKLE_FILE if adapter.pickled else WEIGHTS_FILE
    names = [CONFIG_FILE, weights] + ([CARD_FILE] if card else [])
    names += sorted(p.name for p in adapter.folder.glob("*.png"))
    files = {n: own_file(adapter.folder, n, within=within) for n in names}
    return {n: path for n, path in files.items() if path is not None}


def check_on_recorded_base(library: Library, adapter: AdapterFiles, meta: PocketBookMeta,
                           base: str | None, *, name: str, origin: Origin,
                           by_name: bool) -> None:
    """Import's checks against the base ``meta`` records, found on this machine by its
    fingerprint (or, with ``by_name``, by the name it records, where that gives the same
    fingerprint), else against ``base``. Without either: with ``by_name`` refused (pass
    --base), else said (it is checked when loaded). A ``base`` of another fingerprint is
    warned about: the pocket book is refused when attached to it."""
    from adapterkit.base.fingerprints import fingerprint
    from adapterkit.base.resolve import resolve_base

    target = _recorded_base(library.home, meta, by_name=by_name)
    advice = (f"its {METADATA_FILE} names the wrong base, or the weights were changed after it "
              "was written; nothing was imported")
    if base is not None:
        given = resolve_base(base, library.home).folder
        fp = fingerprint(given)
        if fp != meta.base_fingerprint:
            warnings.warn(
                f"this pocket book was made on base {meta.base.get('name')} (fingerprint "
                f"{meta.base_fingerprint[:12]}), not on {base} (fingerprint {fp[:12]}); it will "
                "be refused when attached to that base", origin.category, stacklevel=4)
        if target is None:
            target, advice = given, _PASS_BASE
    if target is None:
        _refuse_base_rewriting(adapter)  # needs no base: refused whatever the base
        where = (f"{meta.base.get('name')} (fingerprint {meta.base_fingerprint[:12]})")
        if by_name:
            raise BaseNotFound(f"{origin.label} was made on base {where}, which this adapterkit "
                               "home does not know (by that fingerprint or name): pass the base "
                               "it was made on with --base; nothing was imported")
        warnings.warn(f"{origin.label} was made on base {meta.base.get('name')}, which is not on "
                      "this machine, so its weights could not be checked against it now; they "
                      "are checked when it is loaded (or pass --base to check now)",
                      origin.category, stacklevel=4)
        return
    check_on_base(adapter, target, name=name, label=origin.label, advice=advice)


def _recorded_base(home: Path, meta: PocketBookMeta, *, by_name: bool) -> Path | None:
    """The folder of the base ``meta`` records, where this machine has it: the spec that
    loaded its fingerprint here, or (``by_name``) the name it records where that resolves to
    the same fingerprint. None where neither does."""
    from adapterkit.base.fingerprints import fingerprint
    from adapterkit.base.resolve import find_base, resolve_base
    from adapterkit.errors import AdapterkitError

    fp = meta.base_fingerprint
    specs = [find_base(home, fp) if fp else None]
    if by_name and fp:
        specs.append(str(meta.base.get("name") or "") or None)
    for spec in dict.fromkeys(s for s in specs if s):
        try:
            folder = resolve_base(spec, home).folder
        except AdapterkitError:
            continue
        if spec == specs[0] or fingerprint(folder) == fp:
            return folder
    return None


def import_recorded(library: Library, adapter: AdapterFiles, meta: PocketBookMeta, name: str,
                    *, files: dict[str, Path | None], source: dict[str, Any],
                    within: Path | None, origin: Origin, card: bool) -> PocketBook:
    """Add a checked folder with a record to ``library`` as ``name`` with ``meta`` (its
    record), ``source`` saying where it came from; tags are the library's own, so none carry
    over. With ``card`` a model card is rendered for the new entry (else ``files``' card, if
    any, is kept). Says which pocket books it was trained on top of this library lacks."""
    from adapterkit.library.card import write_card
    from adapterkit.library.names import parse_ref

    ref = parse_ref(name)
    meta.name, meta.version = ref.name, library.version_to_save(ref)  # as commit will: the card
    meta.source = dict(source, pickled=adapter.pickled) if adapter.pickled else source
    meta.tags = []
    meta.kind = "adapter"  # what was read is one PEFT adapter, whatever the file says
    missing = [r for r in meta.stacked_on if not library.exists(r)]
    if missing:
        warnings.warn(f"{origin.label} is trained on top of {', '.join(missing)}, which this "
                      f"library does not have: {origin.fetch} the ones it was trained on under "
                      "the same names before using it", origin.category, stacklevel=3)
    with library.draft() as staged:
        # trusted pickled weights are written as safetensors (copy_files converts them)
        copy_files(adapter, staged, tuple(WEIGHTS_FILE if n == PICKLE_FILE else n
                                          for n in files), within=within)
        if card:
            write_card(staged, meta)
        return library.commit(staged, meta, name=name)
