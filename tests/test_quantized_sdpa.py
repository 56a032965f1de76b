"""The written-out attention paths (quantized KV cache, soft-capped scores) against numpy references."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_arch.core.base import scaled_dot_product_attention


class _QuantCache:
    def __init__(self, bits, group_size):
        self.bits, self.group_size = bits, group_size


def _reference(q, k, v, scale, mask, softcap=None):
    """softmax(q k^T) v in numpy, with GQA by repeating KV heads (scores capped as gemma2 does)."""
    q, k, v = (np.array(x, dtype=np.float64) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    scores = q @ k.swapaxes(-1, -2) * scale
    if softcap is not None:
        scores = np.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return (scores / scores.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("L", [1, 5])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_quantized_matches_dequantized(n_heads, n_kv, bits, L, softcap):
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
    cache = _QuantCache(bits, group)
    out = scaled_dot_product_attention(q, qk, qv, cache, D**-0.5, mx.array(mask), softcap=softcap)
    expected = _reference(q, dk, dv, D**-0.5, mask, softcap)
    assert np.allclose(np.array(out), expected, atol=2e-4)

    causal = scaled_dot_product_attention(q, qk, qv, cache, D**-0.5, "causal", softcap=softcap)
    expected = _reference(q, dk, dv, D**-0.5, np.arange(S - L, S)[:, None] >= np.arange(S)[None], softcap)
    assert np.allclose(np.array(causal), expected, atol=2e-4)


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (8, 2)])
def test_softcapped_float_attention(n_heads, n_kv):
    rng = np.random.default_rng(n_kv)
    q = mx.array(3 * rng.standard_normal((2, n_heads, 4, 32)).astype(np.float32))
    k = mx.array(rng.standard_normal((2, n_kv, 10, 32)).astype(np.float32))
    v = mx.array(rng.standard_normal((2, n_kv, 10, 32)).astype(np.float32))
    causal = np.arange(6, 10)[:, None] >= np.arange(10)[None]
    out = np.array(scaled_dot_product_attention(q, k, v, None, 32**-0.5, "causal", softcap=2.0))
    assert np.allclose(out, _reference(q, k, v, 32**-0.5, causal, 2.0), atol=1e-5)
    assert not np.allclose(out, _reference(q, k, v, 32**-0.5, causal), atol=1e-2)  # the cap changes the result


def test_quantized_close_to_float_at_8_bits():
    rng = np.random.default_rng(1)
    q = mx.array(rng.standard_normal((1, 4, 3, 64)).astype(np.float32))
    k = mx.array(rng.standard_normal((1, 2, 9, 64)).astype(np.float32))
    v = mx.array(rng.standard_normal((1, 2, 9, 64)).astype(np.float32))
    out = scaled_dot_product_attention(q, mx.quantize(k, 64, 8), mx.quantize(v, 64, 8), _QuantCache(8, 64), 0.125,
                                       "causal")
    expected = _reference(q, k, v, 0.125, np.arange(6, 9)[:, None] >= np.arange(9)[None])
    assert np.abs(np.array(out) - expected).max() < 0.05


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {"head_dim": 32, "num_key_value_heads": 2}),
    ("gemma2", {"head_dim": 32, "num_hidden_layers": 2, "sliding_window": 64, "attn_logit_softcapping": 1.0,
               "query_pre_attn_scalar": 1}),
])
def test_decode_through_a_quantized_kv_cache(tmp_path, model_type, overrides):
    """A model decoding through 8-bit KV caches stays close to its full forward pass (gemma2: soft-capped scores
    on the quantized path)."""
    from model_test_runner import build_case, probe_tokens, rel_error
    from mlx_arch.core.cache import KVCache, QuantizedKVCache, make_prompt_cache

    _, model, config, _ = build_case(tmp_path, {"id": model_type, "model_type": model_type, "overrides": overrides},
                                     "v5")
    tokens = mx.array(probe_tokens(config["vocab_size"], 12))
    full = model(tokens)
    cache = [QuantizedKVCache(group_size=32, bits=8) if type(c) is KVCache else c for c in make_prompt_cache(model)]
    assert any(isinstance(c, QuantizedKVCache) for c in cache)
    steps = [model(tokens[:, :6], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(6, 12)]
    err = rel_error(mx.concatenate(steps, axis=1), full)
    assert 0 < err < 2e-2, err  # 8-bit keys and values: close, not exact
