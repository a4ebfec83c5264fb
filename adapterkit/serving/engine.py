"""The serving engine: one resident base decoding many requests at once, each with its own
pocket book (or a stack, or none), requests joining and leaving between decode steps.

A background thread repeats :meth:`Engine.step`: cancelled rows leave, waiting requests are
admitted while the batch has room (their pocket books attached, least recently used ones
detached to make room), prefilled together and assembled with the running rows into one batch,
then one forward of the base decodes one token for every row, each row adding its own pocket
book's LoRA delta (:mod:`adapterkit.serving.rows`).

Where this goes its own way rather than use transformers' ``generation/continuous_batching``
(its paged-attention ``ContinuousBatchingManager``): that engine flattens all requests into one
ragged token stream built inside its private input/output classes, with no hook for per-token
side data such as which pocket book a token's row uses, and its prefix sharing reuses KV blocks
by token hash alone — which would hand one pocket book's keys and values to a request for
another. So the batch here is a transformers :class:`~transformers.DynamicCache` of left-padded
rows whose layers keep room to grow (a decode step writes its column in place), driven through
the model's public forward (2-D attention mask, explicit position ids): joining rows are
prefilled on a cache of their own and assembled with the running ones into a new batch, a
leaving row is dropped in place and the all-padding columns trimmed
(:mod:`adapterkit.serving.kv`). Prefill is not chunked: a long prompt delays the next decode
step of the running rows by its own forward.

Greedy decoding (temperature 0) takes the argmax of the logits as ``generate`` does, without the
base's generation-config logits processors (repetition penalty and the like).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapterkit.errors import (
    AdapterkitError,
    BaseMismatch,
    ConfigError,
    InexactAdapter,
    PocketBookNotFound,
    QueueFull,
)
from adapterkit.serving import kv
from adapterkit.serving.names import Target, models, resolve
from adapterkit.serving.requests import (
    DEFAULT_MAX_TOKENS,
    Event,
    Request,
    check_request,
    sample,
)

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.base.load import Base
    from adapterkit.library.store import Library
    from adapterkit.runtime.session import LoadedBook
    from adapterkit.serving.rows import Pool, RowLora

__all__ = ["Engine", "Event", "QueueFull", "Request", "Target"]

log = logging.getLogger(__name__)

#: At most this often (seconds) the decode loop checks its attached pocket books against the
#: library, letting go of those removed or re-created with other weights (also checked before
#: each new one loads).
STALE_CHECK_S = 1.0


@dataclass
class _Attached:
    """An attached pocket book; ``content`` (its files' hashes) keys it, so a name re-used for
    other weights is never answered from the old tensors."""

    ref: str
    content: tuple[str, ...]
    loaded: LoadedBook
    #: The largest magnitude of its scaled ``B`` factors (``s·B``), for the weights it takes.
    peak: float = 0.0

    @property
    def label(self) -> str:
        """A short digest of ``content``: tells apart two contents a name held in turn."""
        return hashlib.sha256("\0".join(self.content).encode()).hexdigest()[:12]


@dataclass
class _Row:
    """A request decoding in the batch."""

    request: Request
    #: (attached key, loaded book, weight) for each member; empty for the plain base.
    members: tuple[tuple[tuple[str, ...], LoadedBook, float], ...]
    #: Tokens of this row in the KV cache (its next token goes at this position).
    length: int = 0
    last: int = 0
    keys: frozenset[tuple[str, ...]] = field(default_factory=frozenset)

    @property
    def identity(self) -> tuple[tuple[tuple[str, ...], float], ...]:
        """What this row adds: its books' content keys and weights (never ``id()``, which a
        later book can reuse)."""
        return tuple((key, w) for key, _, w in self.members)


class Engine:
    """Serve ``base`` with every pocket book of ``library`` made on it, many requests at once.

    It holds the base's layers until :meth:`close` (see :func:`adapterkit.lora.slots.claim`):
    refused on a base a session or a PEFT model holds, and they are refused on this one.

    :param max_attached: pocket books kept loaded at once (least recently used leaves first;
        one a running row uses never does).
    :param max_batch: rows decoded together.
    :param max_queue: requests waiting for a row before :class:`QueueFull`.
    :param max_new_tokens_cap: the most ``max_tokens`` one request may ask for (``serve
        --max-tokens``); also chat's default where the context leaves more room.
    """

    def __init__(self, base: Base, library: Library, *, max_attached: int = 8,
                 max_batch: int = 16, max_queue: int = 256,
                 max_new_tokens_cap: int = DEFAULT_MAX_TOKENS) -> None:
        for name, value in (("max_attached", max_attached), ("max_batch", max_batch),
                            ("max_queue", max_queue), ("max_new_tokens_cap", max_new_tokens_cap)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.base = base
        self.library = library
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.base_id: str = base.name
        self.max_attached, self.max_batch = max_attached, max_batch
        self.max_queue, self.max_new_tokens_cap = max_queue, max_new_tokens_cap
        config = self.model.config
        self.context_length: int = int(getattr(config, "max_position_embeddings", 0)
                                       or self.tokenizer.model_max_length)
        self._eos = _eos_ids(self.model, self.tokenizer)
        #: Settings of the base's generation config that ``generate`` applies to greedy
        #: decoding and this engine does not (``repetition_penalty=1.05``, ...): where there
        #: are any, greedy answers may differ from ``adapterkit generate``'s. ``serve`` says so.
        self.unmatched: list[str] = greedy_settings(getattr(self.model, "generation_config",
                                                            None))
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else next(iter(self._eos), 0)
        kv.check_cache(self.model)
        self._vocab = int(self.model.get_input_embeddings().num_embeddings)
        self._dtype = _dtype(self.model)
        self._cache_arg = kv.cache_argument(self.model)
        self._pending: deque[Request] = deque()
        self._queue_lock = threading.Lock()
        self._wake_event = threading.Event()
        #: Held by the decode thread during each step, and by :meth:`preload`.
        self._lock = threading.RLock()
        self._books: OrderedDict[tuple[str, ...], _Attached] = OrderedDict()
        self._slots: dict[str, RowLora] = {}
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Any = None
        self._pool: Pool | None = None
        self._pool_index: dict[tuple[tuple[tuple[str, ...], float], ...], int] = {}
        #: (ref, content label) of each book attached now, replaced (never mutated) so other
        #: threads read it safely.
        self._attached: tuple[tuple[str, str], ...] = ()
        self._next_stale_check = 0.0
        self._bound: tuple[Any, ...] | None = None
        self._counts = dict.fromkeys(("requests_total", "tokens_total", "steps_total",
                                      "prefills_total", "errors_total"), 0)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.closed = False
        self._claim()

    def _claim(self) -> None:
        """Hold the base's layers until :meth:`close`: a session, ``peft_model`` or ``train`` on
        it meanwhile is refused, as this is on a base one of them holds — either would
        silently add its LoRA to the other's answers."""
        from adapterkit.lora.slots import claim
        from adapterkit.serving.rows import RowLora

        claim(self.model, self, wanted="serving it", held="a serving engine holds this base",
              free="engine.close()", wrapper=RowLora)

    def describe(self) -> str:
        """What the engine holds, for a refusal that names it."""
        refs = ", ".join(ref for ref, _ in self._attached)
        return f"attached: {refs or 'none'}; rows decoding: {len(self._rows)}"

    # -- the public face ------------------------------------------------------------------------

    def resolve(self, model: str) -> Target:
        """What ``model`` names (see :func:`adapterkit.serving.names.resolve`), read afresh;
        :class:`ConfigError` for a stack of more pocket books than this server attaches,
        :class:`InexactAdapter` for pocket books trained on a base loaded otherwise,
        :class:`BaseMismatch` for a pocket book of another base (advice that holds for a
        server: ``--force`` is the local commands')."""
        try:
            target = resolve(self.library, self.base, model, base_id=self.base_id)
        except BaseMismatch as exc:
            raise BaseMismatch(
                f"{exc.mismatch}; serve it from a server started on its own base (`adapterkit "
                "serve --base` that base), or, only if you know the weights are compatible, "
                "attach it anyway with `adapterkit generate` or `swap` --force (without "
                "--server: a server never forces)",
                mismatch=exc.mismatch) from None
        _fits(target.key, len(target.members), self.max_attached)
        self._refuse_other_quantization(model, target)
        return target

    def _refuse_other_quantization(self, model: str, target: Target) -> None:
        """:class:`InexactAdapter` where ``target``'s pocket books were trained on a base
        loaded otherwise than this server's one (a qlora book on a full-precision base): it
        would answer, but not as ``generate`` and ``eval`` do."""
        if not target.members:
            return
        from adapterkit.runtime.session import refuse_other_quantization

        books = [self.library.get(ref) for ref, _ in target.members]
        refuse_other_quantization(
            books, self.base.quantization, self.library,
            holder="this server", fix=f"serve it from a server started with --preload "
                                      f"{model}, which loads the base as it was trained")

    def models(self) -> list[dict[str, Any]]:
        """The base and every pocket book and stack of it in the library (``/v1/models``)."""
        return models(self.library, self.base, base_id=self.base_id)

    def submit(self, prompt_ids: list[int], target: Target, *, max_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               ignore_eos: bool = False) -> Request:
        """Queue a request; its tokens arrive on ``request.events`` as they are decoded.

        Raises :class:`ConfigError` for arguments out of range and :class:`QueueFull` when
        ``max_queue`` requests already wait. A pocket book that fails to load fails only its
        own requests (``finish="error"``). ``ignore_eos`` decodes past end-of-sequence tokens
        (sent like any other) up to ``max_tokens``.
        """
        check_request(prompt_ids, max_tokens, temperature, top_p, seed,
                      context=self.context_length, cap=self.max_new_tokens_cap,
                      vocab=self._vocab)
        request = Request(prompt_ids, target, max_tokens=max_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, wake=self._wake_event.set,
                          ignore_eos=ignore_eos)
        with self._queue_lock:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting (the queue "
                                f"holds {self.max_queue}); retry in a moment")
            self._pending.append(request)
            self._counts["requests_total"] += 1
        self._wake_event.set()
        return request

    def preload(self, models: list[str]) -> None:
        """Resolve and attach these models' pocket books now (raises what resolving or loading
        raises, so a bad ``--preload`` stops the server before it listens; so does a list of
        more pocket books than stay attached, which would detach the first ones again)."""
        targets = [self.resolve(model) for model in models]
        books = list(dict.fromkeys(ref for target in targets for ref, _ in target.members))
        _fits(f"--preload {','.join(models)}", len(books), self.max_attached)
        for target in targets:
            with self._lock:
                self._attach(target, busy={key for row in self._rows for key in row.keys})

    def start(self) -> None:
        """Start the background decode thread (idempotent)."""
        if self.closed:  # it gave the base back: another holder may have it now
            raise ConfigError("this engine is closed; build a new Engine on the base")
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="adapterkit-engine",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop decoding, end every open request with an error, give the base its layers back
        (it is then free for a session, ``peft_model`` or ``train``)."""
        from adapterkit.lora.slots import release
        from adapterkit.serving import rows

        self._stop.set()
        self._wake_event.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            with self._queue_lock:
                waiting = list(self._pending)
                self._pending.clear()
            for request in waiting + [row.request for row in self._rows]:
                request.end("error", "the server is shutting down")
            self._rows, self._cache, self._mask, self._pool = [], None, None, None
            self._bound = None
            self._books.clear()
            self._attached = ()
            rows.unwrap_all(self.model)
            self._slots.clear()
            self.closed = True
            release(self.model, self)

    def stats(self) -> dict[str, Any]:
        """Counters for ``/metrics``: queue depth, batch size, attached pocket books (their refs,
        and ``attached_content``: ``(ref, content label)`` each, unique where a ref was
        re-created while a row still uses its old weights), totals."""
        with self._queue_lock:
            depth = len(self._pending)
        attached = self._attached
        return {"queue_depth": depth, "batch_size": len(self._rows),
                "attached": [ref for ref, _ in attached],
                "attached_content": list(attached), **self._counts}

    # -- the decode loop ------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stop.is_set():
                self._wake_event.clear()
                try:
                    busy = self.step()
                except Exception as exc:  # our bug: fail the batch, never hang its callers
                    log.exception("the decode loop failed")
                    self._fail_batch(exc)
                    busy = False
                if not busy:
                    self._wake_event.wait(0.1)

    def _fail_batch(self, exc: Exception) -> None:
        from adapterkit.serving.rows import clear

        with self._lock:
            for row in self._rows:
                self._counts["errors_total"] += 1
                row.request.end("error", f"{type(exc).__name__}: {exc}")
            self._rows, self._cache, self._mask, self._pool = [], None, None, None
            self._pool_index, self._bound = {}, None
            clear(self._slots)

    def step(self) -> bool:
        """One turn of the loop: free cancelled rows, admit and prefill waiting requests, decode
        one token for every row. Returns whether there was anything to do. The background
        thread calls it; tests may call it directly instead of :meth:`start`."""
        import torch

        with self._lock, torch.inference_mode():
            self._drop([i for i, row in enumerate(self._rows) if row.request.cancelled],
                       "cancelled")
            if time.monotonic() >= self._next_stale_check:
                self._forget_stale({key for row in self._rows for key in row.keys})
            admitted = self._admit()
            if admitted:
                self._guarded(self._prefill, [row.request for row in admitted], admitted)
            if self._rows:
                self._guarded(self._decode, [row.request for row in self._rows])
            return bool(admitted or self._rows)

    def _guarded(self, work: Callable[..., None], requests: list[Request], *args: Any) -> None:
        """Run ``work``; if it raises (our bug, or out of memory), only these requests fail and
        the batch is reset, so the server keeps serving."""
        try:
            work(*args)
        except Exception as exc:
            log.exception("decode step failed")
            for request in requests:
                self._counts["errors_total"] += 1
                request.end("error", f"{type(exc).__name__}: {exc}")
            live = {id(r) for r in requests}
            self._drop([i for i, row in enumerate(self._rows) if id(row.request) in live],
                       "error")

    def _admit(self) -> list[_Row]:
        """Waiting requests that get a row now, their pocket books attached."""
        with self._queue_lock:
            waiting = list(self._pending)
        admitted: list[_Row] = []
        busy = {key for row in self._rows for key in row.keys}
        for request in waiting:
            if request.cancelled:  # also when the batch is full: it leaves the queue now
                self._unqueue(request)
                request.end("cancelled")
                continue
            if len(self._rows) + len(admitted) >= self.max_batch:
                continue
            try:
                members = self._attach(request.target, busy)
            except Exception as exc:  # a pocket book that cannot load fails its requests alone
                self._unqueue(request)
                self._counts["errors_total"] += 1
                request.end("error", _one_line(exc), status=_status(exc))
                continue
            if members is None:  # every attached book is in use: wait for a row to finish
                continue
            self._unqueue(request)
            keys = frozenset(key for key, _, _ in members)
            busy |= keys
            admitted.append(_Row(request, members, keys=keys))
        return admitted

    def _unqueue(self, request: Request) -> None:
        with self._queue_lock:
            self._pending.remove(request)

    # -- pocket books ---------------------------------------------------------------------------

    def _attach(self, target: Target, busy: set[tuple[str, ...]]
                ) -> tuple[tuple[tuple[str, ...], LoadedBook, float], ...] | None:
        """``target``'s members, loaded (least recently used books detached to make room);
        None when the room is held by books running rows use."""
        from adapterkit.lora.factors import WeightOverflow, peak_of
        from adapterkit.runtime.session import load_checked
        from adapterkit.serving import rows

        if self.closed:  # it gave the base back: its layers are another holder's to wrap
            raise ConfigError("this engine is closed; build a new Engine on the base")
        _fits(target.key, len(target.members), self.max_attached)
        out = []
        keep = set(busy)
        for ref, weight in target.members:
            book = self.library.get(ref)
            key = _content_key(book)
            attached = self._books.get(key)
            if attached is None:
                self._forget_stale(keep)  # a removed or replaced book's room goes first
                while len(self._books) >= self.max_attached:
                    victim = next((k for k in self._books if k not in keep), None)
                    if victim is None:
                        return None
                    del self._books[victim]  # its tensors go with the last reference
                    self._note_attached()
                loaded = load_checked(self.base, book, model=self.model, dtype=self._dtype,
                                      path="the server")
                for path in loaded.factors:
                    if path not in self._slots:
                        self._slots[path] = rows.wrap(self.model, path)
                attached = self._books[key] = _Attached(
                    book.ref, key, loaded, peak_of(loaded.factors.values()))
                self._note_attached()
            # (a 400 for this request alone; the pool's own concat does not check again)
            WeightOverflow.check(float(weight), attached.peak, self._dtype, ref=book.ref)
            self._books.move_to_end(key)
            keep.add(key)
            out.append((key, attached.loaded, float(weight)))
        return tuple(out)

    def _note_attached(self) -> None:
        self._attached = tuple((a.ref, a.label) for a in self._books.values())

    def _forget_stale(self, keep: set[tuple[str, ...]]) -> None:
        """Detach the pocket books whose library entry is gone (``rm``) or now holds other
        weights (a version re-created), freeing their memory and ``--max-attached`` room at
        once rather than at their turn to be least recently used. A book in ``keep`` (a
        running row's) stays until its rows end: the next check lets it go."""
        self._next_stale_check = time.monotonic() + STALE_CHECK_S
        stale = []
        for key, attached in self._books.items():
            if key in keep:
                continue
            try:
                current = _content_key(self.library.get(attached.ref))
            except PocketBookNotFound:
                current = None
            except Exception:  # the library cannot say now: keep it, never fail the batch
                log.warning("could not check %s against the library", attached.ref,
                            exc_info=True)
                continue
            if current != key:
                stale.append(key)
        for key in stale:
            log.info("detaching %s: the library no longer holds these weights under that name",
                     self._books[key].ref)
            del self._books[key]  # its tensors go with the last reference
        if stale:
            self._note_attached()

    def _bind(self, rows_: Sequence[_Row], also: Sequence[_Row] = ()) -> None:
        """Point every LoRA layer at the pool for the next forward of ``rows_`` (see
        :meth:`Pool.bind <adapterkit.serving.rows.Pool.bind>`). The pool covers ``also``'s
        targets too (the batch's, while joining rows prefill), and is rebuilt only when a
        target is missing or most are unused."""
        from adapterkit.serving.rows import Pool, clear

        identities = [row.identity for row in rows_]
        needed = {row.identity for row in [*rows_, *also] if row.identity}
        if not any(identities):
            if self._bound != ():
                clear(self._slots)
                self._bound = ()
            return
        pooled = set(self._pool_index)
        # a superset serves too (a target no row uses adds nothing; at worst it is a zero block
        # of a gathered layout, or the layout falls back to runs: rows.layout), so the pool —
        # a copy of every target's factors — is rebuilt only when a target is missing or most
        # are unused
        if not needed <= pooled or 2 * len(needed) < len(pooled):
            members = {row.identity: [(b, w) for _, b, w in row.members]
                       for row in [*rows_, *also]}
            order = sorted(needed, key=str)
            self._pool = Pool([members[i] for i in order])
            self._pool_index = {identity: n for n, identity in enumerate(order)}
            self._bound = None
        layout = (id(self._pool), *(self._pool_index.get(i, -1) for i in identities))
        if layout != self._bound:
            assert self._pool is not None
            self._pool.bind(self._slots, [self._pool_index.get(i, -1) for i in identities])
            self._bound = layout

    # -- forwards -------------------------------------------------------------------------------

    def _prefill(self, admitted: list[_Row]) -> None:
        """Prefill the admitted rows together (left-padded), send each its first token, and
        join those still running to the batch (:meth:`_join`)."""
        import torch
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        admitted.sort(key=_target_order)  # one run of rows per target (see rows.py)
        width = max(len(row.request.prompt_ids) for row in admitted)
        ids = torch.full((len(admitted), width), self._pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(admitted), width), dtype=torch.long, device=device)
        for i, row in enumerate(admitted):
            prompt = row.request.prompt_ids
            ids[i, width - len(prompt):] = torch.tensor(prompt, device=device)
            mask[i, width - len(prompt):] = 1
            row.length = len(prompt)
            row.request.seed_generator(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self._bind(admitted, also=self._rows)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        self._bound = None  # the batch's own layout is bound again before its next step
        self._counts["prefills_total"] += 1
        done = self._emit(admitted, out.logits[:, -1, :], first=True)
        running = [i for i in range(len(admitted)) if i not in done]
        if running:
            self._join([admitted[i] for i in running], cache, mask, running)

    def _decode(self) -> None:
        """One forward of the base for every row: one new token each."""
        import torch

        device = self._mask.device
        ids = torch.tensor([[row.last] for row in self._rows], device=device)
        positions = torch.tensor([[row.length] for row in self._rows], device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        self._bind(self._rows)
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: self._cache})
        for row in self._rows:
            row.length += 1
        self._counts["steps_total"] += 1
        self._drop(sorted(self._emit(self._rows, out.logits[:, -1, :])), None)

    def _emit(self, rows_: list[_Row], logits: Any, *, first: bool = False) -> set[int]:
        """Sample one token per row, send it; the indices of rows that finished. ``first``:
        these are the rows' first scores (their prefill), before any token was sent."""
        tokens, failed = sample(logits.float(), [row.request for row in rows_])
        done = set()
        for i, (row, token) in enumerate(zip(rows_, tokens)):
            request = row.request
            if i in failed:
                self._counts["errors_total"] += 1
                blamed = _too_heavy(row) if first else None
                if blamed is None:
                    request.end("error", failed[i])
                else:
                    request.end("error", blamed, status=400)
                done.add(i)
                continue
            if token in self._eos and not request.ignore_eos:
                request.end("stop")
                done.add(i)
                continue
            request.send(token)
            self._counts["tokens_total"] += 1
            row.last = token
            if (request.completion_tokens >= request.max_tokens
                    or request.prompt_tokens + request.completion_tokens >= self.context_length):
                request.end("length")
                done.add(i)
        return done

    # -- the batch's KV cache -------------------------------------------------------------------

    def _join(self, joining: list[_Row], cache: Any, mask: Any, rows: list[int]) -> None:
        """Put prefilled rows (``rows`` of ``cache``) into the running batch, in one new cache
        (see :func:`adapterkit.serving.kv.assemble`)."""
        # Rows of one target stay adjacent, so each LoRA layer adds one slice per target
        # (rows.py); leaving rows keep the order, so only a join can break it. The sort is
        # stable: the running rows keep their order among themselves.
        sources = [] if self._cache is None else [(self._cache, self._mask)]
        new = len(sources)  # the joining rows' source
        sources.append((cache, mask))
        entries = [((0, i), row) for i, row in enumerate(self._rows)] \
            + [((new, r), row) for r, row in zip(rows, joining)]
        entries.sort(key=lambda entry: _target_order(entry[1]))
        self._cache, self._mask = kv.assemble(sources, [place for place, _ in entries])
        self._rows = [row for _, row in entries]
        self._bound = None

    def _drop(self, indices: list[int], finish: str | None) -> None:
        """Take these rows out of the batch (ending their requests with ``finish`` if given),
        and trim the cache columns that only padding is left in."""
        if not indices:
            return
        gone = set(indices)
        for i in gone:
            if finish is not None:
                self._rows[i].request.end(finish)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        self._bound = None
        if not keep:
            from adapterkit.serving.rows import clear

            self._cache = self._mask = self._pool = None
            self._pool_index = {}
            clear(self._slots)
            return
        self._cache, self._mask = kv.drop(self._cache, self._mask, keep)


