"""Rotary position embeddings, mirroring transformers/modeling_rope_utils.py.

Every variant reduces to inverse frequencies (one per rotated pair) plus an attention factor that scales cos/sin;
`mx.fast.rope` applies them given the frequencies as wavelengths/2pi. Inputs are never modified.
"""

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn


def default_inv_freq(dims: int, base: float) -> mx.array:
    return 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))


def llama3_inv_freq(dims: int, base: float, cfg: dict) -> mx.array:
    """Long wavelengths are divided by `factor`, short ones kept, the band between blended smoothly."""
    inv = default_inv_freq(dims, base)
    factor, old_ctx = cfg["factor"], cfg["original_max_position_embeddings"]
    low, high = cfg.get("low_freq_factor", 1.0), cfg.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    scaled = mx.where(wavelen > old_ctx / low, inv / factor, inv)
    between = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return mx.where(between, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_parameters(dims: int, base: float, cfg: dict, max_position_embeddings) -> tuple:
    """(inv_freq, attention_factor): interpolate low frequencies, extrapolate high ones, ramp between."""
    old_ctx = cfg["original_max_position_embeddings"]
    factor = cfg.get("factor") or max_position_embeddings / old_ctx
    attention = cfg.get("attention_factor")
    if attention is None:
        mscale, mscale_all = cfg.get("mscale"), cfg.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention = _yarn_mscale(factor)
    fast, slow = cfg.get("beta_fast") or 32, cfg.get("beta_slow") or 1

    def correction_dim(rotations):
        return dims * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if cfg.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    pos_freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    inv = (1 / (factor * pos_freqs)) * (1 - extrapolate) + (1 / pos_freqs) * extrapolate
    return inv, float(attention)


def longrope_attention_factor(cfg: dict, max_position_embeddings) -> float:
    old_ctx = cfg["original_max_position_embeddings"]
    factor = cfg.get("factor") or (max_position_embeddings / old_ctx if max_position_embeddings else 1.0)
    if cfg.get("attention_factor") is not None:
        return float(cfg["attention_factor"])
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_ctx))


class RoPE(nn.Module):
    """Rotates the first `dims` features by position * inv_freq, scaling the rotated part by `attention`."""

    def __init__(self, dims: int, traditional: bool, inv_freq: mx.array, attention: float = 1.0):
        super().__init__()
        self.dims, self.traditional, self.attention = dims, traditional, attention
        self._freqs = 1.0 / inv_freq

    def rotate(self, x, offset, freqs):
        if self.attention != 1.0:
            # rope is linear in x: scaling the input's rotated part equals scaling cos and sin.
            x = mx.concatenate([x[..., : self.dims] * self.attention, x[..., self.dims :]], axis=-1)
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0, offset=offset,
                            freqs=freqs)

    def __call__(self, x, offset: int = 0):
        return self.rotate(x, offset, self._freqs)


class LongRoPE(RoPE):
    """Phi-3 style: short factors up to the original context, long factors once the sequence exceeds it."""

    def __init__(self, dims, traditional, base, cfg, attention):
        inv = default_inv_freq(dims, base)
        super().__init__(dims, traditional, inv / mx.array(cfg["short_factor"], dtype=mx.float32), attention)
        self._long = 1.0 / (inv / mx.array(cfg["long_factor"], dtype=mx.float32))
        self.original = cfg["original_max_position_embeddings"]

    def __call__(self, x, offset: int = 0):
        long = offset + x.shape[-2] > self.original
        return self.rotate(x, offset, self._long if long else self._freqs)


class DynamicNTKRoPE(RoPE):
    """Raises the base once the sequence (offset + length) outgrows max_position_embeddings."""

    def __init__(self, dims, traditional, base, factor, max_position_embeddings):
        super().__init__(dims, traditional, default_inv_freq(dims, base))
        self.base, self.factor, self.max_pos = base, factor, max_position_embeddings

    def __call__(self, x, offset: int = 0):
        seq_len = offset + x.shape[-2]
        if seq_len <= self.max_pos:
            return self.rotate(x, offset, self._freqs)
        base = self.base * ((self.factor * seq_len / self.max_pos) - (self.factor - 1)) ** (self.dims / (self.dims - 2))
        return self.rotate(x, offset, 1.0 / default_inv_freq(self.dims, base))


def initialize_rope(dims: int, base: float, traditional: bool = False, scaling_config: Optional[dict] = None,
                    max_position_embeddings: Optional[int] = None) -> nn.Module:
    """The RoPE module for a config's scaling dict (transformers-4 `rope_scaling` or a transformers-5
    `rope_parameters` entry)."""
    cfg = dict(scaling_config or {})
    kind = cfg.get("rope_type", cfg.get("type")) or "default"
    if kind == "default":
        return RoPE(dims, traditional, default_inv_freq(dims, base))
    if kind == "linear":
        return RoPE(dims, traditional, default_inv_freq(dims, base) / cfg["factor"])
    if kind == "llama3":
        return RoPE(dims, traditional, llama3_inv_freq(dims, base, cfg))
    if kind == "yarn":
        inv, attention = yarn_parameters(dims, base, cfg, max_position_embeddings)
        return RoPE(dims, traditional, inv, attention)
    if kind in ("longrope", "su"):
        return LongRoPE(dims, traditional, base, cfg, longrope_attention_factor(cfg, max_position_embeddings))
    if kind == "dynamic":
        return DynamicNTKRoPE(dims, traditional, base, cfg["factor"], max_position_embeddings)
    raise ValueError(f"unsupported rope type {kind!r}; supported: default, linear, dynamic, llama3, yarn, longrope")
