"""Sessions: one resident base, pocket books attached, swapped, stacked and switched off.

Refuses a pocket book made on another base (fingerprint mismatch) unless forced, because a LoRA
on the wrong base still "works" — it just produces quietly wrong answers. For the same reason a
pocket book answers only on a base loaded as it was trained (a ``qlora`` one: in 4 bits), the
rule :func:`~adapterkit.runtime.peft_model.quantization_of` that ``generate`` and ``eval`` follow.
An unknown name is an error, never a silent answer from the plain base.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapterkit.base.compat import check_base
from adapterkit.base.load import Base
from adapterkit.errors import (
    BaseMismatch,
    ConfigError,
    InexactAdapter,
    InvalidAdapter,
    PocketBookNotFound,
)
from adapterkit.library.integrity import base_structure, check_book
from adapterkit.library.names import weight_text
from adapterkit.library.store import Library, PocketBook
from adapterkit.lora.factors import (
    Factors,
    concat,
    finite_weight,
    pad,
    read_factors,
    resident_tensors,
)
from adapterkit.runtime.peft_model import members_of, quantization_of

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.plugin_api.manager import PluginManager

# -- fast sessions ----------------------------------------------------------------------------

@dataclass
class LoadedBook:
    """An attached pocket book: its LoRA factors per module path, ready to bind."""

    ref: str
    rank: int
    #: module path → its factors (PEFT's per-layer scale included)
    factors: dict[str, Factors]
    prepared: list[tuple[Any, Any, Any, Any]] = field(default_factory=list)
    #: The pocket books it was trained on top of: activated with it (bottom first).
    stacked_on: list[str] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(f.a.numel() * f.a.element_size() + f.b.numel() * f.b.element_size()
                   for f in self.factors.values())


def load_book(book: PocketBook, *, dtype: Any, device: Any, path: str = "a session",
              base_weights: Any = None) -> LoadedBook:
    """A pocket book's LoRA factors (one safetensors read), refused if ``path`` cannot apply
    it exactly (see :func:`adapterkit.lora.factors.refuse_inexact`)."""
    factors = read_factors(book.path, ref=book.ref, path=path, dtype=dtype, device=device,
                           base_weights=base_weights)
    rank = max((f.rank for f in factors.values()), default=0)
    return LoadedBook(book.ref, rank, factors, stacked_on=list(book.meta.stacked_on))


def load_checked(base: Base, book: PocketBook, *, model: Any, dtype: Any, path: str,
                 force: bool = False) -> LoadedBook:
    """Every check a pocket book passes before it is put on a resident base, then its factors.

    The one gate of the fast paths (sessions, the server): the book is a single adapter, made
    on this base (:func:`check_base`, unless ``force``), its files as saved and fitting the base
    (:func:`check_book`), not a reward head, applicable exactly by ``path`` (e.g. ``"a
    session"``), and every layer it targets is a linear layer of ``model`` (the base, possibly
    with its linear layers wrapped).
    """
    if book.meta.kind != "adapter":
        raise InvalidAdapter(f"{book.ref} is a {book.meta.kind}; attach its members")
    from adapterkit.lora.underlay import refuse_reward

    check_base(base, book, force=force)
    check_book(book, base_structure(base))  # a damaged folder is never read
    refuse_reward(book)
    loaded = load_book(book, dtype=dtype, device=_device(model), path=path,
                       base_weights=resident_tensors(model))
    missing = [p for p in loaded.factors if not _is_linear(model, p)]
    if missing:
        raise BaseMismatch(f"{book.ref} targets {', '.join(missing[:3])}, which this base "
                           "does not have as linear layers")
    return loaded


class Session:
    """One frozen base resident in memory, with pocket books attached and swapped in place.

    Build it with :func:`adapterkit.open`. ``swap(name)`` makes one pocket book active,
    ``stack({a: 1, b: 0.5})`` several at once (their deltas weighted and summed, exactly),
    ``off()`` the plain base. ``generate(..., adapter=...)`` picks per call.

    A session owns its base's layers until :meth:`close`: one session per base at a time,
    and none while a PEFT model (``peft_model``, ``train()``'s ``result.model``) holds them —
    refused, since the two would silently add each other's LoRA (or, closing, take it away).

    What is made active must have been trained on a base loaded as this one is (see
    :func:`refuse_other_quantization`); ``any_quantization`` lifts that, where answering as
    plain PEFT on this base is what is wanted (:func:`adapterkit.runtime.verify.verify`
    compares every path on one float32 base on purpose, and records so).
    """

    def __init__(self, base: Base, library: Library, *, rank: int = 0,
                 any_quantization: bool = False) -> None:
        from adapterkit.lora.slots import claim

        # (refused if a session, a serving engine or a PEFT model holds it)
        claim(base.model, self, wanted="opening a session on it",
              held="a session is open on this base", free="session.close()")
        self.closed = False
        self.base = base
        self.library = library
        self.any_quantization = any_quantization
        #: The attached pocket books' library entries, for the quantization rule on a swap.
        self.pocket_books: dict[str, PocketBook] = {}
        self.model = base.model
        self.books: dict[str, LoadedBook] = {}
        self.slots: dict[str, Any] = {}
        self.rank = rank
        self.active: dict[str, float] = {}
        self._stack_cache: dict[tuple, LoadedBook] = {}

    def describe(self) -> str:
        """What the session holds, for a refusal that names it."""
        return (f"attached: {', '.join(self.books) or 'none'}; active: "
                f"{', '.join(self.active) or 'none'}")

    def _refuse_other_quantization(self, books: list[PocketBook]) -> None:
        """Refuse to answer with ``books`` together on this base unless it is loaded as they
        were trained (nothing is checked with ``any_quantization``).

        The advice names the base by its spec, not ``base``: the caller's loaded base is in the
        other quantization, and held by this session until it is closed."""
        if self.any_quantization:
            return
        plugins = _plugins(self.library)
        need = quantization_of(books, plugins)
        if need == self.base.quantization:
            return  # (the hot path of every swap: no file is read)
        from adapterkit.base.resolve import base_spec_for

        first = next(b.ref for b in books if quantization_of([b], plugins) == need)
        spec = base_spec_for({"fingerprint": self.base.fingerprint, "name": self.base.name},
                             self.library.home)
        refuse_other_quantization(
            books, self.base.quantization, self.library, holder="this session",
            fix=f"close this session and open one that loads the base as {first} was trained: "
                f"adapterkit.open({spec!r}, attach=[{first!r}]) (or `adapterkit chat --adapter "
                f"{first}`), or pass any_quantization=True to answer on this one as plain PEFT "
                "does")

    def _entry(self, ref: str) -> PocketBook:
        """The pocket book ``ref`` names: the attached one :meth:`_key` picks, else the
        library's (nothing is attached)."""
        try:
            return self.pocket_books[self._key(ref)]
        except PocketBookNotFound:
            return self.library.get(ref)

    def _with_underlays(self, books: Iterable[PocketBook]) -> list[PocketBook]:
        """``books`` and what each was trained ``--on``: the set :meth:`stack` makes active
        with them, for the quantization rule before anything is attached (from the attached
        entries where it can: no weights are hashed on a hot swap; attaching checks them)."""
        out: dict[str, PocketBook] = {}
        from adapterkit.lora.underlay import needed

        for book in books:
            for ref in book.meta.stacked_on:
                try:
                    under = self._entry(ref)
                except PocketBookNotFound:  # removed since (rm --force): said naming both
                    under = needed(self.library, book, ref)
                out.setdefault(under.ref, under)
            out[book.ref] = book
        return list(out.values())

    def _check_open(self) -> None:
        if self.closed:
            raise ConfigError("this session is closed; open a new one with "
                              "adapterkit.open(base)")

    # -- attaching ---------------------------------------------------------------------------

    def _key(self, ref: str) -> str:
        """The attached pocket book ``ref`` names (``name`` = latest attached version)."""
        self._check_open()
        _check_ref(ref)
        if ref in self.books:
            return ref
        matches = sorted((k for k in self.books if k.split("@")[0] == ref),
                         key=lambda k: int(k.split("@")[1]))
        if matches:
            return matches[-1]
        raise PocketBookNotFound(
            f"{ref!r} is not attached to this session; attached: "
            f"{', '.join(self.books) or 'none'}")

    def attach(self, ref: str, *, force: bool = False) -> str:
        """Load a pocket book from the library (one file read) and keep it ready to swap in."""
        from adapterkit.lora import slots as slot_mod

        self._check_open()
        _check_ref(ref)
        book = self.library.get(ref)
        if book.ref in self.books:
            return book.ref
        from adapterkit.lora.underlay import below

        below(self.library, book)  # what it was trained on is still what those names hold
        if book.meta.kind == "adapter":
            self._refuse_never_active(book)
        first_slot = next(iter(self.slots.values()), None)
        dtype = first_slot.lora_A.dtype if first_slot is not None else _dtype(self.model)
        loaded = load_checked(self.base, book, model=self.model, dtype=dtype,
                              path="a session", force=force)
        new_slots = [p for p in loaded.factors if p not in self.slots]
        for path in new_slots:
            self.slots[path] = slot_mod.wrap(self.model, path)
        self.books[book.ref] = loaded
        self.pocket_books[book.ref] = book
        if new_slots or loaded.rank > self.rank:
            self.rank = max(self.rank, loaded.rank)
            self._prepare_all()
        else:
            self._prepare(loaded)
        return book.ref

    def _refuse_never_active(self, book: PocketBook) -> None:
        """Refuse to attach a pocket book no swap or stack could make active on this base: one
        that (with what it was trained ``--on``) needs a quantized base this one is not —
        adding members never lifts that need. A plain one on a 4-bit base is attached: stacked
        with a ``qlora`` one it answers as ``eval`` has it (swapped in alone it is refused)."""
        members = self._with_underlays([book])
        if quantization_of(members, _plugins(self.library)) is not None:
            self._refuse_other_quantization(members)

    def _attached(self, ref: str, *, force: bool = False) -> str:
        """The key of ``ref``, attaching it first if needed (no disk read when attached)."""
        try:
            return self._key(ref)
        except PocketBookNotFound:
            return self.attach(ref, force=force)

    def detach(self, ref: str) -> None:
        """Forget a pocket book and free its tensors (switching it off first if active)."""
        key = self._key(ref)
        if key in self.active:
            self.off()
        del self.books[key]
        self.pocket_books.pop(key, None)
        self._stack_cache = {k: v for k, v in self._stack_cache.items()
                             if key not in dict(k)}

    def _prepare_all(self) -> None:
        """Pad every slot to the session's rank and prepare every book and stack again; then
        bind what ``active`` names again (padding binds every slot to zeros: an attach that
        raised the rank left the plain base answering while ``active`` named a book)."""
        for slot in self.slots.values():
            slot.pad_to(self.rank)
        for book in list(self.books.values()) + list(self._stack_cache.values()):
            self._prepare(book)
        self._zeros = [(slot, *slot.zeros) for slot in self.slots.values()]
        self._bind_active()

    def _bind_active(self) -> None:
        if not self.active:
            prepared = self._zeros
        elif list(self.active.values()) == [1.0] and len(self.active) == 1:
            prepared = self.books[next(iter(self.active))].prepared
        else:
            prepared = self._stack_cache[tuple(sorted(self.active.items()))].prepared
        self._bind(prepared, self.active)

    def _let_go(self, books: set[str], slots: set[str], rank: int) -> None:
        """Undo what attaching did since ``books``, ``slots`` and ``rank`` were the session's:
        the books attached since are detached, the layers wrapped since put back, the rank
        restored (a refused stack changes nothing)."""
        for key in set(self.books) - books:
            self.detach(key)
        for path in set(self.slots) - slots:
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            setattr(parent, child, self.slots.pop(path).base_layer)
        # always: an interrupt may have come between padding (zeros bound) and rebinding
        self.rank = rank
        self._prepare_all()

    def _prepare(self, book: LoadedBook) -> None:
        import torch

        prepared = []
        for path, slot in self.slots.items():
            if path not in book.factors:
                prepared.append((slot, *slot.zeros))
                continue
            f = book.factors[path]
            # padded with zeros: the same product, the same shape for every book (no recompiles)
            a, b = pad(f.a, f.b, self.rank)
            prepared.append((slot, a, b, torch.tensor(f.scale, dtype=a.dtype, device=a.device)))
        book.prepared = prepared

    # -- switching ---------------------------------------------------------------------------

    def swap(self, ref: str, *, force: bool = False) -> float:
        """Make ``ref`` the only active pocket book (attaching it first if needed).

        ``force`` attaches it, and the pocket books it was trained on, even where they were
        made on another base. Returns the seconds the swap itself took: reading files and
        joining an underlay's factors are excluded (time the call to include them).

        A pocket book trained on a base loaded otherwise is refused before it is attached: a
        refused swap changes nothing.
        """
        try:
            key = self._key(ref)
        except PocketBookNotFound:
            book = self.library.get(ref)
            if book.meta.kind == "stack":  # a saved stack: activate its members, as saved
                from adapterkit.lora.underlay import stack_members

                return self.stack({m.ref: w for m, w in stack_members(self.library, book)},
                                  force=force)
            self._refuse_other_quantization(self._with_underlays([book]))
            key = self.attach(ref, force=force)
        if self.books[key].stacked_on:  # trained --on others: bring its stack back
            return self.stack({r: 1.0 for r in [*self.books[key].stacked_on, key]}, force=force)
        self._refuse_other_quantization([self.pocket_books[key]])
        start = time.perf_counter()
        self._bind(self.books[key].prepared, {key: 1.0})
        return time.perf_counter() - start

    def _bind(self, prepared: list[Any], active: dict[str, float]) -> None:
        """Bind every slot to ``prepared`` and record ``active``. Interrupted between two
        layers (Ctrl-C in a notebook), some layers would hold the new pocket books and some
        the old, and the next answer would come from neither: the binding is finished first
        (microseconds), then the interruption goes on. Where binding itself fails, the session
        falls back to the plain base, which :attr:`active` then says."""
        done = 0
        try:
            for slot, a, b, scale in prepared:
                slot.bind(a, b, scale)
                done += 1
            self.active = active
        except BaseException:
            try:
                for slot, a, b, scale in prepared[done:]:
                    slot.bind(a, b, scale)
            except BaseException:
                for slot, a, b, scale in getattr(self, "_zeros", []):
                    slot.bind(a, b, scale)
                self.active = {}
                raise
            self.active = active
            raise

    def off(self) -> None:
        """The plain base: every slot bound to zeros."""
        self._check_open()
        self._bind(getattr(self, "_zeros", []), {})

    def stack(self, weights: dict[str, float], *, force: bool = False) -> float:
        """Activate several pocket books at once: ΔW = Σ wᵢ·ΔWᵢ, exactly (ranks concatenated).

        ``force`` attaches those not yet attached (and what they were trained on) even where
        they were made on another base. An empty mapping is refused: :meth:`off` is the plain
        base (an empty stack is more often a filter that matched nothing). Weights, names and
        the quantization rule (over the members and what they were trained ``--on``) are
        checked before anything is attached; a member refused as it attaches (another base, a
        damaged file) lets go of those attached before it. A refused stack changes nothing.
        """
        self._check_open()
        if not isinstance(weights, Mapping):
            raise ConfigError(f"stack takes a mapping of pocket book → weight, e.g. "
                              f"{{'a': 1.0, 'b': 0.5}}, not a {type(weights).__name__}")
        if not weights:
            raise ConfigError("stack needs at least one pocket book; call off() for the plain "
                              "base")
        chosen: dict[str, tuple[PocketBook, float]] = {}
        for ref, weight in weights.items():
            if not finite_weight(weight):
                raise ConfigError(f"stack weight for {ref} must be a finite number, got "
                                  f"{weight!r}")
            book = self._entry(ref)
            if book.ref in chosen:  # "a" and "a@1": one weight would silently replace the other
                raise ConfigError(f"{book.ref} is named twice in the stack; name it once, with "
                                  f"the sum of its weights ({chosen[book.ref][1] + weight:g})")
            chosen[book.ref] = (book, float(weight))
        self._refuse_other_quantization(self._with_underlays(b for b, _ in chosen.values()))
        before = (set(self.books), set(self.slots), self.rank)
        cache_key, inserted = None, False
        try:
            keys = {self._attached(ref, force=force): weight
                    for ref, (_, weight) in chosen.items()}
            for key in list(keys):  # a member trained --on others needs them underneath, at 1
                for under in self.books[key].stacked_on:
                    keys.setdefault(self._attached(under, force=force), 1.0)
            cache_key = tuple(sorted(keys.items()))
            combined = self._stack_cache.get(cache_key)
            if combined is None:
                combined = self._combine(keys)  # (a weight the factors cannot carry: refused)
                self._stack_cache[cache_key] = combined
                inserted = True
                if combined.rank > self.rank:
                    self.rank = combined.rank
                    self._prepare_all()
                else:
                    self._prepare(combined)
        except BaseException:  # refused (another base, a damaged member, a weight...) or
            if inserted and cache_key is not None:  # interrupted: what it attached on the
                self._stack_cache.pop(cache_key, None)  # way is let go, and its layers and
            self._let_go(*before)  # rank given back (none of it is active)
            raise
        start = time.perf_counter()
        self._bind(combined.prepared, dict(keys))
        return time.perf_counter() - start

    def _combine(self, keys: dict[str, float]) -> LoadedBook:
        """The attached books ``keys`` names, weighted and concatenated layer by layer."""
        factors = {}
        for path in self.slots:
            held = [k for k in keys if path in self.books[k].factors]
            if held:
                factors[path] = Factors(*concat(
                    [(self.books[k].factors[path], keys[k]) for k in held], names=held),
                    scale=1.0)
        rank = max((f.rank for f in factors.values()), default=0)
        return LoadedBook("+".join(f"{k}*{weight_text(w)}" for k, w in keys.items()), rank,
                          factors)

    @contextmanager
    def using(self, adapter: str | dict[str, float] | None) -> Iterator[None]:
        """Temporarily activate ``adapter`` (a name, a stack dict, or None for the plain base)."""
        _check_adapter(adapter)
        previous = dict(self.active)
        if adapter is None:
            self.off()
        elif isinstance(adapter, dict):
            self.stack(adapter)
        else:
            self.swap(adapter)
        try:
            yield
        finally:
            if not previous:
                self.off()
            elif len(previous) == 1 and list(previous.values()) == [1.0]:
                self.swap(next(iter(previous)))
            else:
                self.stack(previous)

    def generate(self, prompts: str | list[str], *, adapter: Any = "active",
                 max_new_tokens: int = 64, chat: bool | None = None,
                 temperature: float = 0.0) -> Any:
        """Answer one prompt (returns a string) or several (a list), with ``adapter``
        (default: whatever is active; None: the plain base)."""
        from adapterkit.runtime.generation import generate, uses_chat

        self._check_open()
        _check_generate(prompts, max_new_tokens, temperature)
        if adapter != "active":
            _check_adapter(adapter)
        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        context = _nullcontext() if adapter == "active" else self.using(adapter)
        with context:
            out = generate(self.model, self.base.tokenizer, batch,
                           chat=uses_chat(self.base.tokenizer, chat),
                           max_new_tokens=max_new_tokens, temperature=temperature)
        return out[0] if single else out

    def close(self) -> None:
        """Detach everything and give the base its plain layers back (again: a no-op); the
        base is then free for another session, ``peft_model`` or ``train``."""
        from adapterkit.lora.slots import release, unwrap_all

        if self.closed:
            return
        self.off()
        self.books.clear()
        self.pocket_books.clear()
        self._stack_cache.clear()
        unwrap_all(self.model)  # (only this session's: it is the base's one user)
        self.slots.clear()
        self.closed = True
        release(self.model, self)


def _check_ref(ref: Any) -> None:
    if not isinstance(ref, str):
        raise ConfigError(f"a pocket book is named by a string (e.g. 'triage' or 'triage@2'), "
                          f"not {ref!r}")


def _check_adapter(adapter: Any) -> None:
    """What ``generate(adapter=...)`` and :meth:`Session.using` take."""
    if adapter is not None and not isinstance(adapter, (str, Mapping)):
        raise ConfigError(f"adapter must be a pocket book's name, a mapping of names to "
                          f"weights, or None for the plain base, not {adapter!r}")


def _check_generate(prompts: Any, max_new_tokens: Any, temperature: Any) -> None:
    """Refuse what :func:`adapterkit.runtime.generation.generate` would fail on deep inside
    (or, for a temperature below 0, silently treat as greedy)."""
    if not isinstance(prompts, str) and not (
            isinstance(prompts, (list, tuple)) and prompts
            and all(isinstance(p, str) or _is_conversation(p) for p in prompts)):
        raise ConfigError(f"generate takes a prompt (a string) or a non-empty list of them "
                          f"(or of conversations: lists of {{'role', 'content'}} messages), "
                          f"not {prompts!r:.80}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a whole number of at least 1, not "
                          f"{max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be a number of at least 0 (0: greedy), not "
                          f"{temperature!r}")


def _is_conversation(prompt: Any) -> bool:
    """A chat so far, as ``chat`` sends it: messages with a role and text content."""
    return isinstance(prompt, list) and bool(prompt) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in prompt)


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def _is_linear(model: Any, path: str) -> bool:
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        return False
    return hasattr(layer, "in_features") and hasattr(layer, "out_features")


