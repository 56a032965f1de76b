"""The quantized-KV attention path against full-precision attention on the dequantized cache."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_arch.base import scaled_dot_product_attention


class _QuantCache:
    def __init__(self, bits, group_size):
        self.bits, self.group_size = bits, group_size


def _reference(q, k, v, scale, mask):
    """softmax(q k^T) v in numpy, with GQA by repeating KV heads."""
    q, k, v = (np.array(x, dtype=np.float64) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    scores = q @ k.swapaxes(-1, -2) * scale
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return (scores / scores.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("L", [1, 5])
def test_quantized_matches_dequantized(n_heads, n_kv, bits, L):
    rng = np.random.default_rng(bits + L)
    S, D, group = 12, 64, 32
    q = mx.array(rng.standard_normal((2, n_heads, L, D)).astype(np.float32))
    k = mx.array(rng.standard_normal((2, n_kv, S, D)).astype(np.float32))
    v = mx.array(rng.standard_normal((2, n_kv, S, D)).astype(np.float32))
    qk, qv = mx.quantize(k, group_size=group, bits=bits), mx.quantize(v, group_size=group, bits=bits)
    dk, dv = mx.dequantize(*qk, group_size=group, bits=bits), mx.dequantize(*qv, group_size=group, bits=bits)

    # Boolean mask: causal over the last L keys plus one masked-out early key.
    mask = np.arange(S - L, S)[:, None] >= np.arange(S)[None]
    mask[:, 0] = False
    out = scaled_dot_product_attention(q, qk, qv, _QuantCache(bits, group), D**-0.5, mx.array(mask))
    expected = _reference(q, dk, dv, D**-0.5, mask)
    assert np.allclose(np.array(out), expected, atol=2e-4)

    causal = scaled_dot_product_attention(q, qk, qv, _QuantCache(bits, group), D**-0.5, "causal")
    expected = _reference(q, dk, dv, D**-0.5, np.arange(S - L, S)[:, None] >= np.arange(S)[None])
    assert np.allclose(np.array(causal), expected, atol=2e-4)


def test_quantized_close_to_float_at_8_bits():
    rng = np.random.default_rng(1)
    q = mx.array(rng.standard_normal((1, 4, 3, 64)).astype(np.float32))
    k = mx.array(rng.standard_normal((1, 2, 9, 64)).astype(np.float32))
    v = mx.array(rng.standard_normal((1, 2, 9, 64)).astype(np.float32))
    out = scaled_dot_product_attention(q, mx.quantize(k, 64, 8), mx.quantize(v, 64, 8), _QuantCache(8, 64), 0.125,
                                       "causal")
    expected = _reference(q, k, v, 0.125, np.arange(6, 9)[:, None] >= np.arange(9)[None])
    assert np.abs(np.array(out) - expected).max() < 0.05
