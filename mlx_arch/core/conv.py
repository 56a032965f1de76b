"""Short causal depthwise convolutions over time: Mamba's `conv1d`, LFM2's short convolution, the q/k/v
convolutions of gated delta networks. Each layer keeps its last `kernel - 1` inputs in a `StateCache` slot, so that
a prefill and any sequence of later steps compute what one pass over the whole sequence computes.

Checkpoints store a depthwise `nn.Conv1d` weight as (channels, 1, kernel); MLX's `conv1d` wants
(channels, kernel, 1). `DepthwiseLayout` is the weight rule between the two.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .weights import Op, template


class DepthwiseLayout(Op):
    """(C, 1, K) depthwise convolution weights <-> MLX's (C, K, 1), for the declared keys. Only the source layout is
    converted (a weight already in MLX's layout is left as is), so sanitize can run twice."""

    def __init__(self, *patterns: str, to_mlx: bool = True):
        self.patterns, self.to_mlx = patterns, to_mlx
        self.regexes = [template(p) for p in patterns]

    def _convert(self, v):
        if v.ndim != 3 or v.shape[1] == v.shape[2]:  # kernel 1: both layouts are (C, 1, 1)
            return v
        source_layout = v.shape[1] == 1
        return v.swapaxes(1, 2) if source_layout == self.to_mlx else v

    def apply(self, w):
        return {k: (self._convert(v) if any(r.match(k) for r in self.regexes) else v) for k, v in w.items()}

    def inverse(self):
        return DepthwiseLayout(*self.patterns, to_mlx=not self.to_mlx)


def depthwise_conv(channels: int, kernel: int, bias: bool = True) -> nn.Conv1d:
    """The module whose weight a checkpoint's depthwise conv1d loads into (MLX layout (C, K, 1))."""
    return nn.Conv1d(channels, channels, kernel, groups=channels, bias=bias)


def causal_conv(conv: nn.Conv1d, x: mx.array, cache=None, slot: int = 0, mask: Optional[mx.array] = None):
    """Causal depthwise convolution of x (B, L, C): output position t sees inputs t-K+1 .. t (zeros before the first
    token). With a cache, the previous call's last K-1 inputs come first and this call's last K-1 inputs are kept
    in `cache[slot]`. `mask` (B, L), when given, zeroes padded positions before they enter the state."""
    kernel = conv.weight.shape[1]
    if mask is not None:
        x = mx.where(mask[..., None], x, 0)
    before = cache[slot] if cache is not None else None
    if before is None:
        before = mx.zeros((x.shape[0], kernel - 1, x.shape[2]), dtype=x.dtype)
    window = mx.concatenate([before.astype(x.dtype), x], axis=1)
    if cache is not None:
        cache[slot] = window[:, window.shape[1] - (kernel - 1):]
    y = mx.conv1d(window, conv.weight, groups=x.shape[2])
    return y + conv.bias if "bias" in conv else y
