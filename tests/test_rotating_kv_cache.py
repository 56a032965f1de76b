"""RotatingKVCache: what it keeps, and attention through it against full attention over the whole history.

Semantics under test: a query at position p sees the first `keep` tokens (sinks) and the latest
`max_size - keep` tokens up to itself, so at most max_size keys in all (that is what fits in the buffer); with
keep=0 this is the sliding window (p - max_size, p]. A model window, when passed, also restricts to p - k < window.
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_arch.core.cache import RotatingKVCache

B, H, D = 2, 2, 8
MAX_SIZE = 8
CHAT = [7, 1, 1, 1, 5, 1, 1, 9, 1, 1]  # prefill, decode, a chat turn, decode, a turn longer than max_size, ...


def _positions_as_keys(start, n):
    """Keys whose every entry is the token's absolute position, so returned keys tell which tokens they are."""
    pos = np.arange(start, start + n, dtype=np.float32)
    return mx.array(np.broadcast_to(pos[None, None, :, None], (B, H, n, D)).copy())


def _returned_positions(keys):
    return [int(x) for x in np.array(keys)[0, 0, :, 0]]


def _reference_visible(p, max_size, keep, window=None):
    """Positions query p attends to: the sinks, plus the latest max_size - keep tokens, inside the window."""
    sinks = set(range(min(keep, p + 1)))
    recent = set(range(max(0, p - (max_size - keep) + 1), p + 1))
    visible = sinks | recent
    if window is not None:
        visible = {k for k in visible if p - k < window}
    return visible


def _reference_mask(first, n, total, max_size, keep, window):
    mask = np.zeros((n, total), dtype=bool)
    for i in range(n):
        for k in _reference_visible(first + i, max_size, keep, window):
            mask[i, k] = True
    return mask


def _numpy_attention(q, k, v, mask):
    scores = q @ np.swapaxes(k, -1, -2)
    scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


def _masked_softmax_attention(q, k, v, mask):
    """softmax(q k^T) v with the cache's mask applied to scores of shape (B, H, N, K), written out in mlx."""
    scores = q @ k.swapaxes(-1, -2)
    N, K = scores.shape[-2:]
    if isinstance(mask, str):
        assert mask == "causal"
        mask = mx.arange(K - N, K)[:, None] >= mx.arange(K)[None]  # bottom-right aligned
    if mask is not None:
        assert mask.dtype == mx.bool_
        scores = mx.where(mask, scores, -mx.inf)
    return mx.softmax(scores, axis=-1) @ v


@pytest.mark.parametrize("keep", [0, 3])
def test_single_token_updates_keep_the_latest_tokens_and_the_sinks(keep):
    cache = RotatingKVCache(MAX_SIZE, keep=keep, step=4)  # step < max_size: the buffer grows, then wraps
    for p in range(3 * MAX_SIZE + 2):
        assert cache.make_mask(1) is None  # every kept token is visible to the newest one
        keys, values = cache.update_and_fetch(_positions_as_keys(p, 1), _positions_as_keys(p, 1))
        got = _returned_positions(keys)
        assert cache.offset == p + 1
        assert len(got) == min(p + 1, MAX_SIZE)
        assert set(got) == _reference_visible(p, MAX_SIZE, keep)
        assert got[: min(keep, p + 1)] == list(range(min(keep, p + 1)))  # sinks stay in their slots
        assert _returned_positions(values) == got
        state_keys, _ = cache.state
        assert _returned_positions(state_keys) == sorted(got)  # state is in temporal order


