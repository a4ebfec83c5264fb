"""Pocket books in plain PEFT: what ``eval``/``generate`` run, and the independent reference.

Our own paths (sessions, stacks, flatten, merges, ``export --merged``) read the LoRA factors
themselves for speed and memory. Their checks compare against *this* — PEFT loading the same
folders through ``PeftModel.from_pretrained`` — so a bug in our math can never certify itself.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.base.compat import check_base
from adapterkit.errors import ConfigError, InvalidAdapter
from adapterkit.library.integrity import base_structure, check_book
from adapterkit.library.metadata import CONFIG_FILE, WEIGHTS_FILE
from adapterkit.library.peft_folder import read_config
from adapterkit.library.store import Library, PocketBook
from adapterkit.lora.factors import (
    check_base_copies,
    is_bias,
    refuse_inexact,
    resident_tensors,
    saved_names,
)

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.lora.combine import MergeInput
    from adapterkit.plugin_api.manager import PluginManager


def members_of(library: Library, book: PocketBook) -> list[tuple[PocketBook, float]]:
    """What ``book`` puts on the base, with each member's weight: a stack's members as saved,
    and what each was trained ``--on`` underneath it at weight 1 — unless the stack names that
    one itself, whose weight then wins (as in :meth:`Session.stack`). Underlays first; each
    checked to be the pocket book the stack was saved with, or ``book`` trained on
    (:func:`~adapterkit.lora.underlay.stack_members`)."""
    from adapterkit.lora.underlay import stack_members, with_underlays

    explicit = stack_members(library, book) if book.meta.kind == "stack" else [(book, 1.0)]
    return with_underlays(library, explicit)


def quantization_of(books: Iterable[PocketBook], plugins: PluginManager) -> str | None:
    """The quantization the base needs to load ``books`` as they were trained (``"4bit"`` if
    any was trained on a 4-bit base, as ``qlora``), else ``None``: one rule for every path
    that loads a pocket book, its underlays or a stack's members (the caller lists them,
    e.g. with :func:`members_of`), so a stack of a qlora book is not evaluated in float32
    while the book alone is evaluated in 4 bits."""
    entries = plugins.methods.entries
    return next((entries[b.meta.method].item.quantization for b in books
                 if b.meta.method in entries and entries[b.meta.method].item.quantization),
                None)


def peft_model(base: Any, book: PocketBook, *, adapter_name: str = "default",
               force: bool = False, library: Library | None = None,
               weights: list[tuple[PocketBook, float]] | None = None) -> Any:
    """Wrap ``base.model`` with ``book`` as a plain PEFT model (inference mode).

    A pocket book trained ``--on`` others brings its stack back, and a stack its members: all
    are loaded as PEFT adapters and active together (PEFT's multi-adapter support), each
    PEFT-computed scale multiplied by the member's weight. ``weights`` gives that whole list
    of ``(pocket book, weight)`` instead, as :func:`members_of` would (``book`` itself, unless
    it is a stack, and every member's underlays included: a list leaving one out is refused,
    never silently answered without it).

    PEFT puts its LoRA layers into ``base.model`` itself (no copy of the base is made), so the
    base is held by the returned model until you call its ``unload()``: meanwhile a session,
    a second ``peft_model`` or ``train`` on the base is refused, as is this call on a base a
    session or another PEFT model holds — each would silently compute with the other's LoRA.
    """
    from peft import PeftModel

    from adapterkit.base.load import Base
    from adapterkit.lora.slots import refuse_held, wrapped_by
    from adapterkit.lora.underlay import refuse_reward

    if not isinstance(base, Base):
        raise ConfigError(f"peft_model takes a loaded base, not {base!r:.80}: pass "
                          "adapterkit.load_base(...)")
    if not isinstance(book, PocketBook):
        raise ConfigError(f"peft_model takes a pocket book, not {book!r:.80}: pass "
                          "library.get(name)")
    items = members_of(library or Library(), book) if weights is None else \
        _checked_weights(book, weights)
    structure = base_structure(base)
    for item, w in items:
        check_base(base, item, force=force)
        check_book(item, structure)  # a damaged folder never reaches PEFT
        refuse_reward(item)
        if w != 1.0:  # PEFT's scale multiplies B A only: nothing else can be weighted
            _refuse_unweighable(item, w, base)
    names = [f"m{i}" for i in range(len(items) - 1)] + [adapter_name]
    refuse_held(base.model, wanted=f"peft_model(base, {book.ref})")
    with tempfile.TemporaryDirectory() as tmp:
        folders = [loadable_together(item, Path(tmp) / name, alone=len(items) == 1)
                   for (item, _), name in zip(items, names)]
        model = PeftModel.from_pretrained(base.model, str(folders[0]), adapter_name=names[0],
                                          is_trainable=False)
        try:
            for folder, name in zip(folders[1:], names[1:]):
                model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            if len(names) > 1:
                model.base_model.set_adapter(names,  # type: ignore[operator]
                                             inference_mode=True)
            _weigh(model, {name: (item.ref, w) for name, (item, w) in zip(names, items)})
        except BaseException:
            model.unload()  # the caller never gets the model: the base gets its layers back
            raise
    wrapped_by(base.model, f"the model peft_model() returned for {book.ref}",
               "that model's .unload()")
    model.eval()
    return model


def _checked_weights(book: PocketBook, weights: Any) -> list[tuple[PocketBook, float]]:
    """``weights`` as :func:`peft_model` takes it, or a refusal saying what to pass: a list of
    ``(pocket book, finite number)`` holding ``book`` (unless it is a stack) and what each
    member was trained ``--on``, each once, and no saved stack (its members, expanded)."""
    from adapterkit.lora.factors import finite_weight

    whole = f"adapterkit.members_of(library, {book.ref!r}) gives the whole list"
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ConfigError(f"weights must be a non-empty list of (pocket book, weight) pairs, "
                          f"not {weights!r:.80}: leave it out for {book.ref}'s own, or "
                          f"{whole}")
    out: list[tuple[PocketBook, float]] = []
    for pair in weights:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and isinstance(pair[0], PocketBook)):
            raise ConfigError(f"weights takes (pocket book, weight) pairs, not {pair!r:.80}")
        item, w = pair
        if not finite_weight(w):
            raise ConfigError(f"weights: the weight of {item.ref} must be a finite number, "
                              f"not {w!r}")
        if item.meta.kind == "stack":
            raise ConfigError(f"weights: {item.ref} is a saved stack; list its members "
                              f"instead ({whole.replace(book.ref, item.ref)})")
        out.append((item, float(w)))
    refs = [item.ref for item, _ in out]
    twice = sorted({r for r in refs if refs.count(r) > 1})
    if twice:
        raise ConfigError(f"weights names {', '.join(twice)} more than once: give each "
                          "pocket book one weight")
    if book.meta.kind != "stack" and book.ref not in refs:
        raise ConfigError(f"weights leaves out {book.ref}, the pocket book asked for: list it "
                          f"too ({whole})")
    for item, _ in out:
        missing = [r for r in item.meta.stacked_on if r not in refs]
        if missing:
            raise ConfigError(f"weights leaves out {', '.join(missing)}, which {item.ref} was "
                              f"trained on: list {'them' if len(missing) > 1 else 'it'} too, "
                              f"at weight 1 to keep {item.ref} as trained ({whole})")
    return out


def _refuse_unweighable(item: PocketBook, weight: float, base: Any) -> None:
    """Refuse a member at ``weight`` ≠ 1 whose adapter holds more than ``B A`` (the only part
    PEFT's scale multiplies). Base tensors PEFT saved beside it (``lm_head``'s weight beside an
    ``lm_head`` LoRA, biases) are compared with the resident base first, as on every other
    path: equal, they change nothing at any weight."""
    path = f"weighting it ({weight:g}) in a stack"
    instead = (f"give it weight 1 in the stack, or use it alone "
               f"(`adapterkit generate --adapter {item.ref}`)")
    refuse_inexact(item.ref, read_config(item.path), saved_names(item.path), path=path,
                   handled=("bias=", "saved copies of base weights"), instead=instead)
    check_base_copies(item.path, ref=item.ref, base_weights=resident_tensors(base.model),
                      instead=instead.capitalize())


def _weigh(model: Any, weights: dict[str, tuple[str, float]]) -> None:
    """Multiply PEFT's own per-layer scale of each adapter by its stack weight; refuse a
    weight that makes an adapter's scaled factors overflow their number format, as every
    other path does (:class:`~adapterkit.lora.factors.WeightOverflow`)."""
    from peft.tuners.lora import LoraLayer

    from adapterkit.lora.factors import WeightOverflow

    if all(w == 1.0 for _, w in weights.values()):
        return
    peaks: dict[str, tuple[float, Any]] = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, (_, w) in weights.items():
                if name in module.scaling:
                    b: Any = module.lora_B[name].weight
                    peak = module.scaling[name] * float(b.abs().max()) if b.numel() else 0.0
                    peaks[name] = (max(peak, peaks.get(name, (0.0, b.dtype))[0]), b.dtype)
                    module.scaling[name] *= w
    for name, (peak, dtype) in peaks.items():
        ref, w = weights[name]
        WeightOverflow.check(w, peak, dtype, ref=ref)


def loadable_together(book: PocketBook | MergeInput, copy: Path, *, alone: bool) -> Path:
    """``book``'s folder (a pocket book's, or a merge strategy's member's), in a form PEFT
    loads beside other adapters: PEFT takes only one adapter with ``bias != "none"`` at a time,
    so one that says so but saved no bias tensor (the same adapter) is given as a copy that
    says ``"none"``; one that saved biases is refused, naming them."""
    config = read_config(book.path)
    if alone or config.get("bias", "none") == "none":
        return book.path
    if any(is_bias(n) for n in saved_names(book.path)):
        raise InvalidAdapter(f"{book.ref} saves biases (bias={config['bias']!r}), and PEFT "
                             "loads only one adapter with biases at a time; use it alone")
    copy.mkdir(parents=True)
    shutil.copy(book.path / WEIGHTS_FILE, copy)
    (copy / CONFIG_FILE).write_text(json.dumps(dict(config, bias="none")),
                                              encoding="utf-8")
    return copy
