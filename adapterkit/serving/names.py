"""What a request's ``model`` field names: the plain base, a pocket book, or a stack.

``BASE_ID`` is the plain base; ``NAME`` (latest version) or ``NAME@V`` one pocket book; a saved
stack expands to its members; ``a+b`` and ``a*1+b*0.5`` are stacks written inline (weight 1
where none is given). A pocket book trained ``--on`` others brings them underneath it at
weight 1 unless the name gives one itself — the rule of :meth:`Session.stack` and of
:func:`adapterkit.runtime.peft_model.members_of`, the reference the server is checked against.

The base id (spaces around it ignored, as around every name) always means the plain base:
a pocket book of the same name is reached, and listed, as ``NAME@V`` only, and the bare base
id inside a stack is refused naming that ``NAME@V`` (it never silently means the book). The
library is asked afresh on every call, so a pocket book trained or pulled while the server
runs is servable at once, and ``NAME`` always means its latest version.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from adapterkit.base.compat import check_base
from adapterkit.errors import (
    AdapterkitError,
    ConfigError,
    InvalidAdapter,
    InvalidName,
    PocketBookNotFound,
)
from adapterkit.library.names import parse_ref, weight_text
from adapterkit.library.store import Library, PocketBook

#: How many pocket books one stack may name (a bound on the work one request can ask for).
MAX_MEMBERS = 16


@dataclass(frozen=True)
class Target:
    """What answers a request: ``key`` is canonical (``""`` for the plain base, ``triage@2``
    for one pocket book, ``triage@2*1+law@1*0.5`` for a stack); ``members`` are its pocket
    books with their weights, underlays first (empty for the plain base)."""

    key: str
    members: tuple[tuple[str, float], ...] = ()


PLAIN = Target("")


def parse(model: str) -> list[tuple[str, float | None]]:
    """``a*1+b*0.5`` → ``[("a", 1.0), ("b", 0.5)]`` (``None`` where no weight is written).

    Raises :class:`ConfigError` for an empty term, a weight that is not a finite number, a
    name written twice or too many members; names themselves are checked by the library.
    """
    if not isinstance(model, str) or not model.strip():
        raise ConfigError("model must name the base, a pocket book (NAME or NAME@V) or a "
                          "stack (a+b, a*1+b*0.5)")
    terms: list[tuple[str, float | None]] = []
    for raw in _terms(model):
        name, star, weight_text = (part.strip() for part in raw.partition("*"))
        if not name:
            raise ConfigError(f"model {model!r} has an empty term; write a+b or a*1+b*0.5")
        weight: float | None = None
        if star and not weight_text:
            raise ConfigError(f"{raw.strip()!r} in model {model!r} has no weight after '*'; "
                              "write NAME*WEIGHT, e.g. law*0.5")
        if star:
            try:
                weight = float(weight_text)
            except ValueError:
                raise ConfigError(f"weight {weight_text!r} in model {model!r} is not a number; "
                                  "write NAME*WEIGHT, e.g. law*0.5") from None
            if not math.isfinite(weight):
                raise ConfigError(f"weight {weight_text!r} in model {model!r} must be finite")
        terms.append((name, weight))
    names = [n for n, _ in terms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"model {model!r} names {', '.join(twice)} twice; give each pocket "
                          "book once, with its weight")
    if len(terms) > MAX_MEMBERS:
        raise ConfigError(f"model {model!r} stacks {len(terms)} pocket books; at most "
                          f"{MAX_MEMBERS}")
    return terms


def resolve(library: Library, base: Any, model: str, *, base_id: str | None) -> Target:
    """The :class:`Target` ``model`` names on ``base``, checked against the library now.

    ``base_id`` names the plain base (``None``: every name is a pocket book's, as on the
    command line). Raises :class:`PocketBookNotFound` for a name the library does not have
    (never an answer from the plain base), :class:`~adapterkit.errors.BaseMismatch` (both
    fingerprints named) for a pocket book of another base, :class:`ConfigError` for bad
    syntax or weights, the bare base id inside a stack, a saved stack whose members are gone
    or were replaced, and :class:`InvalidAdapter` for a pocket book that cannot generate.
    """
    if base_id is not None and isinstance(model, str) and model.strip() == base_id:
        return PLAIN
    terms = parse(model)
    inline = len(terms) > 1 or terms[0][1] is not None
    explicit: list[tuple[PocketBook, float]] = []
    from adapterkit.lora.underlay import stack_members, with_underlays

    for name, weight in terms:
        if name == base_id:  # (alone it is the plain base, answered above)
            raise ConfigError(_base_in_stack(library, model, name))
        book = _get(library, name, inline=inline)
        if book.meta.kind == "stack":
            if inline:
                raise ConfigError(f"{book.ref} is a saved stack; name it alone, or write its "
                                  "members into the stack instead")
            try:  # its members as it was saved with them, or a refusal naming the change
                explicit += stack_members(library, book)
            except InvalidAdapter as exc:
                raise ConfigError(str(exc)) from None
            continue
        explicit.append((book, 1.0 if weight is None else weight))
    refs = [b.ref for b, _ in explicit]
    twice = sorted({ref for ref in refs if refs.count(ref) > 1})
    if twice:  # a+a@1 when @1 is the latest: one pocket book at the sum of the weights
        raise ConfigError(f"model {model!r} names {', '.join(twice)} twice (as different "
                          "names of one version); give each pocket book once, with its weight")
    try:
        members = with_underlays(library, explicit)
    except InvalidAdapter as exc:  # the request's model cannot be served as trained
        raise ConfigError(str(exc)) from None
    for book, _ in members:
        if book.meta.kind != "adapter":
            raise ConfigError(f"{book.ref} is a {book.meta.kind}; a stack's members are single "
                              "pocket books")
        check_base(base, book)
        _refuse_reward(book)
    pairs = tuple((b.ref, w) for b, w in members)
    return Target(_key(pairs), pairs)


def models(library: Library, base: Any, *, base_id: str) -> list[dict[str, Any]]:
    """``/v1/models``: the plain base, then the latest version of every pocket book and saved
    stack made on ``base`` (``id`` is the name a request uses; ``ref`` the version it means
    now; a pocket book named like the base is listed as ``NAME@V``, which reaches it, since
    ``NAME`` means the base). Reward pocket books, which score text rather than generate it,
    are left out, and so is a pocket book or stack whose config asks for what the server
    cannot apply exactly (DoRA, ``lora_bias``...) or whose members are gone
    (:func:`unservable`), which every request would refuse; asked for by name, it is refused
    saying why."""
    created = int(getattr(base.source.folder.stat(), "st_mtime", 0)) \
        if base.source.folder.exists() else 0
    out: list[dict[str, Any]] = [{"id": base_id, "object": "model", "owned_by": "adapterkit",
                                  "kind": "base", "created": created}]
    for summary in library.list(base=base.fingerprint):
        if summary.base_fingerprint != base.fingerprint or summary.trainer == "reward":
            continue
        ref = f"{summary.name}@{summary.version}"
        if unservable(library, ref):
            continue
        out.append({"id": ref if summary.name == base_id else summary.name,
                    "object": "model", "owned_by": "adapterkit",
                    "kind": "stack" if summary.kind == "stack" else "adapter",
                    "created": epoch(summary.created),
                    "ref": ref})
    return out


def unservable(library: Library, ref: str) -> list[str]:
    """What in pocket book (or saved stack) ``ref``, its members and the books under them,
    the server can never apply exactly, whatever the base's weights: the features of their
    ``adapter_config.json`` beyond plain LoRA (DoRA, ``lora_bias``, trainable tokens...;
    :func:`adapterkit.lora.factors.features` of the config alone), or why it cannot be put
    together at all (a stack's member or an ``--on`` book removed or replaced since: the
    refusal every request for it gets). Empty where nothing is in the way."""
    from adapterkit.library.peft_folder import read_config
    from adapterkit.lora.factors import features
    from adapterkit.lora.underlay import stack_members, with_underlays

    try:
        book = library.get(parse_ref(ref))
        members = stack_members(library, book) if book.meta.kind == "stack" else [(book, 1.0)]
        return [f for b, _ in with_underlays(library, members)
                for f in features(read_config(b.path), [])]
    except AdapterkitError as exc:
        return [str(exc)]


def _base_in_stack(library: Library, model: str, name: str) -> str:
    """The refusal of the base id inside a stack: it means the plain base, which is under
    every stack already, and never silently the pocket book of that name (named if there)."""
    try:
        book: PocketBook | None = library.get(parse_ref(name))
    except AdapterkitError:
        book = None
    if book is None:
        return (f"{name!r} in model {model!r} is the base, which is under every stack already; "
                "a stack is made of pocket books")
    return (f"{name!r} in model {model!r} is the base's name, which means the plain base; the "
            f"pocket book named {name} is {book.ref}: write {book.ref} in the stack")


def _get(library: Library, name: str, *, inline: bool) -> PocketBook:
    try:
        return library.get(parse_ref(name))
    except InvalidName as exc:
        if inline:
            raise ConfigError(f"{name!r} in a stack is not a pocket-book name: {exc}") from None
        raise PocketBookNotFound(f"no model named {name!r}: GET /v1/models lists the base and "
                                 "the pocket books this server can answer with") from None


def _refuse_reward(book: PocketBook) -> None:
    from adapterkit.lora.underlay import refuse_reward

    try:
        refuse_reward(book)
    except InvalidAdapter as exc:
        raise ConfigError(str(exc)) from None


def _key(pairs: tuple[tuple[str, float], ...]) -> str:
    if len(pairs) == 1 and pairs[0][1] == 1.0:
        return pairs[0][0]
    return "+".join(f"{ref}*{weight_text(weight)}" for ref, weight in pairs)


#: The end of a term whose weight goes on past a "+": "a*" (a sign next) or "a*1e" (an
#: exponent's sign next); a name ending in "2e" (law2e+code) is no weight.
_WEIGHT_GOES_ON = re.compile(r"\*\s*([+-]?(\d+\.?\d*|\.\d+)[eE])?\s*$")


def _terms(model: str) -> list[str]:
    """``model`` parted into its terms at each "+" that is no sign inside a weight."""
    terms: list[str] = []
    for piece in model.split("+"):
        if terms and _WEIGHT_GOES_ON.search(terms[-1]):
            terms[-1] += "+" + piece
        else:
            terms.append(piece)
    return terms




def epoch(stamp: str) -> int:
    """A library timestamp (ISO 8601) as Unix seconds (0 if unreadable), as OpenAI's
    ``created`` has it."""
    try:
        return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
