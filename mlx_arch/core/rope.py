"""Rotary position embeddings (RoPE) and their context-extension variants.

The reference for every formula here is transformers' `modeling_rope_utils.py` (`ROPE_INIT_FUNCTIONS` and the
`dynamic_rope_update` decorator) together with `rotate_half` / `apply_rotary_pos_emb` from the llama model.
Frequencies are computed once in float64 and the rotation itself is done by `mx.fast.rope`, which takes either a
`base` or explicit per-pair periods `freqs` (the reciprocal of transformers' `inv_freq`).

`scaling_config` may be a transformers 4 `rope_scaling` dict (`{"type": ..., "factor": ...}`) or a transformers 5
`rope_parameters` dict (`{"rope_type": ..., ...}`); `rope_theta` and `partial_rotary_factor` in it are ignored
because the caller passes `base` and `dims` directly.
"""

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def _apply_rope(x, dims, traditional, offset, *, base=None, freqs=None, scale=1.0, attention_scaling=1.0):
    """Rotate the first `dims` features of `x`, scaling only the rotated part like transformers' cos/sin scaling."""
    if attention_scaling != 1.0:
        # RoPE is linear, so scaling before rotating equals transformers' scaled cos/sin; pass-through stays as is.
        if dims == x.shape[-1]:
            x = x * attention_scaling
        else:
            x = mx.concatenate([x[..., :dims] * attention_scaling, x[..., dims:]], axis=-1)
    return mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs)


def _periods(inv_freq: np.ndarray) -> mx.array:
    """`mx.fast.rope` takes periods (position / freqs is the angle), i.e. 1 / inv_freq."""
    return mx.array((1.0 / inv_freq).astype(np.float32))


def _default_inv_freq(dims: int, base: float) -> np.ndarray:
    return 1.0 / (base ** (np.arange(0, dims, 2, dtype=np.float64) / dims))


class RoPE(nn.Module):
    """RoPE with fixed frequencies: a `base` (optionally with positions scaled by `scale`) or explicit periods."""

    def __init__(self, dims: int, traditional: bool = False, base: Optional[float] = None,
                 freqs: Optional[mx.array] = None, scale: float = 1.0, attention_scaling: float = 1.0):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.base = base
        self.scale = scale
        self.attention_scaling = attention_scaling
        self._freqs = freqs  # underscore: a constant, not a parameter to load

    def _extra_repr(self):
        return f"{self.dims}, traditional={self.traditional}, base={self.base}, scale={self.scale}"

    def __call__(self, x, offset: int = 0):
        return _apply_rope(x, self.dims, self.traditional, offset, base=self.base, freqs=self._freqs,
                           scale=self.scale, attention_scaling=self.attention_scaling)


class DynamicNTKRoPE(nn.Module):
    """Dynamic NTK: once the sequence outgrows `max_position_embeddings`, the base grows with it.

    transformers recomputes the frequencies whenever `max(position_ids) + 1` exceeds the cached length; during
    generation that is `offset + L`, so the base is derived from it on every call (no state kept between calls).
    """

    def __init__(self, dims: int, traditional: bool, base: float, factor: float, max_position_embeddings: int):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.base = base
        self.factor = factor
        self.max_position_embeddings = max_position_embeddings

    def _extra_repr(self):
        return f"{self.dims}, traditional={self.traditional}, base={self.base}, factor={self.factor}"

    def _base_for(self, seq_len: int) -> float:
        if seq_len <= self.max_position_embeddings:
            return self.base
        growth = self.factor * seq_len / self.max_position_embeddings - (self.factor - 1)
        return self.base * growth ** (self.dims / (self.dims - 2))

    def __call__(self, x, offset: int = 0):
        base = self._base_for(int(offset) + x.shape[-2])
        return _apply_rope(x, self.dims, self.traditional, offset, base=base)


class LongRoPE(nn.Module):
    """LongRoPE (Phi-3 "longrope"/"su"): per-pair rescaling, with the long factors once past the original length."""

    def __init__(self, dims: int, traditional: bool, short_freqs: mx.array, long_freqs: mx.array,
                 original_max_position_embeddings: int, attention_scaling: float):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.original_max_position_embeddings = original_max_position_embeddings
        self.attention_scaling = attention_scaling
        self._short_freqs = short_freqs
        self._long_freqs = long_freqs

    def _extra_repr(self):
        return (f"{self.dims}, traditional={self.traditional}, "
                f"original_max_position_embeddings={self.original_max_position_embeddings}")

    def __call__(self, x, offset: int = 0):
        # Same switch as transformers' longrope update: sequence length max(position_ids) + 1 = offset + L.
        long = int(offset) + x.shape[-2] > self.original_max_position_embeddings
        freqs = self._long_freqs if long else self._short_freqs
        return _apply_rope(x, self.dims, self.traditional, offset, freqs=freqs,
                           attention_scaling=self.attention_scaling)


# --- helpers reading the config -----------------------------------------------------------------------------------

def _rope_type(config: dict) -> str:
    # transformers 5 prefers "rope_type"; transformers 4 configs may only have "type".
    return config.get("rope_type") or config.get("type") or "default"


def _original_max(config: dict, max_position_embeddings: Optional[int], rope_type: str) -> int:
    # transformers fills a missing value from max_position_embeddings when it standardizes the config.
    value = config.get("original_max_position_embeddings") or max_position_embeddings
    if value is None:
        raise ValueError(f"rope type {rope_type!r} needs original_max_position_embeddings or max_position_embeddings")
    return int(value)