# -- helpers ------------------------------------------------------------------------------------

def _target_order(row: _Row) -> str:
    """Rows sort by what they add, the pool's own order (``Engine._bind``)."""
    return str(row.identity)


def _content_key(book: Any) -> tuple[str, ...]:
    """What keys an attached pocket book: its ref and files' hashes, and when it was made."""
    from adapterkit.library.metadata import CONFIG_FILE, WEIGHTS_FILE

    return (book.ref, book.meta.files.get(WEIGHTS_FILE, ""),
            book.meta.files.get(CONFIG_FILE, ""), book.meta.created)


def _too_heavy(row: _Row) -> str | None:
    """Why a row whose first scores are not finite failed, where its request is the cause: a
    weight above 1 in magnitude that it put on a pocket book, more than the base's number
    format takes (400, before any token was sent). None where no weight amplifies a pocket
    book: then the pocket book's own weights are the cause (the server's 500)."""
    heavy = [(key[0], w) for key, _, w in row.members if abs(w) > 1]
    if not heavy:
        return None
    ref, weight = max(heavy, key=lambda member: abs(member[1]))
    return (f"model {row.request.target.key}: with {ref} at weight {weight:g} the next-token "
            "scores are not finite numbers (NaN or infinity) from the first token on: that "
            "weight is more than this base's number format takes; give a smaller one")


