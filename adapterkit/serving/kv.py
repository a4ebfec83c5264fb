"""The batch's KV cache: left-padded rows of full-attention layers, with a 2-D attention mask
(1 for a real token, 0 for padding).

Each layer's keys and values live in a buffer with room to grow (``RoomyLayer``, a
transformers :class:`~transformers.cache_utils.DynamicLayer`): a decode step writes its one
column in place and attention reads a view. transformers' own ``DynamicLayer`` concatenates the
whole cache with each new column instead, copying every layer's keys and values on every step:
a cost that grows with the context (16 rows with ~900-token prompts on the embedded base, 1 CPU
thread: 190 ms a decode step on ``DynamicCache``, 154 ms here; at ~100 positions the
difference was within the noise). ``StaticCache`` has fixed room and one write position for
every row, made for ``torch.compile``; rows here join and leave, so the room grows when it runs
out.

Rows join and leave a running batch between decode steps. A joining group is prefilled on a
cache of its own; :func:`assemble` then builds the batch from the old batch's rows and the new
ones (any order: the engine keeps the rows of one pocket book adjacent), each side
right-aligned under one width and left-padded with zeros, copying each row once (in runs of
adjacent rows). A leaving row is dropped in place (:func:`drop`: the rows after it move up,
the leading columns only padding is left in are cut off the view): no new buffer, and nothing
moves when the rows that leave are the last ones.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

#: Positions of room a layer's buffer keeps beyond what it holds: a step past the room copies
#: the cache once into a new buffer (so once every ``ROOM`` steps), which also returns the
#: room of rows and padding columns that left.
ROOM = 32


def check_cache(model: Any) -> None:
    """The batch is a cache of plain full-attention layers; refuse a base whose cache is not
    (sliding windows, linear attention) rather than answer wrongly."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from adapterkit.errors import ConfigError

    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers
             if type(layer) is not DynamicLayer}
    if kinds:
        raise ConfigError(f"this base's cache has {', '.join(sorted(kinds))} layers; the "
                          "server batches full-attention decoders only (use a session, or "
                          "`adapterkit serve --engine vllm`)")


def cache_argument(model: Any) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers 5.2x on), formerly
    ``past_key_values`` (the cache object is updated in place under either name)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


@functools.cache
def _classes() -> tuple[type[Any], type[Any]]:
    """``(RoomyLayer, BatchCache)``, defined on first use so that importing this module does
    not import torch or transformers."""
    return _define()


