"""create_causal_mask with left and right padding, against masks written out element by element."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_arch.core.base import create_causal_mask


def expected_mask(N, offset, window=None, left=0, right=0):
    total = offset + N
    m = np.zeros((N, total), dtype=bool)
    for i in range(N):
        q = offset + i
        for k in range(total):
            ok = k <= q and (window is None or q - k < window)
            ok = ok and k >= left and k < total - right
            m[i, k] = ok
    return m


@pytest.mark.parametrize("N,offset", [(1, 0), (5, 0), (4, 3), (1, 7)])
def test_plain_causal(N, offset):
    assert np.array_equal(np.array(create_causal_mask(N, offset)), expected_mask(N, offset))


@pytest.mark.parametrize("N,offset", [(6, 0), (3, 4)])
def test_left_padding_per_row(N, offset):
    left = mx.array([0, 2, 5])
    mask = np.array(create_causal_mask(N, offset, left_padding=left))
    assert mask.shape == (3, 1, N, offset + N)
    for b, pad in enumerate([0, 2, 5]):
        assert np.array_equal(mask[b, 0], expected_mask(N, offset, left=pad))


def test_right_padding_per_row():
    right = mx.array([0, 1, 3])
    mask = np.array(create_causal_mask(6, 0, right_padding=right))
    for b, pad in enumerate([0, 1, 3]):
        assert np.array_equal(mask[b, 0], expected_mask(6, 0, right=pad))


def test_left_padding_attention_matches_unpadded():
    """Attention of a left-padded row equals attention of the same tokens without the padding."""
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((1, 2, 7, 8)).astype(np.float32)) for _ in range(3))
    pad = 3
    mask = create_causal_mask(7, left_padding=mx.array([pad]))
    padded = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    alone = mx.fast.scaled_dot_product_attention(q[:, :, pad:], k[:, :, pad:], v[:, :, pad:], scale=0.3,
                                                 mask="causal")
    assert np.allclose(np.array(padded[:, :, pad:]), np.array(alone), atol=1e-5)
