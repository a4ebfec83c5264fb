"""Combining pocket books: merge (through a registered strategy) and stack entries.

The core checks what every strategy needs — same base, single pocket books, as many weights as
members, finite weights (non-negative where the strategy says so), a density in (0, 1] where one
is used and none where it is not, a rank only where the strategy uses one — then
hands the members to the strategy and saves the result as an ordinary pocket book that records
its parents and method.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import BaseMismatch, ConfigError, InvalidAdapter, PluginError
from adapterkit.library.integrity import check_book, held_weights, recorded_structure
from adapterkit.library.metadata import CONFIG_FILE, WEIGHTS_FILE, PocketBookMeta
from adapterkit.library.names import weight_text
from adapterkit.library.peft_folder import non_finite, read_config
from adapterkit.library.store import Library, PocketBook
from adapterkit.lora.factors import (
    Factors,
    WeightOverflow,
    concat,
    finite_weight,
    pad,
    parse_key,
    peak_of,
    plain_config,
    read_factors,
    stored_tensors,
    tensors_of,
)
from adapterkit.lora.factors import scale_of as factors_scale_of

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.base.load import BaseStructure
    from adapterkit.plugin_api.manager import PluginManager


@dataclass
class MergeInput:
    """One member of a merge, as strategies see it."""

    ref: str
    path: Path
    config: dict[str, Any]
    #: ``(module, leaf) -> tensor`` of the base as stored, to check base tensors PEFT saved
    #: with the adapter (see :func:`adapterkit.lora.factors.stored_tensors`).
    base_weights: Callable[[str, str], Any] | None = None
    _factors: dict[str, Factors] | None = field(default=None, init=False, repr=False,
                                                compare=False)

    def tensors(self) -> dict[str, Any]:
        """Every saved tensor under its PEFT name."""
        from safetensors.torch import load_file

        return load_file(str(self.path / WEIGHTS_FILE))

    def factors(self, *, path: str) -> dict[str, Factors]:
        """module path → LoRA factors with PEFT's per-layer scale; refuses, naming the
        feature, what ``path`` (e.g. ``"merge --method exact_svd"``) cannot combine exactly.

        ``fan_in_fan_out`` (GPT-2's Conv1D) is no obstacle here: the factors have the same
        shapes, the combined adapter keeps the flag, and PEFT transposes when it applies it.
        Read once: the core's check before the strategy runs and the strategy share them.
        """
        if self._factors is None:
            self._factors = read_factors(self.path, ref=self.ref, path=path,
                                         handles=("fan_in_fan_out",),
                                         base_weights=self.base_weights)
        return self._factors


@dataclass
class MergeOutput:
    """What a strategy returns: a PEFT adapter config and its tensors (PEFT key names)."""

    config: dict[str, Any]
    tensors: dict[str, Any]


def inputs_of(library: Library, books: list[PocketBook]) -> list[MergeInput]:
    """The members as strategies see them, with the base as stored to check against; each
    member's files are checked first (:func:`adapterkit.library.integrity.check_book`)."""
    structure = recorded_structure(books[0], library.home)  # members share one base
    for b in books:
        check_book(b, structure)
    stored = stored_base(library, books[0])  # (checked by the caller)
    return [MergeInput(b.ref, b.path, read_config(b.path), base_weights=stored) for b in books]


def stored_base(library: Library, book: PocketBook) -> Callable[[str, str], Any] | None:
    """The stored tensors of ``book``'s base, or None where the base is not on this machine
    (then base tensors saved with an adapter are refused, not guessed)."""
    from adapterkit.base.resolve import base_spec_for, resolve_base
    from adapterkit.errors import AdapterkitError

    try:
        folder = resolve_base(base_spec_for(book.meta.base, library.home), library.home).folder
    except AdapterkitError:
        return None
    return stored_tensors(folder)


def check_weights(refs: list[str], weights: list[float], *, allow_negative: bool,
                  method: str) -> list[float]:
    """``weights`` as floats, one per pocket book of ``refs``, or a :class:`ConfigError`."""
    if not isinstance(weights, (list, tuple)):
        raise ConfigError(f"weights must be a list of numbers, one per pocket book, got "
                          f"{weights!r}")
    if len(weights) != len(refs):
        raise ConfigError(f"{len(refs)} pocket books but {len(weights)} weights; give one weight "
                          "per pocket book")
    for ref, w in zip(refs, weights):
        if not finite_weight(w):
            raise ConfigError(f"weight for {ref} must be a finite number, got {w!r}")
        if w < 0 and not allow_negative:
            raise ConfigError(f"method {method} does not accept negative weights ({ref}: {w})")
    return [float(w) for w in weights]


def merge(library: Library, refs: list[str], weights: list[float] | None, *, method: str,
          name: str, rank: int | None = None, density: float | None = None,
          plugins: PluginManager | None = None,
          load_base: Callable[[], Any] | None = None, seed: int | None = None) -> PocketBook:
    """Merge pocket books ``refs`` with ``method`` into a new pocket book ``name``.

    :param seed: for strategies that draw random numbers (``uses_seed``: DARE's random drop;
        default 0, recorded): the same merge with the same seed gives the same weights.
        Refused for the others, where it would do nothing.
    """
    from adapterkit.base.resolve import base_spec_for
    from adapterkit.plugin_api.manager import default_plugin_manager

    _check_library(library, "merge")
    pm = plugins or default_plugin_manager()
    strategy = pm.merge_strategies.get(method)
    if len(_check_refs(refs, "merge")) < 2:
        raise ConfigError("merge needs at least two pocket books")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
        raise ConfigError(f"rank must be an integer, got {rank!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if density is not None and not finite_weight(density):
        raise ConfigError(f"density must be a number in (0, 1], got {density!r}")
    target = library.reserve(name)
    books = [library.get(r) for r in refs]
    for b in books:
        if b.meta.kind == "stack":
            raise ConfigError(f"{b.ref} is a stack, which has no adapter files to merge: "
                              f"flatten it first ({flatten_command(b)}) and merge that, or "
                              "merge its members")
    weights = check_weights([b.ref for b in books], _or_ones(weights, books),
                            allow_negative=strategy.allows_negative, method=method)
    check_underlays(books, "the merge")
    fingerprints = {b.meta.base_fingerprint for b in books}
    if len(fingerprints) > 1:
        listing = ", ".join(f"{b.ref} ({b.meta.base.get('name')})" for b in books)
        raise BaseMismatch(f"cannot merge pocket books of different bases: {listing}")
    if strategy.uses_density:
        if density is None or not 0 < density <= 1:
            raise ConfigError(f"method {method} needs --density in (0, 1], got {density}")
    elif density is not None:
        raise ConfigError(f"method {method} does not use --density; leave it out (methods "
                          f"that do: {', '.join(_using(pm, 'uses_density'))})")
    if rank is not None and not strategy.uses_rank:
        raise ConfigError(f"method {method} does not use --rank (it sets the result's rank "
                          "itself); leave it out, or choose a method that does: "
                          f"{', '.join(_using(pm, 'uses_rank'))}")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be at least 1, got {rank}")
    if seed is not None and not strategy.uses_seed:
        raise ConfigError(f"method {method} draws no random numbers, so --seed would do "
                          f"nothing; leave it out (methods that do: "
                          f"{', '.join(_using(pm, 'uses_seed')) or 'none installed'})")
    seeded = {"seed": 0 if seed is None else seed} if strategy.uses_seed else {}
    inputs = inputs_of(library, books)
    members = [item.factors(path=f"merge --method {method}") for item in inputs]
    for item, w, factors in zip(inputs, weights, members):  # what no strategy can combine
        # exactly is refused here, for all of them; so is a weight the factors cannot carry
        _weight_fits(item.ref, w, factors)
    if rank is not None:  # (uses_rank, checked above)
        _check_rank(rank, members, method)

    def base_model() -> Any:
        if load_base is not None:
            return load_base()
        from adapterkit.base.load import load_base as load

        spec = base_spec_for(books[0].meta.base, library.home)
        return load(spec, home=library.home).model

    out = strategy.merge(adapters=inputs, weights=weights, rank=rank, density=density,
                         base_model=base_model, **_if_taken(strategy.merge, **seeded))
    _check_output(out, f"merge strategy {method!r} (plugin "
                       f"{pm.merge_strategies.entries[method].plugin!r})",
                  recorded_structure(books[0], library.home))
    meta = PocketBookMeta(
        name=target.name, version=0, base=dict(books[0].meta.base),
        method=_method_of(books, pm), trainer=None, parents=[b.ref for b in books],
        hyperparameters={"merge_method": method, "weights": weights, "rank": out.config.get("r"),
                         "density": density, **seeded},
        source={"kind": "merge", "method": method},
    )
    return save_adapter(library, out, meta, str(target))


def _method_of(books: list[PocketBook], pm: PluginManager) -> str:
    """The adapter method a merge or flattened stack of ``books`` records: that of a member
    trained on a quantized base (``qlora``), whose ΔW was learnt against that base — so that
    ``generate``, ``eval`` and the servers load the base as for the members themselves (one
    ``qlora`` member makes a stack a 4-bit one); else ``lora``."""
    entries = pm.methods.entries
    return next((b.meta.method for b in books if b.meta.method in entries
                 and entries[b.meta.method].item.quantization), "lora")


def _check_rank(rank: int, members: list[dict[str, Factors]], method: str) -> None:
    """Refuse a ``--rank`` no layer can hold, for every strategy that takes one: a layer's ΔW
    (out × in) has at most ``min(out, in)`` directions, and PEFT's SVD methods give such a layer
    fewer columns than the ``r`` they record (an adapter that does not load)."""
    sizes = {module: min(int(f.b.shape[0]), int(f.a.shape[1]))
             for factors in members for module, f in factors.items()}
    if sizes and rank > min(sizes.values()):
        module = min(sizes, key=lambda m: sizes[m])
        raise ConfigError(f"--rank {rank} is more than {module} can hold with {method} (its "
                          f"ΔW has at most {sizes[module]} directions): give --rank at most "
                          f"{sizes[module]}")


def _if_taken(method: Callable[..., Any], **options: Any) -> dict[str, Any]:
    """``options`` where ``method`` takes them (named, or through ``**options``): arguments a
    later core added (``seed``) are not forced on a strategy written before them."""
    import inspect

    params = inspect.signature(method).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return options
    return {k: v for k, v in options.items() if k in {p.name for p in params}}


def _check_library(library: Any, verb: str) -> None:
    """Refuse a first argument that is not a :class:`Library` (a home path, say)."""
    if not isinstance(library, Library):
        raise ConfigError(f"{verb} takes the library first: pass adapterkit.Library() (or "
                          f"Library(home=...)), got {library!r}")


def _check_refs(refs: Any, verb: str) -> list[Any]:
    """``refs`` as a list, refused where it is not a list or tuple (a single string would
    otherwise be read letter by letter); each one is checked where it is looked up."""
    if not isinstance(refs, (list, tuple)):
        example = f" ([{refs!r}])" if isinstance(refs, str) else ""
        raise ConfigError(f"{verb} takes a list of pocket-book references{example}, got "
                          f"{refs!r}")
    return list(refs)


def _or_ones(weights: Any, books: list[PocketBook]) -> Any:
    """``weights`` as given, or weight 1 for each of ``books`` where it is ``None``."""
    return [1.0] * len(books) if weights is None else weights


def _check_output(out: Any, who: str, structure: BaseStructure | None) -> None:
    """A strategy's result is a PEFT adapter of this base before it is saved: the library
    would otherwise hold a pocket book that fails (or changes nothing) on every load, and
    ``verify`` would blame the files rather than the strategy that made them."""
    from adapterkit.library.peft_folder import AdapterFiles, config_problems, fit_problems

    if not isinstance(out, MergeOutput) or not isinstance(out.config, dict) \
            or not isinstance(out.tensors, dict):
        raise PluginError(f"{who} returned {type(out).__name__}, not an adapterkit.MergeOutput "
                          "(config dict, tensors dict); nothing was saved. Fix the strategy, "
                          "or merge with another --method")
    if not out.tensors:
        raise PluginError(f"{who} returned no tensors: the result would change nothing; "
                          "nothing was saved")
    import torch

    odd = next((k for k, v in out.tensors.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise PluginError(f"{who} returned a {type(out.tensors[odd]).__name__} for {odd}, not a "
                          "torch tensor; nothing was saved")
    broken = sorted(non_finite(out.tensors.items()))
    if broken:
        raise PluginError(f"{who} returned values that are not finite numbers ({len(broken)} "
                          f"tensor(s), first {broken[0]}); nothing was saved. Smaller weights "
                          "may fit the factors' number format; else the strategy is at fault")
    if structure is None:  # the base is not on this machine: its loads check the fit
        return
    files = AdapterFiles(folder=Path("merge"), config=out.config, pickled=False,
                         shapes={k: tuple(v.shape) for k, v in out.tensors.items()})
    problems = fit_problems(files, structure)
    if not problems:  # then its factors against its own config (rank, targets), as loads do
        disagree = config_problems(files, structure)
        if disagree:
            more = f" (and {len(disagree) - 1} more)" if len(disagree) > 1 else ""
            raise PluginError(f"{who} returned an adapter whose config disagrees with its "
                              f"factors: {disagree[0]}{more}; nothing was saved. Fix the "
                              "strategy, or merge with another --method")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PluginError(f"{who} returned an adapter that does not fit the base: "
                          f"{problems[0]}{more}; nothing was saved. Fix the strategy, or "
                          "merge with another --method")


def _using(pm: PluginManager, flag: str) -> list[str]:
    """The registered merge methods that set ``flag`` (``uses_density``, ``uses_rank``)."""
    return [n for n in pm.merge_strategies.names()
            if getattr(pm.merge_strategies.get(n), flag, False)]


def flatten_command(book: PocketBook) -> str:
    """The command that saves stack ``book`` as one adapter."""
    weights = dict(book.meta.hyperparameters.get("weights", {}))  # saved with sorted keys
    return (f"adapterkit stack {' '.join(book.meta.parents)} --weights "
            f"{','.join(weight_text(weights[p]) for p in book.meta.parents)} --flatten --name NAME")


def save_adapter(library: Library, out: MergeOutput, meta: PocketBookMeta,
                 name: str) -> PocketBook:
    """Write a config + tensors as a standard PEFT folder into the library (atomic); refused
    where a tensor is not finite (every strategy's result, plugins' too, passes here)."""
    from safetensors.torch import save_file

    from adapterkit.library.card import write_card

    broken = sorted(non_finite(out.tensors.items()))
    if broken:
        raise ConfigError(f"{name}'s factors are not finite numbers ({len(broken)} tensor(s), "
                          f"first {broken[0]}): a weight too large for their number format, "
                          "or a member whose own factors are not finite; nothing was saved — "
                          "give smaller weights, or check the members with `adapterkit "
                          "verify`")

    with library.draft() as staged:
        (staged / CONFIG_FILE).write_text(json.dumps(out.config, indent=2), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in out.tensors.items()}, staged / WEIGHTS_FILE,
                  metadata={"format": "pt"})
        write_card(staged, meta)
        return library.commit(staged, meta, name=name)


def concatenate(inputs: list[MergeInput], weights: list[float], *,
                path: str = "this merge") -> MergeOutput:
    """One PEFT adapter equal to the weighted stack: ranks concatenated, exact (no SVD).

    Modules that some members do not target get zero rows, so every module has the same rank.
    """
    if not isinstance(weights, (list, tuple)) or len(weights) != len(inputs) or not all(
            finite_weight(w) for w in weights):
        raise ConfigError(f"{path}: concatenate needs one finite weight per pocket book "
                          f"({len(inputs)}), got {weights!r}")
    members = [(i.factors(path=path), w, i.ref) for i, w in zip(inputs, weights)]
    modules = sorted(set().union(*(f.keys() for f, _, _ in members)))
    blocks = {m: concat([(f[m], w) for f, w, _ in members if m in f],
                        names=[ref for f, _, ref in members if m in f]) for m in modules}
    rank = max(a.shape[0] for a, _ in blocks.values())
    blocks = {m: pad(a, b, rank) for m, (a, b) in blocks.items()}
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    return MergeOutput(plain_config(inputs[0].config, rank=rank, target_modules=targets),
                       tensors_of(blocks))


# -- kept for plugins written against 0.1 (documented in docs/plugins.md) --------------------

def lora_pairs(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """PEFT tensor names → ``{module path: {"A": tensor, "B": tensor}}``."""
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name = parse_key(key)
        if name.part in ("A", "B"):
            pairs.setdefault(name.module, {})[name.part] = tensor
    return pairs


def scale_of(config: dict[str, Any], rank_or_module: int | str) -> float:
    """PEFT's scale. Give the module path: with an int rank, ``rank_pattern``/``alpha_pattern``
    cannot be honoured, so an adapter that has them is refused rather than scaled wrongly."""
    if isinstance(rank_or_module, str):
        return factors_scale_of(config, rank_or_module)
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ConfigError("this adapter has rank_pattern/alpha_pattern: call scale_of(config, "
                          "module_path), or MergeInput.factors(), for per-layer scales")
    # without patterns every layer has the config's rank and alpha: PEFT's rule, one copy
    return factors_scale_of(config, "")


def lora_config(template: dict[str, Any], *, rank: int, alpha: float,
                target_modules: list[str]) -> dict[str, Any]:
    """A plain LoRA config for a merged adapter, based on a member's config."""
    config = plain_config(template, rank=rank, target_modules=target_modules)
    config["lora_alpha"] = alpha
    return config


def _weight_fits(ref: str, weight: float, factors: dict[str, Factors]) -> None:
    """Refuse ``weight`` on ``ref`` where its scaled factors would overflow their format
    (:class:`~adapterkit.lora.factors.WeightOverflow`), before any base loads."""
    if factors:
        WeightOverflow.check(weight, peak_of(factors.values()),
                             next(iter(factors.values())).b.dtype, ref=ref)


def check_underlays(books: list[PocketBook], action: str) -> None:
    """Refuse to fold a pocket book trained ``--on`` others into one adapter without them:
    the result would silently lose what it was trained on top of."""
    named = {b.ref: b for b in books}
    missing = sorted({u for b in books for u in b.meta.stacked_on if u not in named})
    if missing:
        needy = ", ".join(b.ref for b in books if set(b.meta.stacked_on) & set(missing))
        raise ConfigError(f"{needy} is trained on top of {', '.join(missing)}, which {action} "
                          "would leave out; add it (weight 1 keeps it as it was trained)")
    from adapterkit.lora.underlay import check_under

    for b in books:  # and the one named is the one it was trained on, not a namesake
        for u in b.meta.stacked_on:
            check_under(b, named[u])


def stack(library: Library, refs: list[str], weights: list[float] | None, *, name: str,
          flatten: bool = False) -> PocketBook:
    """Save a stack: an entry referencing its members, or with ``flatten`` one PEFT adapter."""
    from adapterkit.library.metadata import CARD_FILE

    _check_library(library, "stack")
    if not _check_refs(refs, "stack"):
        raise ConfigError("stack needs at least one pocket book")
    target = library.reserve(name)
    books = [library.get(r) for r in refs]
    weights = check_weights([b.ref for b in books], _or_ones(weights, books),
                            allow_negative=True, method="stack")
    for ref in dict.fromkeys(b.ref for b in books):  # a stack records one weight per member
        given = [(r, w) for r, w, b in zip(refs, weights, books) if b.ref == ref]
        if len(given) > 1:
            raise ConfigError(
                f"{ref} is named {len(given)} times ({', '.join(r for r, _ in given)}); name "
                f"it once, with the sum of its weights ({sum(w for _, w in given):g})")
    if len({b.meta.base_fingerprint for b in books}) > 1:
        raise BaseMismatch("cannot stack pocket books of different bases: " + ", ".join(
            f"{b.ref} ({b.meta.base.get('name')})" for b in books))
    kinds = [b.ref for b in books if b.meta.kind != "adapter"]
    if kinds:
        raise ConfigError(f"stack members must be single pocket books: {', '.join(kinds)}")
    members = dict(zip([b.ref for b in books], weights))
    if flatten:  # (a saved stack's base is loaded as its members need, member by member)
        from adapterkit.plugin_api.manager import default_plugin_manager

        method = _method_of(books, library.plugins or default_plugin_manager())
    else:
        method = "lora"
    meta = PocketBookMeta(name=target.name, version=0, base=dict(books[0].meta.base),
                          method=method, parents=list(members),
                          hyperparameters={"weights": members, "flattened": flatten},
                          kind="adapter" if flatten else "stack",
                          source={"kind": "stack"})
    if flatten:
        check_underlays(books, "flattening")
        inputs = inputs_of(library, books)
        return save_adapter(library, concatenate(inputs, weights, path="stack --flatten"),
                            meta, str(target))
    for b, w in zip(books, weights):  # a stack of a damaged pocket book would fail only when
        check_book(b)                 # loaded; so would a weight its factors cannot carry
        if w != 1.0:
            try:  # (features only PEFT applies are for PEFT to refuse, when it weighs them)
                weighed = read_factors(b.path, ref=b.ref, path="a saved stack")
            except InvalidAdapter:
                continue
            _weight_fits(b.ref, w, weighed)
    # each member's weights as saved: expanding the stack refuses another pocket book saved
    # under a member's name later (adapterkit.lora.underlay.stack_members), as --on does
    meta.stacked_on_sha256 = {b.ref: held_weights(b) for b in books}
    from adapterkit.library.card import write_card

    with library.draft() as staged:
        write_card(staged, meta)
        assert (staged / CARD_FILE).exists()
        return library.commit(staged, meta, name=str(target), members_here=True)