def _define() -> tuple[type[Any], type[Any]]:
    from transformers import DynamicCache
    from transformers.cache_utils import Cache, DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A full-attention layer's keys and values: ``keys`` is the view
        ``buffer[:rows, :, start:stop]`` of a buffer with room past ``stop``."""

        def __init__(self, keys_buffer: Any, values_buffer: Any, rows: int, start: int,
                     stop: int) -> None:
            super().__init__()
            self.device = keys_buffer.device
            self._kb, self._vb = keys_buffer, values_buffer
            self._view(rows, start, stop)

        def _view(self, rows: int, start: int, stop: int) -> None:
            self.is_initialized = True  # also after reset(): it holds what the view shows
            self.rows, self.start, self.stop = rows, start, stop
            self.keys = self._kb[:rows, :, start:stop]
            self.values = self._vb[:rows, :, start:stop]
            self._own = self.keys

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any
                   ) -> tuple[Any, Any]:
            """Write the new positions after the held ones, in place; the views back."""
            new = key_states.shape[-2]
            if self.keys is None:  # reset() dropped what it held: start from nothing
                self._regrow(key_states[:, :, :0], value_states[:, :, :0], new)
            elif not self.intact or self.stop + new > self._kb.shape[-2]:
                # out of room, or keys reassigned by a DynamicLayer method (crop,
                # batch_select_indices, offload): a new buffer from what the layer holds
                self._regrow(self.keys, self.values, new)
            self._kb[:self.rows, :, self.stop:self.stop + new].copy_(key_states)
            self._vb[:self.rows, :, self.stop:self.stop + new].copy_(value_states)
            self._view(self.rows, self.start, self.stop + new)
            return self.keys, self.values

        def _regrow(self, keys: Any, values: Any, new: int) -> None:
            held = keys.shape[-2]
            self._kb = _buffer(keys, held + new)
            self._vb = _buffer(values, held + new)
            self._kb[:, :, :held].copy_(keys)
            self._vb[:, :, :held].copy_(values)
            self._view(keys.shape[0], 0, held)

        @property
        def intact(self) -> bool:
            """Whether ``keys`` is still this layer's own view (no DynamicLayer method has
            replaced it)."""
            return self.keys is not None and self.keys is self._own

        def keep(self, rows: Sequence[int], lead: int) -> None:
            """Only ``rows`` (ascending), moved up in place from the first that moves, and not
            the first ``lead`` held columns."""
            import torch

            start = self.start + lead
            moved = next((i for i, row in enumerate(rows) if i != row), len(rows))
            if moved < len(rows):  # indexing reads the rows into a new tensor first: no overlap
                index = torch.tensor(rows[moved:], device=self._kb.device)
                for buffer in (self._kb, self._vb):
                    buffer[moved:len(rows), :, start:self.stop] = \
                        buffer[index, :, start:self.stop]
            self._view(len(rows), start, self.stop)

    class BatchCache(DynamicCache):
        """A ``DynamicCache`` (what the model makes for itself) of :class:`RoomyLayer` s."""

        def __init__(self, layers: list[Any]) -> None:
            Cache.__init__(self, layers=layers)

    return RoomyLayer, BatchCache


def _buffer(like: Any, positions: int, rows: int | None = None) -> Any:
    """An uninitialised buffer of ``like``'s heads, width and dtype (and rows, unless given)
    with room for ``positions`` and ``ROOM`` more (attention reads only the views, never the
    room)."""
    rows = like.shape[0] if rows is None else rows
    return like.new_empty((rows, like.shape[1], positions + ROOM, like.shape[-1]))


def assemble(sources: Sequence[tuple[Any, Any]], order: Sequence[tuple[int, int]]
             ) -> tuple[Any, Any]:
    """A new batch whose row ``i`` is row ``order[i][1]`` of ``sources[order[i][0]]`` (each a
    cache and its mask). Every source's chosen rows keep their columns from the first that is
    not padding in all of them, right-aligned under the widest (the rest left-padded with zeros
    and masked). Each row is copied once; adjacent rows of one source in one copy."""
    leads, spans = [], []
    for s, (_, mask) in enumerate(sources):
        chosen = [row for src, row in order if src == s]
        if not chosen:
            leads.append(0)
            spans.append(0)
            continue
        lead = _lead(mask[chosen])
        leads.append(lead)
        spans.append(mask.shape[1] - lead)
    width = max(spans)
    runs = _runs(order)
    mask = sources[order[0][0]][1].new_zeros((len(order), width))
    for s, first, at, n in runs:
        src = sources[s][1][first:first + n, leads[s]:]
        mask[at:at + n, width - src.shape[1]:] = src
    roomy, batch_cache = _classes()
    layers = []
    for index, like in enumerate(sources[order[0][0]][0].layers):
        kb = _buffer(like.keys, width, len(order))
        vb = _buffer(like.values, width, len(order))
        for s, first, at, n in runs:
            layer = sources[s][0].layers[index]
            span = spans[s]
            pad = width - span
            for buffer, held in ((kb, layer.keys), (vb, layer.values)):
                if pad:
                    buffer[at:at + n, :, :pad].zero_()
                buffer[at:at + n, :, pad:width].copy_(held[first:first + n, :, leads[s]:])
        layers.append(roomy(kb, vb, len(order), 0, width))
    return batch_cache(layers), mask


def drop(cache: Any, mask: Any, keep: Sequence[int]) -> tuple[Any, Any]:
    """Only rows ``keep`` (ascending) of the batch, without the leading columns that are
    padding in all of them: the rows move up in place in a batch built by :func:`assemble`
    (anything else — a cache transformers built, a layer a DynamicLayer method changed, rows
    out of order — is assembled anew)."""
    roomy = _classes()[0]
    if not all(isinstance(layer, roomy) and layer.intact for layer in cache.layers) \
            or list(keep) != sorted(set(keep)):
        return assemble([(cache, mask)], [(0, row) for row in keep])
    mask = mask[list(keep)]
    lead = _lead(mask)
    for layer in cache.layers:
        layer.keep(keep, lead)
    return cache, mask[:, lead:]


def _lead(mask: Any) -> int:
    """The first column that is not padding in every row of ``mask`` (its width if none)."""
    used = mask.sum(0) > 0
    return int(used.nonzero()[0]) if bool(used.any()) else mask.shape[1]


def _runs(order: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """``(source, first row, at, rows)`` for each run of ``order`` taking adjacent rows of one
    source in turn."""
    runs: list[tuple[int, int, int, int]] = []
    for at, (s, row) in enumerate(order):
        if runs and runs[-1][0] == s and runs[-1][1] + runs[-1][3] == row:
            s0, first, start, n = runs[-1]
            runs[-1] = (s0, first, start, n + 1)
        else:
            runs.append((s, row, at, 1))
    return runs
