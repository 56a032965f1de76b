"""The shared causal depthwise convolution (core/conv.py) against torch's Conv1d, and its cache."""

import mlx.core as mx
import numpy as np
import torch

from mlx_arch.core.cache import StateCache
from mlx_arch.core.conv import DepthwiseLayout, causal_conv, depthwise_conv


def _pair(channels=6, kernel=4, seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.Conv1d(channels, channels, kernel, groups=channels, padding=kernel - 1)
    ours = depthwise_conv(channels, kernel)
    w = DepthwiseLayout("conv.weight").apply({"conv.weight": mx.array(ref.weight.detach().numpy())})
    ours.update({"weight": w["conv.weight"], "bias": mx.array(ref.bias.detach().numpy())})
    return ref, ours


def test_causal_conv_matches_torch_padded_conv():
    ref, ours = _pair()
    x = np.random.default_rng(0).standard_normal((2, 9, 6)).astype(np.float32)
    expected = ref(torch.tensor(x).transpose(1, 2))[..., :9].transpose(1, 2).detach().numpy()
    np.testing.assert_allclose(np.array(causal_conv(ours, mx.array(x))), expected, atol=1e-5)


def test_prefill_then_steps_equal_one_pass():
    _, ours = _pair(kernel=3)
    x = mx.array(np.random.default_rng(1).standard_normal((1, 11, 6)).astype(np.float32))
    cache = StateCache(1)
    parts = [causal_conv(ours, x[:, :5], cache)] + [causal_conv(ours, x[:, i : i + 1], cache) for i in range(5, 11)]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), np.array(causal_conv(ours, x)), atol=1e-6)


def test_layout_rule_is_idempotent_and_inverts():
    w = {"a.conv.weight": mx.arange(12.0).reshape(3, 1, 4)}
    rule = DepthwiseLayout("{*}conv.weight")
    once = rule.apply(w)
    assert once["a.conv.weight"].shape == (3, 4, 1)
    assert mx.array_equal(rule.apply(once)["a.conv.weight"], once["a.conv.weight"])
    assert mx.array_equal(rule.inverse().apply(once)["a.conv.weight"], w["a.conv.weight"])
