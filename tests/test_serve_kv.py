"""The serving batch's KV cache (:mod:`adapterkit.serving.kv`): rows assembled, dropped in place,
and grown by one column a step, checked against transformers' own ``DynamicCache`` and against
tensors padded by hand."""

from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from adapterkit.serving import kv


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _decode(model, cache, mask, last, lengths, steps):
    """Greedy steps as the engine takes them; the logits of each."""
    out = []
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        logits = model(input_ids=last, attention_mask=mask, position_ids=lengths[:, None],
                       use_cache=True, cache=cache, logits_to_keep=1).logits[:, -1]
        out.append(logits)
        last, lengths = logits.argmax(-1, keepdim=True), lengths + 1
    return out


def test_decoding_on_the_roomy_cache_equals_transformers_dynamic_cache(monkeypatch):
    """Three left-padded rows decode 20 steps, the room (4 here) running out five times: the
    same logits as on transformers' own DynamicCache, to the bit."""
    monkeypatch.setattr(kv, "ROOM", 4)
    model = _model()
    ids, mask = _left_padded([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    lengths = mask.sum(1)
    with torch.inference_mode():
        results = []
        for roomy in (False, True):
            cache = DynamicCache(config=model.config)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           use_cache=True, cache=cache, logits_to_keep=1).logits[:, -1]
            step_mask = mask
            if roomy:
                cache, step_mask = kv.assemble([(cache, mask)], [(0, 0), (0, 1), (0, 2)])
                assert all(type(layer).__name__ == "RoomyLayer" for layer in cache.layers)
            results.append(_decode(model, cache, step_mask, logits.argmax(-1, keepdim=True),
                                   lengths, 20))
            if roomy:  # the buffer grew: room past what it holds, and never more than ROOM
                layer = cache.layers[0]
                assert layer.keys.shape[-2] == 5 + 20
                assert 0 < layer._kb.shape[-2] - layer.stop <= kv.ROOM
    for want, got in zip(*results):
        assert torch.equal(want, got)


def _source(rows: int, width: int, lengths: list[int], seed: int):
    """A cache of two layers with random keys/values and a left-padded mask (zeros under
    padding, as a prefill leaves them only by accident: the test must not rely on it)."""
    torch.manual_seed(seed)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    layers = [(torch.randn(rows, 2, width, 3), torch.randn(rows, 2, width, 3))
              for _ in range(2)]
    return DynamicCache(ddp_cache_data=layers), mask


def _by_hand(sources, order):
    """The assembled batch written out: each chosen row right-aligned, zeros in front."""
    spans = []
    for s, (_, mask) in enumerate(sources):
        chosen = [r for src, r in order if src == s]
        lead = min(int(mask[r].nonzero()[0]) for r in chosen) if chosen else mask.shape[1]
        spans.append((lead, mask.shape[1] - lead))
    width = max(span for _, span in spans)
    layers = []
    for index in range(2):
        keys, values = [], []
        for s, r in order:
            lead, span = spans[s]
            layer = sources[s][0].layers[index]
            pad = torch.zeros(2, width - span, 3)
            keys.append(torch.cat([pad, layer.keys[r, :, lead:]], dim=1))
            values.append(torch.cat([pad, layer.values[r, :, lead:]], dim=1))
        layers.append((torch.stack(keys), torch.stack(values)))
    mask = torch.stack([torch.cat([torch.zeros(width - spans[s][1], dtype=torch.long),
                                   sources[s][1][r, spans[s][0]:]]) for s, r in order])
    return layers, mask


def test_assemble_interleaves_two_sources_right_aligned_with_zeros_in_front():
    old = _source(3, 6, [6, 2, 4], seed=1)
    new = _source(2, 9, [3, 9], seed=2)
    order = [(1, 1), (0, 0), (0, 1), (1, 0), (0, 2)]
    cache, mask = kv.assemble([old, new], order)
    layers, want_mask = _by_hand([old, new], order)
    assert torch.equal(mask, want_mask)
    for layer, (keys, values) in zip(cache.layers, layers):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    # a subset of one source: the columns that are padding in every chosen row are cut
    cache, mask = kv.assemble([old], [(0, 1), (0, 2)])
    layers, want_mask = _by_hand([old], [(0, 1), (0, 2)])
    assert mask.shape[1] == 4 and torch.equal(mask, want_mask)
    assert torch.equal(cache.layers[1].keys, layers[1][0])


def test_drop_moves_rows_up_in_place_cuts_padding_and_keeps_decoding_right():
    old = _source(4, 7, [2, 7, 3, 5], seed=3)
    cache, mask = kv.assemble([old], [(0, r) for r in range(4)])
    buffers = [layer._kb for layer in cache.layers]
    kept, kept_mask = kv.drop(cache, mask, [0, 2, 3])
    assert all(layer._kb is b for layer, b in zip(kept.layers, buffers))  # moved in place
    layers, want_mask = _by_hand([old], [(0, 0), (0, 2), (0, 3)])
    assert kept_mask.shape[1] == 5 and torch.equal(kept_mask, want_mask)
    for layer, (keys, values) in zip(kept.layers, layers):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    # the next step's column goes after the held ones, for the kept rows
    step_k, step_v = torch.randn(3, 2, 1, 3), torch.randn(3, 2, 1, 3)
    for index, layer in enumerate(kept.layers):
        keys, values = layer.update(step_k, step_v)
        assert torch.equal(keys, torch.cat([layers[index][0], step_k], dim=2))
        assert torch.equal(values, torch.cat([layers[index][1], step_v], dim=2))
    kept_mask = torch.cat([kept_mask, kept_mask.new_ones((3, 1))], dim=1)
    # rows out of order, or a cache transformers built: assembled anew instead
    again, again_mask = kv.drop(kept, kept_mask, [2, 0])
    assert again.layers[1]._kb is not buffers[1]
    assert torch.equal(again.layers[1].keys[0], keys[2])
    assert torch.equal(again_mask, kept_mask[[2, 0]])
    plain, plain_mask = kv.drop(old[0], old[1], [1, 3])
    layers, want_mask = _by_hand([old], [(0, 1), (0, 3)])
    assert torch.equal(plain_mask, want_mask)
    for layer, (keys, values) in zip(plain.layers, layers):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_a_layer_changed_by_a_dynamic_layer_method_is_adopted_not_overwritten():
    """``DynamicLayer`` methods reassign ``keys`` (``crop``, ``batch_select_indices``) or drop
    it (``reset``): the next update starts from what they left, and a drop assembles anew
    rather than move rows of the stale buffer."""
    old = _source(2, 4, [4, 2], seed=4)
    cache, mask = kv.assemble([old], [(0, 0), (0, 1)])
    layer = cache.layers[0]
    held = layer.keys.clone()
    layer.crop(-1)
    step = torch.randn(2, 2, 1, 3)
    keys, _ = layer.update(step, step)
    assert torch.equal(keys, torch.cat([held[:, :, :-1], step], dim=2))
    layer.reset()
    assert layer.get_seq_length() == 0
    keys, values = layer.update(step, step)
    assert torch.equal(keys, step) and torch.equal(values, step)
    assert layer.is_initialized and layer.get_seq_length() == 1

    cache, mask = kv.assemble([old], [(0, 0), (0, 1)])
    for layer in cache.layers:
        layer.batch_select_indices(torch.tensor([1, 0]))  # the rows swapped
    assert not any(layer.intact for layer in cache.layers)
    kept, kept_mask = kv.drop(cache, mask[[1, 0]], [1])  # keeps the first source row
    assert torch.equal(kept_mask, mask[[0]])
    for layer, source in zip(kept.layers, old[0].layers):
        assert torch.equal(layer.keys, source.keys[[0]])
        assert torch.equal(layer.values, source.values[[0]])