# --- one builder per rope type ------------------------------------------------------------------------------------

def _build_default(dims, base, traditional, config, max_position_embeddings):
    return RoPE(dims, traditional, base=base)


def _build_linear(dims, base, traditional, config, max_position_embeddings):
    # Dividing inv_freq by the factor equals scaling the positions by 1 / factor.
    return RoPE(dims, traditional, base=base, scale=1.0 / float(config["factor"]))


def _build_dynamic(dims, base, traditional, config, max_position_embeddings):
    if max_position_embeddings is None:
        raise ValueError("rope type 'dynamic' needs max_position_embeddings")
    return DynamicNTKRoPE(dims, traditional, base, float(config["factor"]), int(max_position_embeddings))


def _llama3_inv_freq(dims, base, config, max_position_embeddings):
    factor = float(config["factor"])
    low_freq_factor = float(config["low_freq_factor"])
    high_freq_factor = float(config["high_freq_factor"])
    old_context_len = _original_max(config, max_position_embeddings, "llama3")

    inv_freq = _default_inv_freq(dims, base)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    # Long wavelengths are interpolated by the factor, short ones kept, the band between blended smoothly.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def _build_llama3(dims, base, traditional, config, max_position_embeddings):
    return RoPE(dims, traditional, freqs=_periods(_llama3_inv_freq(dims, base, config, max_position_embeddings)))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_parameters(dims, base, config, max_position_embeddings):
    """(inv_freq, attention_factor) exactly as transformers' `_compute_yarn_parameters`."""
    original_max = _original_max(config, max_position_embeddings, "yarn")
    factor = config.get("factor")
    if factor is None:
        # DeepSeek-V3 style configs imply the factor from the two lengths.
        if max_position_embeddings is None:
            raise ValueError("rope type 'yarn' needs factor or max_position_embeddings")
        factor = max_position_embeddings / original_max
    factor = float(factor)

    attention_factor = config.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = config.get("mscale"), config.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    # `or`: transformers treats 0/None as "use the paper's default".
    beta_fast = config.get("beta_fast") or 32
    beta_slow = config.get("beta_slow") or 1
    truncate = config.get("truncate", True)

    def correction_dim(num_rotations):
        return dims * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    # Pairs rotating fast (many turns over the original length) extrapolate; slow ones interpolate by the factor.
    ramp = np.clip((np.arange(dims // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def _build_yarn(dims, base, traditional, config, max_position_embeddings):
    inv_freq, attention_factor = _yarn_parameters(dims, base, config, max_position_embeddings)
    return RoPE(dims, traditional, freqs=_periods(inv_freq), attention_scaling=attention_factor)


def _build_longrope(dims, base, traditional, config, max_position_embeddings):
    original_max = _original_max(config, max_position_embeddings, "longrope")
    factor = config.get("factor")
    if factor is None:
        # Phi-3 stores the extension only as max_position_embeddings / original_max_position_embeddings.
        if max_position_embeddings is None:
            raise ValueError("rope type 'longrope' needs factor or max_position_embeddings")
        factor = max_position_embeddings / original_max

    attention_factor = config.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))

    pos_freqs = base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)

    def periods(ext_factors):
        ext = np.asarray(ext_factors, dtype=np.float64)
        if ext.shape != pos_freqs.shape:
            raise ValueError(f"longrope factors must have length {dims // 2}, got {ext.shape[0]}")
        return _periods(1.0 / (ext * pos_freqs))

    return LongRoPE(dims, traditional, periods(config["short_factor"]), periods(config["long_factor"]),
                    original_max, float(attention_factor))


def _build_proportional(dims, base, traditional, config, max_position_embeddings):
    """Gemma 4's global layers: rotate-half pairs over the whole head, of which only the first
    `partial_rotary_factor` rotate (the rest keep an infinite period), positions divided by `factor`. Here
    `partial_rotary_factor` is read from `config`: `dims` is the whole head."""
    angles = int(config.get("partial_rotary_factor", 1.0) * dims // 2)
    inv_freq = np.zeros(dims // 2)
    inv_freq[:angles] = _default_inv_freq(dims, base)[:angles]
    with np.errstate(divide="ignore"):
        return RoPE(dims, traditional, freqs=_periods(inv_freq / config.get("factor", 1.0)))


_BUILDERS = {
    "default": _build_default,
    "linear": _build_linear,
    "dynamic": _build_dynamic,
    "llama3": _build_llama3,
    "yarn": _build_yarn,
    "longrope": _build_longrope,
    "su": _build_longrope,  # the name Phi-3 configs used before "longrope"
    "proportional": _build_proportional,
}


def initialize_rope(dims: int, base: float, traditional: bool = False,
                    scaling_config: Optional[dict] = None,
                    max_position_embeddings: Optional[int] = None) -> nn.Module:
    """Build the RoPE module for a Hugging Face rope config; call it as `rope(x, offset)` with x (B, H, L, D)."""
    config = dict(scaling_config or {})
    rope_type = _rope_type(config)
    builder = _BUILDERS.get(rope_type)
    if builder is None:
        raise ValueError(f"unsupported rope type {rope_type!r}")
    return builder(dims, float(base), traditional, config, max_position_embeddings)
