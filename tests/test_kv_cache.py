"""KVCache and QuantizedKVCache: stored values, offsets, trimming, masks; prompt-cache helpers.

References are built independently with numpy (concatenation of everything fed in, masks from explicit loops).
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_arch.core.cache import (
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)

B, H, D, DV = 1, 2, 8, 4  # values get their own head_dim to catch mix-ups between the two buffers


def _chunk(rng, n, d=D):
    return rng.standard_normal((B, H, n, d)).astype(np.float32)


def _feed(cache, rng, sizes):
    """Feed chunks of the given sizes; returns (numpy keys, numpy values, last returned mx pair)."""
    ks, vs, out = [], [], None
    for n in sizes:
        k, v = _chunk(rng, n), _chunk(rng, n, DV)
        ks.append(k)
        vs.append(v)
        out = cache.update_and_fetch(mx.array(k), mx.array(v))
    return np.concatenate(ks, axis=2), np.concatenate(vs, axis=2), out


def _expected_mask(N, offset, window=None):
    """Loop-built mask: query offset+i sees key j iff j <= offset+i (and within the window)."""
    mask = np.zeros((N, offset + N), dtype=bool)
    for i in range(N):
        p = offset + i
        for j in range(offset + N):
            mask[i, j] = j <= p and (window is None or p - j < window)
    return mask


def test_growth_across_step_boundaries_keeps_all_values():
    rng = np.random.default_rng(0)
    cache = KVCache(step=4)
    ks, vs = [], []
    for n in [3, 1, 1, 6, 1, 9, 1]:  # crosses 4, 8, 12, 16, 20 and a chunk larger than step
        k, v = _chunk(rng, n), _chunk(rng, n, DV)
        ks.append(k)
        vs.append(v)
        keys, values = cache.update_and_fetch(mx.array(k), mx.array(v))
        np.testing.assert_array_equal(np.array(keys), np.concatenate(ks, axis=2))
        np.testing.assert_array_equal(np.array(values), np.concatenate(vs, axis=2))
        assert cache.offset == sum(x.shape[2] for x in ks)
    assert cache.offset == 22
    assert cache.nbytes >= (22 * D + 22 * DV) * B * H * 4


def test_empty_and_nbytes():
    cache = KVCache()
    assert cache.empty() and cache.nbytes == 0
    cache.update_and_fetch(mx.zeros((B, H, 1, D)), mx.zeros((B, H, 1, DV)))
    assert not cache.empty() and cache.nbytes > 0


def test_state_round_trip():
    rng = np.random.default_rng(1)
    cache = KVCache(step=4)
    ref_k, ref_v, _ = _feed(cache, rng, [5, 1])
    keys, values = cache.state
    np.testing.assert_array_equal(np.array(keys), ref_k)
    np.testing.assert_array_equal(np.array(values), ref_v)

    restored = KVCache(step=4)
    restored.state = (keys, values)
    assert restored.offset == 6 and restored.is_trimmable()
    k, v = _chunk(rng, 3), _chunk(rng, 3, DV)
    keys, values = restored.update_and_fetch(mx.array(k), mx.array(v))
    np.testing.assert_array_equal(np.array(keys), np.concatenate([ref_k, k], axis=2))
    np.testing.assert_array_equal(np.array(values), np.concatenate([ref_v, v], axis=2))


def test_trim_then_update_overwrites_the_removed_tokens():
    rng = np.random.default_rng(2)
    cache = KVCache(step=4)
    ref_k, ref_v, _ = _feed(cache, rng, [6, 1])
    assert cache.trim(3) == 3 and cache.offset == 4
    assert cache.trim(100) == 4 and cache.offset == 0  # never more than stored
    cache.state = (mx.array(ref_k), mx.array(ref_v))
    assert cache.trim(2) == 2
    k, v = _chunk(rng, 2), _chunk(rng, 2, DV)
    keys, values = cache.update_and_fetch(mx.array(k), mx.array(v))
    np.testing.assert_array_equal(np.array(keys), np.concatenate([ref_k[:, :, :5], k], axis=2))
    np.testing.assert_array_equal(np.array(values), np.concatenate([ref_v[:, :, :5], v], axis=2))
    assert np.array(cache.state[0]).shape[2] == 7


def test_make_mask_none_causal_and_arrays():
    cache = KVCache()
    assert cache.make_mask(1) is None
    assert cache.make_mask(5) == "causal"
    assert cache.make_mask(5, window_size=5) == "causal"  # the window cuts nothing off yet
    np.testing.assert_array_equal(np.array(cache.make_mask(5, window_size=3)), _expected_mask(5, 0, 3))

    cache.update_and_fetch(mx.zeros((B, H, 6, D)), mx.zeros((B, H, 6, DV)))
    assert cache.make_mask(1) is None
    assert cache.make_mask(1, window_size=7) is None
    assert cache.make_mask(3) == "causal"
    for N, window in [(1, 4), (3, 4), (3, 8)]:
        mask = cache.make_mask(N, window_size=window)
        assert mask.dtype == mx.bool_
        np.testing.assert_array_equal(np.array(mask), _expected_mask(N, 6, window))


def _numpy_attention(q, k, v, mask):
    scores = q @ np.swapaxes(k, -1, -2)
    scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("window", [None, 5])
def test_masks_give_causal_attention_step_by_step(window):
    """The mask (None, "causal" or array) fed to the fused kernel matches a numpy causal reference."""
    rng = np.random.default_rng(3)
    cache = KVCache(step=4)
    qs, ks, vs = [], [], []
    for n in [4, 1, 1, 3, 1]:
        q, k, v = _chunk(rng, n), _chunk(rng, n), _chunk(rng, n, DV)
        mask = cache.make_mask(n, window_size=window)
        keys, values = cache.update_and_fetch(mx.array(k), mx.array(v))
        out = mx.fast.scaled_dot_product_attention(mx.array(q), keys, values, scale=1.0, mask=mask)
        ks.append(k)
        vs.append(v)
        ref = _numpy_attention(
            q, np.concatenate(ks, 2), np.concatenate(vs, 2), _expected_mask(n, cache.offset - n, window)
        )
        np.testing.assert_allclose(np.array(out), ref, atol=1e-5)


def _dequantize(triple, cache):
    return np.array(mx.dequantize(*triple, group_size=cache.group_size, bits=cache.bits))


QD = 64  # quantization works in groups along head_dim, so head_dim must be a multiple of group_size


def test_quantized_cache_dequantizes_close_to_the_stored_values():
    rng = np.random.default_rng(4)
    cache = QuantizedKVCache(group_size=32, bits=8, step=4)
    assert cache.bits == 8 and cache.group_size == 32
    ks, vs = [], []
    for n in [3, 1, 2, 1]:  # crosses the step boundary at 4
        k, v = _chunk(rng, n, QD), _chunk(rng, n, QD)
        ks.append(k)
        vs.append(v)
        keys, values = cache.update_and_fetch(mx.array(k), mx.array(v))
        assert isinstance(keys, tuple) and len(keys) == 3
        assert cache.offset == sum(x.shape[2] for x in ks)
        # 8 bits over a group's range (about 6 for normal samples): error at most half a step, ~0.012.
        np.testing.assert_allclose(_dequantize(keys, cache), np.concatenate(ks, 2), atol=0.03)
        np.testing.assert_allclose(_dequantize(values, cache), np.concatenate(vs, 2), atol=0.03)
    assert cache.make_mask(1) is None and cache.make_mask(2) == "causal"

    assert cache.trim(2) == 2 and cache.offset == 5
    k, v = _chunk(rng, 1, QD), _chunk(rng, 1, QD)
    keys, _ = cache.update_and_fetch(mx.array(k), mx.array(v))
    expected = np.concatenate([np.concatenate(ks, 2)[:, :, :5], k], 2)
    np.testing.assert_allclose(_dequantize(keys, cache), expected, atol=0.03)


def test_quantized_state_round_trip():
    rng = np.random.default_rng(5)
    cache = QuantizedKVCache(group_size=64, bits=8)
    cache.update_and_fetch(mx.array(_chunk(rng, 3, QD)), mx.array(_chunk(rng, 3, QD)))
    restored = QuantizedKVCache(group_size=64, bits=8)
    restored.state = cache.state
    assert restored.offset == 3
    for a, b in zip(restored.state[0] + restored.state[1], cache.state[0] + cache.state[1]):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_to_quantized():
    rng = np.random.default_rng(6)
    cache = KVCache(step=4)
    k, v = _chunk(rng, 5, QD), _chunk(rng, 5, QD)
    cache.update_and_fetch(mx.array(k), mx.array(v))
    quantized = cache.to_quantized(group_size=64, bits=8)
    assert isinstance(quantized, QuantizedKVCache)
    assert quantized.offset == 5 and quantized.bits == 8 and quantized.group_size == 64
    keys, values = quantized.state
    np.testing.assert_allclose(_dequantize(keys, quantized), k, atol=0.03)
    np.testing.assert_allclose(_dequantize(values, quantized), v, atol=0.03)
    k2, v2 = _chunk(rng, 1, QD), _chunk(rng, 1, QD)
    keys, _ = quantized.update_and_fetch(mx.array(k2), mx.array(v2))
    np.testing.assert_allclose(_dequantize(keys, quantized), np.concatenate([k, k2], 2), atol=0.03)
    assert KVCache().to_quantized().empty()


class _Layers:
    def __init__(self, n):
        self.layers = [object()] * n


class _WithMakeCache(_Layers):
    def make_cache(self):
        return ["custom"]


def test_make_prompt_cache():
    caches = make_prompt_cache(_Layers(3))
    assert len(caches) == 3 and all(type(c) is KVCache for c in caches)
    assert caches[0] is not caches[1]
    rotating = make_prompt_cache(_Layers(2), max_kv_size=16)
    assert all(isinstance(c, RotatingKVCache) and c.max_size == 16 and c.keep == 4 for c in rotating)
    assert make_prompt_cache(_WithMakeCache(3)) == ["custom"]


def test_trim_prompt_cache():
    caches = make_prompt_cache(_Layers(2))
    for c in caches:
        c.update_and_fetch(mx.zeros((B, H, 5, D)), mx.zeros((B, H, 5, DV)))
    assert can_trim_prompt_cache(caches)
    assert trim_prompt_cache(caches, 2) == 2
    assert [c.offset for c in caches] == [3, 3]

    rotating = [RotatingKVCache(4), RotatingKVCache(4)]
    for c in rotating:
        c.update_and_fetch(mx.zeros((B, H, 6, D)), mx.zeros((B, H, 6, DV)))
    assert not can_trim_prompt_cache(rotating)
    assert trim_prompt_cache(rotating, 1) == 0
    assert [c.offset for c in rotating] == [6, 6]


def test_state_cache_keeps_slots_and_refuses_rewind():
    import pytest
    from mlx_arch.core.cache import StateCache, can_trim_prompt_cache, trim_prompt_cache

    c = StateCache(2)
    assert c.empty() and c.make_mask(3) is None
    c[0], c[1] = mx.zeros((1, 3, 4)), mx.ones((1, 2, 2))
    c.advance(3)
    assert not c.empty() and c.nbytes() == (12 + 4) * 4 and c.meta_state == (3,)
    assert not can_trim_prompt_cache([c]) and trim_prompt_cache([c], 1) == 0
    with pytest.raises(ValueError, match="cannot be rewound"):
        c.trim(1)
    assert not hasattr(c, "offset")  # positions never come from a recurrent state