def test_multi_token_update_returns_full_windows_in_temporal_order_then_shrinks():
    cache = RotatingKVCache(MAX_SIZE, keep=2)
    cache.update_and_fetch(_positions_as_keys(0, 10), _positions_as_keys(0, 10))
    assert _returned_positions(cache.state[0]) == [0, 1, 4, 5, 6, 7, 8, 9]
    for p in (10, 11):
        cache.update_and_fetch(_positions_as_keys(p, 1), _positions_as_keys(p, 1))
    keys, _ = cache.update_and_fetch(_positions_as_keys(12, 4), _positions_as_keys(12, 4))
    # Query 12 needs the sinks and 6 - 1 earlier recent tokens: 7..11.
    assert _returned_positions(keys) == [0, 1, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert _returned_positions(cache.state[0]) == [0, 1, 10, 11, 12, 13, 14, 15]
    assert cache.offset == 16


@pytest.mark.parametrize("chunks", [CHAT, [11, 1, 3, 1, 1]])
@pytest.mark.parametrize("keep", [0, 2])
@pytest.mark.parametrize("window", [None, 5])
def test_attention_matches_full_history_reference_at_every_step(chunks, keep, window):
    rng = np.random.default_rng(len(chunks) * 10 + keep + (window or 0))
    cache = RotatingKVCache(MAX_SIZE, keep=keep, step=4)
    all_k, all_v = np.zeros((B, H, 0, D), np.float32), np.zeros((B, H, 0, D), np.float32)
    for n in chunks:
        q, k, v = (rng.standard_normal((B, H, n, D)).astype(np.float32) for _ in range(3))
        first = cache.offset
        mask = cache.make_mask(n, window_size=window)
        keys, values = cache.update_and_fetch(mx.array(k), mx.array(v))
        all_k, all_v = np.concatenate([all_k, k], 2), np.concatenate([all_v, v], 2)

        ref_mask = _reference_mask(first, n, first + n, MAX_SIZE, keep, window)
        ref = _numpy_attention(q, all_k, all_v, ref_mask)
        manual = _masked_softmax_attention(mx.array(q), keys, values, mask)
        fused = mx.fast.scaled_dot_product_attention(mx.array(q), keys, values, scale=1.0, mask=mask)
        np.testing.assert_allclose(np.array(manual), ref, atol=1e-5)
        np.testing.assert_allclose(np.array(fused), ref, atol=1e-5)
        assert cache.offset == first + n
        assert cache.state[0].shape[2] == min(cache.offset, MAX_SIZE)  # trimmed back after the update


def test_window_equal_to_max_size_is_the_default_without_sinks():
    for i, n in enumerate(CHAT):
        a, b = RotatingKVCache(MAX_SIZE), RotatingKVCache(MAX_SIZE)
        for c in (a, b):
            for m in CHAT[:i]:
                c.update_and_fetch(mx.zeros((B, H, m, D)), mx.zeros((B, H, m, D)))
        default, explicit = a.make_mask(n), b.make_mask(n, window_size=MAX_SIZE)
        if isinstance(default, mx.array):
            np.testing.assert_array_equal(np.array(default), np.array(explicit))
        else:
            assert default == explicit


def test_mask_kinds():
    cache = RotatingKVCache(MAX_SIZE, keep=0)
    assert cache.make_mask(1) is None
    assert cache.make_mask(MAX_SIZE) == "causal"
    assert isinstance(cache.make_mask(MAX_SIZE + 1), mx.array)  # the window cuts the first key off
    cache.update_and_fetch(mx.zeros((B, H, 3, D)), mx.zeros((B, H, 3, D)))
    assert cache.make_mask(2) == "causal"
    mask = cache.make_mask(1, window_size=2)
    np.testing.assert_array_equal(np.array(mask), [[False, False, True, True]])


def test_state_and_meta_state_round_trip_continue_identically():
    rng = np.random.default_rng(7)
    cache = RotatingKVCache(MAX_SIZE, keep=2)
    for n in [10, 1, 1, 1]:
        cache.update_and_fetch(*(mx.array(rng.standard_normal((B, H, n, D)).astype(np.float32)) for _ in "kv"))
    restored = RotatingKVCache(MAX_SIZE, keep=2)
    restored.state = cache.state
    restored.meta_state = cache.meta_state
    assert restored.offset == cache.offset == 13
    for n in [1, 4, 1]:
        q, k, v = (mx.array(rng.standard_normal((B, H, n, D)).astype(np.float32)) for _ in range(3))
        outs = []
        for c in (cache, restored):
            mask = c.make_mask(n)
            keys, values = c.update_and_fetch(k, v)
            outs.append(np.array(_masked_softmax_attention(q, keys, values, mask)))
        np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)


def test_trim_only_before_eviction():
    cache = RotatingKVCache(MAX_SIZE, keep=2)
    cache.update_and_fetch(_positions_as_keys(0, 6), _positions_as_keys(0, 6))
    assert cache.is_trimmable()
    assert cache.trim(2) == 2 and cache.offset == 4
    keys, _ = cache.update_and_fetch(_positions_as_keys(40, 1), _positions_as_keys(40, 1))
    assert _returned_positions(keys) == [0, 1, 2, 3, 40]
    for p in range(5, 9):
        cache.update_and_fetch(_positions_as_keys(p, 1), _positions_as_keys(p, 1))
    assert not cache.is_trimmable()
    assert cache.trim(0) == 0
    with pytest.raises(NotImplementedError, match="evict"):
        cache.trim(1)


def test_unsupported_and_invalid():
    with pytest.raises(NotImplementedError):
        RotatingKVCache(MAX_SIZE).to_quantized()
    with pytest.raises(ValueError):
        RotatingKVCache(4, keep=4)
    cache = RotatingKVCache(MAX_SIZE)
    assert cache.empty() and cache.nbytes == 0
    cache.update_and_fetch(mx.zeros((B, H, 1, D)), mx.zeros((B, H, 1, D)))
    assert not cache.empty() and cache.nbytes > 0
