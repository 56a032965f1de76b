"""Sliding-window masks: create_causal_mask(window_size=...) and create_attention_mask with and without caches."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_arch.core.base import create_attention_mask, create_causal_mask
from test_causal_mask_padding import expected_mask


@pytest.mark.parametrize("N,offset,window", [(10, 0, 3), (4, 6, 3), (1, 9, 4), (8, 2, 1), (5, 0, 8)])
def test_window_mask_matches_definition(N, offset, window):
    mask = np.array(create_causal_mask(N, offset, window_size=window))
    assert np.array_equal(mask, expected_mask(N, offset, window=window))


def test_window_with_left_padding():
    mask = np.array(create_causal_mask(6, 0, window_size=3, left_padding=mx.array([2])))
    assert np.array_equal(mask[0, 0], expected_mask(6, 0, window=3, left=2))


def test_attention_mask_without_cache():
    h = mx.zeros((1, 6, 4))
    assert create_attention_mask(h) == "causal"
    assert create_attention_mask(h, window_size=8) == "causal"  # the window cuts nothing off
    assert np.array_equal(np.array(create_attention_mask(h, window_size=2)), expected_mask(6, 0, window=2))
    assert create_attention_mask(mx.zeros((1, 1, 4))) is None


def test_attention_mask_from_cache_offsets():
    from mlx_arch.core.cache import KVCache

    cache = KVCache()
    cache.update_and_fetch(mx.zeros((1, 1, 5, 4)), mx.zeros((1, 1, 5, 4)))
    mask = create_attention_mask(mx.zeros((1, 3, 4)), cache, window_size=4)
    assert np.array_equal(np.array(mask), expected_mask(3, 5, window=4))
