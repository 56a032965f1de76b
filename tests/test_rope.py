"""Every RoPE variant against transformers' own rotary embedding and apply_rotary_pos_emb."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_arch.rope import initialize_rope

HEAD_DIM = 32

VARIANTS = {
    "default-base": dict(rope_type="default", rope_theta=500000.0),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=3.0),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16),
    "yarn-mscale": dict(rope_type="yarn", rope_theta=1e6, factor=8.0, original_max_position_embeddings=16, mscale=1.0,
                        mscale_all_dim=0.8, beta_fast=16, beta_slow=2, truncate=False),
    "longrope": dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=16,
                     short_factor=[float(v) for v in np.linspace(1.0, 1.5, HEAD_DIM // 2)],
                     long_factor=[float(v) for v in np.linspace(1.0, 6.0, HEAD_DIM // 2)]),
}


def transformers_rotation(params, x, offset, partial=1.0, max_pos=32):
    """x (1, H, L, D) rotated by transformers (Phi3 for longrope and partial default RoPE, which Llama lacks)."""
    from transformers import LlamaConfig, Phi3Config
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    params = {**params, "partial_rotary_factor": partial}
    if params["rope_type"] == "longrope" or (partial != 1.0 and params["rope_type"] == "default"):
        config = Phi3Config(hidden_size=HEAD_DIM * 2, num_attention_heads=2, max_position_embeddings=max_pos,
                            rope_parameters=params, original_max_position_embeddings=params.get(
                                "original_max_position_embeddings", max_pos))
        rotary = Phi3RotaryEmbedding(config)
    else:
        config = LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, max_position_embeddings=max_pos,
                             rope_parameters=params)
        rotary = LlamaRotaryEmbedding(config)
    t = torch.tensor(np.array(x))
    positions = torch.arange(offset, offset + t.shape[2])[None]
    cos, sin = rotary(t, positions)
    dims = cos.shape[-1]
    rotated, _ = apply_rotary_pos_emb(t[..., :dims], t[..., :dims], cos, sin)
    return torch.cat([rotated, t[..., dims:]], dim=-1).numpy()


def ours(params, x, offset, partial=1.0, max_pos=32):
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    rope = initialize_rope(int(HEAD_DIM * partial), params["rope_theta"], False, scaling, max_pos)
    return np.array(rope(x, offset=offset))


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("offset,length", [(0, 7), (5, 1), (0, 40), (30, 12)])
def test_matches_transformers(name, offset, length):
    params = VARIANTS[name]
    x = mx.array(np.random.default_rng(0).standard_normal((1, 2, length, HEAD_DIM)).astype(np.float32) * 3)
    expected = transformers_rotation(params, x, offset)
    got = ours(params, x, offset)
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("name", ["default-base", "yarn", "longrope"])
@pytest.mark.parametrize("partial", [0.5, 0.25])
def test_partial_rotary_matches_transformers(name, partial):
    params = VARIANTS[name]
    if name == "longrope":
        n = int(HEAD_DIM * partial) // 2
        params = {**params, "short_factor": params["short_factor"][:n], "long_factor": params["long_factor"][:n]}
    x = mx.array(np.random.default_rng(1).standard_normal((1, 2, 20, HEAD_DIM)).astype(np.float32))
    expected = transformers_rotation(params, x, 3, partial=partial)
    got = ours(params, x, 3, partial=partial)
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    assert np.array_equal(got[..., int(HEAD_DIM * partial):], np.array(x)[..., int(HEAD_DIM * partial):])


def test_does_not_mutate_its_input():
    x = mx.array(np.random.default_rng(2).standard_normal((1, 2, 5, HEAD_DIM)).astype(np.float32))
    before = np.array(x)
    for params in VARIANTS.values():
        ours(params, x, 2)
    assert np.array_equal(np.array(x), before)


def test_config_styles_agree():
    x = mx.array(np.random.default_rng(3).standard_normal((1, 2, 6, HEAD_DIM)).astype(np.float32))
    v4 = initialize_rope(HEAD_DIM, 10000.0, False, {"type": "linear", "factor": 2})(x)
    v5 = initialize_rope(HEAD_DIM, 10000.0, False, {"rope_type": "linear", "factor": 2.0})(x)
    assert np.array_equal(np.array(v4), np.array(v5))


def test_traditional_rotates_interleaved_pairs():
    x = mx.array(np.random.default_rng(4).standard_normal((1, 1, 3, 4)).astype(np.float32))
    got = np.array(initialize_rope(4, 10000.0, True)(x, offset=1))
    inv = 1.0 / 10000.0 ** (np.arange(0, 4, 2) / 4)
    xs = np.array(x)
    for i, pos in enumerate([1, 2, 3]):
        for j in range(2):
            c, s = np.cos(pos * inv[j]), np.sin(pos * inv[j])
            a, b = xs[0, 0, i, 2 * j], xs[0, 0, i, 2 * j + 1]
            assert np.allclose(got[0, 0, i, 2 * j : 2 * j + 2], [a * c - b * s, a * s + b * c], atol=1e-5)


def test_unsupported_type_is_refused():
    with pytest.raises(ValueError, match="unsupported rope type 'mrope'"):
        initialize_rope(HEAD_DIM, 10000.0, False, {"rope_type": "mrope"})
