"""The batch's KV cache: transformers' :class:`~transformers.DynamicCache` holding left-padded
rows, with a 2-D attention mask (1 for a real token, 0 for padding).

Rows join and leave a running batch between decode steps. A joining group is prefilled on a
cache of its own, then the shorter of the two sides is left-padded with masked zeros and the
two are stacked along the batch; a leaving row is dropped, and the leading columns only padding
is left in are trimmed. Each result is a new cache built from tensors through ``DynamicCache``'s
constructor, so nothing here relies on a cache's private state.
"""

from __future__ import annotations

from typing import Any


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


def merge(cache: Any, mask: Any, other: Any, other_mask: Any) -> tuple[Any, Any]:
    """``cache``'s rows then ``other``'s, in one cache: the shorter side left-padded."""
    import torch
    from transformers import DynamicCache

    width, other_width = mask.shape[1], other_mask.shape[1]
    layers = [(torch.cat([_pad(a.keys, other_width - width), _pad(b.keys, width - other_width)]),
               torch.cat([_pad(a.values, other_width - width),
                          _pad(b.values, width - other_width)]))
              for a, b in zip(cache.layers, other.layers)]
    merged_mask = torch.cat([_pad(mask, other_width - width), _pad(other_mask,
                                                                  width - other_width)])
    return DynamicCache(ddp_cache_data=layers), merged_mask


def select(cache: Any, mask: Any, rows: list[int]) -> tuple[Any, Any]:
    """Only ``rows`` of the batch, without the leading columns that are padding in all of
    them."""
    import torch
    from transformers import DynamicCache

    mask = mask[rows]
    lead = int((mask.sum(0) > 0).nonzero()[0])
    index = torch.tensor(rows, device=mask.device)
    layers = [(layer.keys.index_select(0, index)[:, :, lead:],
               layer.values.index_select(0, index)[:, :, lead:]) for layer in cache.layers]
    return DynamicCache(ddp_cache_data=layers), mask[:, lead:]


def _pad(tensor: Any, n: int) -> Any:
    """``n`` zero positions in front: the sequence axis of a key/value tensor (batch × heads
    × positions × dim) or of a mask (batch × positions)."""
    import torch

    if n <= 0:
        return tensor
    axis = 2 if tensor.dim() == 4 else 1
    shape = list(tensor.shape)
    shape[axis] = n
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
