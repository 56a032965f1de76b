"""Every RoPE variant against transformers' own rotary embedding and apply_rotary_pos_emb."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_arch.core.rope import initialize_rope

HEAD_DIM = 32
MAX_POS = 32  # max_position_embeddings; the scaled variants use original_max_position_embeddings = 16

VARIANTS = {
    "default-base": dict(rope_type="default", rope_theta=500000.0),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=3.0),
    "dynamic-base": dict(rope_type="dynamic", rope_theta=1e6, factor=2.0),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16),
    "yarn-mscale": dict(rope_type="yarn", rope_theta=1e6, factor=8.0, original_max_position_embeddings=16, mscale=1.0,
                        mscale_all_dim=0.8, beta_fast=16, beta_slow=2, truncate=False),
    "yarn-attention-factor": dict(rope_type="yarn", rope_theta=500000.0, factor=2.0,
                                  original_max_position_embeddings=16, attention_factor=1.3, beta_fast=8.0,
                                  beta_slow=0.5),
    "longrope": dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=16,
                     short_factor=[float(v) for v in np.linspace(1.0, 1.5, HEAD_DIM // 2)],
                     long_factor=[float(v) for v in np.linspace(1.0, 6.0, HEAD_DIM // 2)]),
    "longrope-factor": dict(rope_type="longrope", rope_theta=1e6, original_max_position_embeddings=16, factor=4.0,
                            short_factor=[float(v) for v in np.linspace(1.2, 1.0, HEAD_DIM // 2)],
                            long_factor=[float(v) for v in np.linspace(2.0, 9.0, HEAD_DIM // 2)]),
}


def variant(name, partial=1.0):
    """The variant's parameters, with longrope factor lists cut to the rotated pairs."""
    params = dict(VARIANTS[name])
    if params["rope_type"] == "longrope":
        n = int(HEAD_DIM * partial) // 2
        params["short_factor"], params["long_factor"] = params["short_factor"][:n], params["long_factor"][:n]
    return params


def transformers_rotary(params, partial=1.0, max_pos=MAX_POS):
    """transformers' rotary embedding (Phi3 for longrope and partial default RoPE, which Llama's default lacks)."""
    from transformers import LlamaConfig, Phi3Config
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    params = {**params, "partial_rotary_factor": partial}
    if params["rope_type"] == "longrope" or (partial != 1.0 and params["rope_type"] == "default"):
        config = Phi3Config(hidden_size=HEAD_DIM * 2, num_attention_heads=2, max_position_embeddings=max_pos,
                            rope_parameters=params, original_max_position_embeddings=params.get(
                                "original_max_position_embeddings", max_pos))
        return Phi3RotaryEmbedding(config)
    config = LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, max_position_embeddings=max_pos,
                         rope_parameters=params)
    return LlamaRotaryEmbedding(config)