def _fits(what: str, books: int, max_attached: int) -> None:
    if books > max_attached:
        raise ConfigError(f"{what} needs {books} pocket books attached at once; this server "
                          f"attaches at most {max_attached} (--max-attached)")


def _status(exc: BaseException) -> int:
    """400 for what the request asked that cannot be served as asked (a pocket book this
    server cannot apply exactly, of another base, or too many at once); 500 for the rest (a
    damaged file, our bug)."""
    return 400 if isinstance(exc, (ConfigError, InexactAdapter, BaseMismatch)) else 500


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, AdapterkitError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


#: Generation-config fields that change what ``generate(do_sample=False)`` picks, with the
#: value that changes nothing (transformers' ``_get_logits_processor``); the engine takes the
#: plain argmax.
_GREEDY_NEUTRAL: dict[str, Any] = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "min_length": 0, "min_new_tokens": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "sequence_bias": None, "exponential_decay_length_penalty": None,
}


def greedy_settings(config: Any) -> list[str]:
    """``name=value`` for each setting of a generation config that ``generate`` would apply
    to greedy decoding and this engine does not."""
    out = []
    for name, neutral in _GREEDY_NEUTRAL.items():
        value = getattr(config, name, neutral)
        if value not in (neutral, None) and not (name == "min_length" and not value):
            out.append(f"{name}={value}")
    return out


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end an answer: the generation config's (as ``generate`` stops), else
    the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    return frozenset(int(i) for i in ids if i is not None)


def _dtype(model: Any) -> Any:
    import torch

    dtype = getattr(model, "dtype", None)
    return dtype if dtype is not None and dtype.is_floating_point else torch.float32