def _dtype(model: Any) -> Any:
    return getattr(model, "dtype", None)


def _device(model: Any) -> Any:
    return next(model.parameters()).device


# -- which base a pocket book answers on -------------------------------------------------------

def _plugins(library: Library) -> PluginManager:
    """The methods that say what each pocket book was trained on: the library's plugins, else
    the process-wide ones."""
    from adapterkit.plugin_api.manager import default_plugin_manager

    return library.plugins or default_plugin_manager()


def precision(quantization: str | None) -> str:
    """How a message names a base's quantization: ``4bit``, or ``full-precision``."""
    return quantization or "full-precision"


def a_precision(quantization: str | None) -> str:
    """:func:`precision` with its article: ``a 4bit``, ``an 8bit``, ``a full-precision``."""
    said = precision(quantization)
    return f"{'an' if said.startswith('8') else 'a'} {said}"


def refuse_other_quantization(books: list[PocketBook], quantization: str | None,
                              library: Library, *, holder: str, fix: str) -> None:
    """Refuse to answer with ``books`` together (underlays and stack members listed) on a base
    loaded in ``quantization`` unless :func:`quantization_of` — the rule of ``generate`` and
    ``eval`` — asks for that one: a qlora book on a full-precision base, or a plain one on a
    4-bit base, answers, but not what it answers everywhere else. ``holder`` names the base's
    holder (``"this session"``), ``fix`` says what to do instead."""
    plugins = _plugins(library)
    need = quantization_of(books, plugins)
    if need == quantization:
        return
    trained = [b.ref for b in books if quantization_of([b], plugins) == need]
    one = len(trained) == 1
    raise InexactAdapter(
        f"{', '.join(trained)} {'was' if one else 'were'} trained on {a_precision(need)} base "
        f"and {holder} holds {a_precision(quantization)} one, so {'it' if one else 'they'} "
        f"would not answer as `generate` and `eval` do; {fix}")