def transformers_apply(rotary, x, offset):
    """x (1, H, L, D) rotated by `rotary` at positions offset .. offset + L - 1 with apply_rotary_pos_emb."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    t = torch.tensor(np.array(x))
    positions = torch.arange(offset, offset + t.shape[2])[None]
    cos, sin = rotary(t, positions)
    dims = cos.shape[-1]
    rotated, _ = apply_rotary_pos_emb(t[..., :dims], t[..., :dims], cos, sin)
    return torch.cat([rotated, t[..., dims:]], dim=-1).numpy()


def transformers_rotation(params, x, offset, partial=1.0, max_pos=MAX_POS):
    return transformers_apply(transformers_rotary(params, partial, max_pos), x, offset)


def our_rope(params, partial=1.0, max_pos=MAX_POS, traditional=False):
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return initialize_rope(int(HEAD_DIM * partial), params["rope_theta"], traditional, scaling, max_pos)


def ours(params, x, offset, partial=1.0, max_pos=MAX_POS, traditional=False):
    return np.array(our_rope(params, partial, max_pos, traditional)(x, offset=offset))


def random_x(seed, length, scale=1.0):
    return mx.array(np.random.default_rng(seed).standard_normal((1, 2, length, HEAD_DIM)).astype(np.float32) * scale)


def assert_close(got, expected):
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("name", sorted(VARIANTS))
# Lengths below, at and past original_max_position_embeddings (16) and max_position_embeddings (32).
@pytest.mark.parametrize("offset,length", [(0, 7), (5, 1), (0, 16), (0, 17), (15, 1), (16, 1), (0, 32), (0, 40),
                                           (30, 12), (31, 1), (32, 1)])
def test_matches_transformers(name, offset, length):
    x = random_x(0, length, scale=3.0)
    assert_close(ours(variant(name), x, offset), transformers_rotation(variant(name), x, offset))


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("partial,offset", [(0.5, 3), (0.25, 3), (0.5, 30)])
def test_partial_rotary_matches_transformers(name, partial, offset):
    params = variant(name, partial)
    x = random_x(1, 20)
    got = ours(params, x, offset, partial=partial)
    assert_close(got, transformers_rotation(params, x, offset, partial=partial))
    dims = int(HEAD_DIM * partial)
    assert np.array_equal(got[..., dims:], np.array(x)[..., dims:])


@pytest.mark.parametrize("name", ["dynamic", "longrope", "yarn-mscale"])
def test_prefill_then_decode_matches_transformers(name):
    """One transformers rotary object across calls, as in generation: prefill 10 tokens, then decode to 40."""
    params = variant(name)
    rotary, rope = transformers_rotary(params), our_rope(params)
    x = random_x(5, 40)
    chunks = [(0, 10)] + [(p, p + 1) for p in range(10, 40)]
    for start, stop in chunks:
        step = x[:, :, start:stop]
        assert_close(np.array(rope(step, offset=start)), transformers_apply(rotary, step, start))


def _deinterleave(a):
    """Interleaved pairs (x0, x1, x2, x3, ...) to halves (x0, x2, ..., x1, x3, ...) within the rotated features."""
    return np.concatenate([a[..., 0::2], a[..., 1::2]], axis=-1)


def _interleave(a):
    half = a.shape[-1] // 2
    out = np.empty_like(a)
    out[..., 0::2], out[..., 1::2] = a[..., :half], a[..., half:]
    return out


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_traditional_is_transformers_rotation_of_interleaved_pairs(name, partial):
    """GPT-J style pairs (2i, 2i+1) get the same angles as rotate_half's pairs (i, i + dims/2)."""
    params = variant(name, partial)
    dims = int(HEAD_DIM * partial)
    x = np.array(random_x(6, 24))
    halves = np.concatenate([_deinterleave(x[..., :dims]), x[..., dims:]], axis=-1)
    reference = transformers_rotation(params, mx.array(halves), 20, partial=partial)
    expected = np.concatenate([_interleave(reference[..., :dims]), reference[..., dims:]], axis=-1)
    assert_close(ours(params, mx.array(x), 20, partial=partial, traditional=True), expected)


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


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_does_not_mutate_its_input(name):
    x = random_x(2, 20)
    before = np.array(x)
    rope = our_rope(variant(name, 0.5), partial=0.5)
    out = rope(x, offset=20)
    mx.eval(out)
    assert out is not x
    assert np.array_equal(np.array(x), before)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_has_no_parameters(name):
    """Frequencies are constants: they must not show up as weights to load or save."""
    assert our_rope(variant(name)).parameters() == {}


def test_config_styles_agree():
    x = random_x(3, 6)
    v4 = initialize_rope(HEAD_DIM, 10000.0, False, {"type": "linear", "factor": 2})(x)
    v5 = initialize_rope(HEAD_DIM, 10000.0, False, {"rope_type": "linear", "factor": 2.0})(x)
    assert np.array_equal(np.array(v4), np.array(v5))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_transformers_4_rope_scaling_style_agrees(name):
    """`{"type": ...}` without rope_theta (transformers 4 `rope_scaling`) equals the transformers 5 entry."""
    params = variant(name)
    old_style = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")}
    old_style["type"] = params["rope_type"]
    x = random_x(7, 40)
    old = initialize_rope(HEAD_DIM, params["rope_theta"], False, old_style, MAX_POS)(x, offset=2)
    assert np.array_equal(np.array(old), ours(params, x, 2))


def test_su_is_longrope():
    params = variant("longrope")
    x = random_x(8, 20)
    assert np.array_equal(ours({**params, "rope_type": "su"}, x, 0), ours(params, x, 0))


@pytest.mark.parametrize("name", ["llama3", "yarn", "longrope"])
def test_original_max_position_embeddings_defaults_to_max_position_embeddings(name):
    """transformers fills a missing original_max_position_embeddings from max_position_embeddings."""
    params = {k: v for k, v in variant(name).items() if k != "original_max_position_embeddings"}
    x = random_x(9, 40)
    assert_close(ours(params, x, 0, max_pos=24), transformers_rotation(params, x, 0, max_pos=24))


@pytest.mark.parametrize("scaling", [{"rope_type": "default"}, {}, None, {"type": "default", "factor": 1.0}])
def test_default_spellings(scaling):
    x = random_x(10, 9)
    assert_close(np.array(initialize_rope(HEAD_DIM, 1e6, False, scaling)(x, offset=4)),
                 transformers_rotation(dict(rope_type="default", rope_theta=1e6), x, 4))


def test_unsupported_type_is_refused():
    with pytest.raises(ValueError, match="unsupported rope type 'mrope'"):
        initialize_rope(HEAD_DIM, 10000.0, False, {"rope_type": "mrope"})
