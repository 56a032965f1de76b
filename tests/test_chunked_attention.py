"""Chunked attention (Llama 4): ChunkedKVCache and its masks, against attention over every key with the chunk rule
written out, and a tiny llama4_text model decoded through its caches in multi-token and single-token steps across
chunk boundaries, against its full forward and transformers'."""

import numpy as np
import pytest
import mlx.core as mx
import torch

from checkpoints import load_reference, make_checkpoint
from model_test_runner import load_hf_folder, probe_tokens, rel_error
from mlx_arch.core.base import scaled_dot_product_attention
from mlx_arch.core.cache import ChunkedKVCache, make_prompt_cache
from mlx_arch.core.kinds import LayerKind

H, D = 2, 8


def _reference(q, k, v, q_positions, chunk):
    """softmax(q k^T / sqrt(D)) v over every key, each query seeing the keys of its own chunk up to itself."""
    scores = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(D)
    keys = np.arange(k.shape[2])
    seen = (keys[None] <= q_positions[:, None]) & (keys[None] // chunk == q_positions[:, None] // chunk)
    scores = np.where(seen, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", weights / weights.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("chunk,steps", [
    (4, [6, 1, 1, 1, 5, 1, 3]),   # prefill across a boundary, single tokens across one, a multi-token step across one
    (3, [1, 1, 1, 1, 7, 2]),      # single tokens from the start, then steps longer than two chunks
    (5, [5, 5, 1, 4, 1]),         # steps that end exactly on chunk boundaries
])
def test_cache_steps_equal_attention_over_every_key(chunk, steps):
    rng = np.random.default_rng(0)
    n = sum(steps)
    q, k, v = (rng.standard_normal((1, H, n, D)).astype(np.float32) for _ in range(3))
    cache, kind, start = ChunkedKVCache(chunk), LayerKind("chunked", chunk), 0
    for N in steps:
        s = slice(start, start + N)
        mask = kind.mask(mx.zeros((1, N, 1)), cache)
        keys, values = cache.update_and_fetch(mx.array(k[:, :, s]), mx.array(v[:, :, s]))
        out = scaled_dot_product_attention(mx.array(q[:, :, s]), keys, values, cache, D**-0.5, mask)
        expected = _reference(q[:, :, s], k[:, :, : start + N], v[:, :, : start + N], np.arange(start, start + N),
                              chunk)
        np.testing.assert_allclose(np.array(out), expected, rtol=1e-5, atol=1e-5)
        start += N
        # Only the chunk of the next token is kept.
        assert cache.start == start // chunk * chunk and cache.state[0].shape[2] == start - cache.start


def test_mask_without_cache():
    kind = LayerKind("chunked", 3)
    assert kind.mask(mx.zeros((1, 1, 4))) is None
    assert kind.mask(mx.zeros((1, 3, 4))) == "causal"
    mask = np.array(kind.mask(mx.zeros((1, 7, 4))))
    q, k = np.arange(7)[:, None], np.arange(7)[None]
    np.testing.assert_array_equal(mask, (k <= q) & (k // 3 == q // 3))


def test_trim_within_the_chunk_and_refused_past_it():
    cache = ChunkedKVCache(4)
    cache.update_and_fetch(mx.zeros((1, H, 6, D)), mx.zeros((1, H, 6, D)))
    assert cache.trim(1) == 1 and cache.offset == 5
    with pytest.raises(NotImplementedError, match="current chunk"):
        cache.trim(3)


def test_state_round_trip():
    cache = ChunkedKVCache(4)
    cache.update_and_fetch(mx.ones((1, H, 6, D)), mx.ones((1, H, 6, D)))
    copy = ChunkedKVCache(4)
    copy.state, copy.meta_state = cache.state, cache.meta_state
    assert (copy.start, copy.offset) == (4, 6)
    assert copy.make_mask(3).shape == (3, 5)


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("llama4"), "llama4_text", tokenizer=False, num_hidden_layers=2,
                           head_dim=16, attention_chunk_size=4, no_rope_layer_interval=2, num_local_experts=4,
                           num_experts_per_tok=2, intermediate_size=32, intermediate_size_mlp=64, floor_scale=3)
    model, config, _ = load_hf_folder(path)
    assert [layer.kind.name for layer in model.layers] == ["chunked", "full"]
    return path, model, config


@pytest.mark.parametrize("steps", [[5, 1, 1, 1, 6, 1, 1, 2], [1] * 14, [3, 9, 2]])
def test_cached_decode_across_chunks_equals_full_and_transformers(llama4, steps):
    path, model, config = llama4
    tokens = probe_tokens(config["vocab_size"], sum(steps))
    with torch.no_grad():
        expected = load_reference(path)(torch.tensor(tokens)).logits.float().numpy()
    full = np.array(model(mx.array(tokens)))
    cache, start, out = make_prompt_cache(model), 0, []
    for N in steps:
        out.append(model(mx.array(tokens[:, start : start + N]), cache=cache))
        start += N
    cached = np.array(mx.concatenate(out, axis=1))
    assert rel_error(full, expected) <= 1e-4
    assert rel_error(cached, full) <= 1e-5
    assert rel_error(cached, expected) <= 1e-4