def quantizations(library: Library, named: Mapping[str, Iterable[PocketBook]]
                  ) -> dict[str, str | None]:
    """For each name (a pocket book, a stack: its pocket books), the quantization of the base
    it answers on as trained: :func:`quantization_of` over them and what they were trained
    ``--on``."""
    plugins = _plugins(library)
    return {name: quantization_of([m for b in books for m, _ in members_of(library, b)],
                                  plugins)
            for name, books in named.items()}


def one_quantization(needs: Mapping[str, str | None], *, fix: str) -> str | None:
    """The one quantization every name of ``needs`` (from :func:`quantizations`) answers on;
    :class:`ConfigError` naming which needs which where they differ (no base is exact for
    both), ending with ``fix``."""
    kinds = list(dict.fromkeys(needs.values()))
    if len(kinds) <= 1:
        return kinds[0] if kinds else None
    groups = [[n for n, q in needs.items() if q == kind] for kind in kinds]
    first = f"{', '.join(groups[0])} {'needs' if len(groups[0]) == 1 else 'need'} " \
            f"{a_precision(kinds[0])} base"
    rest = [f"{', '.join(g)} {a_precision(k)} one" for g, k in zip(groups[1:], kinds[1:])]
    raise ConfigError(f"{' and '.join([first, *rest])} (as each was trained): no one base "
                      f"answers exactly for all; {fix}")


def open_session(base: str | Base, *, quantization: str | None = None, home: Any = None,
                 attach: list[str] | None = None, force: bool = False,
                 progress: Any = None, any_quantization: bool = False) -> Session:
    """Load (or take) a frozen base and open a session on it, attaching ``attach``.

    A base given by name without ``quantization`` is loaded as ``attach`` was trained (a
    ``qlora`` pocket book: in 4 bits; see :func:`quantizations`), pocket books trained on
    different ones being refused. A :class:`Base` given is used as loaded: ``quantization`` may
    only repeat its own, a pocket book trained on another is refused when attached or made
    active, and no other session or PEFT model may hold it (see :class:`Session`).

    ``any_quantization``: answer with every pocket book on this base as it is loaded (by
    name: as ``quantization`` says), exactly as plain PEFT on it does but not as ``generate``
    and ``eval`` do where it was trained on another (e.g. a LoRA on a 4-bit base, to save
    memory)."""
    from adapterkit.base.load import load_base

    if attach is not None and (isinstance(attach, str) or not isinstance(attach, (list, tuple))):
        raise ConfigError(f"attach takes a list of pocket book names, e.g. [{attach!r}]")
    for ref in attach or []:
        _check_ref(ref)
    if isinstance(base, Base) and quantization is not None and \
            quantization != base.quantization:
        raise ConfigError(f"this base is already loaded in {base.quantization or 'full precision'}"
                          f", not {quantization}; load it with load_base(..., quantization="
                          f"{quantization!r}) or leave quantization out")
    library = Library(home)
    if not isinstance(base, Base) and quantization is None and attach and \
            not any_quantization:
        quantization = one_quantization(
            quantizations(library, {ref: [library.get(ref)] for ref in attach}),
            fix="open one session for each, or give quantization= to stack them")
    loaded = base if isinstance(base, Base) else load_base(
        base, quantization=quantization, home=library.home, progress=progress)
    session = Session(loaded, library, any_quantization=any_quantization)
    try:
        for ref in attach or []:
            session.attach(ref, force=force)
    except BaseException:
        session.close()  # the caller never gets it: it must not keep holding the base
        raise
    return session
