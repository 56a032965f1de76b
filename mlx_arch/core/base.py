"""Shared pieces of every architecture: config parsing, causal masks and attention.

Configs come in two styles: transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`) and transformers 5
(`rope_parameters`, `dtype`). `BaseModelArgs.from_dict` folds both into one set of fields so that a non-default
RoPE base is never dropped silently.
"""

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx

# Keys read from a transformers-5 `rope_parameters` entry into the top-level fields of ModelArgs.
_ROPE_FIELDS = ("rope_theta", "partial_rotary_factor")


def rope_config(config: dict, layer_type: str = "full_attention") -> dict:
    """The RoPE parameters of one attention kind, whichever config style the checkpoint uses.

    Returns a dict with `rope_theta`, maybe `partial_rotary_factor`, and the scaling entries (`rope_type`,
    `factor`, ...). A transformers-5 config nests them per layer type (`{"full_attention": {...}}`) when the
    model has several attention kinds.
    """
    params = config.get("rope_parameters")
    if params is None:
        scaling = dict(config.get("rope_scaling") or {})
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        for key in _ROPE_FIELDS:
            if key in config and config[key] is not None:
                scaling.setdefault(key, config[key])
        # Some families (phi3) keep this next to rope_scaling rather than inside it.
        if scaling.get("rope_type") and config.get("original_max_position_embeddings"):
            scaling.setdefault("original_max_position_embeddings", config["original_max_position_embeddings"])
        return scaling
    if layer_type in params and isinstance(params[layer_type], dict):
        return dict(params[layer_type])
    if all(isinstance(v, dict) for v in params.values()) and params:
        return dict(next(iter(params.values())))
    return dict(params)


def rope_scaling(params: dict) -> Optional[dict]:
    """The scaling part of a RoPE parameter dict, or None for plain RoPE."""
    scaling = {k: v for k, v in params.items() if k not in _ROPE_FIELDS}
    if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1:
        return None
    return scaling


def sliding_rope(config: dict, default_theta: float) -> tuple:
    """(base, scaling) of the sliding-window layers' own RoPE where a transformers-5 config nests RoPE per layer type
    (`rope_parameters["sliding_attention"]`), else (default_theta, None)."""
    params = config.get("rope_parameters")
    if not (params and isinstance(params.get("sliding_attention"), dict)):
        return default_theta, None
    local = rope_config(config, "sliding_attention")
    return local.get("rope_theta", default_theta), rope_scaling(local)


# Top-level keys of a multimodal container that describe the container, never its text model.
_CONTAINER_ONLY = ("architectures", "auto_map", "model_type", "text_config")


def text_config(config: dict) -> dict:
    """The text model's config of a checkpoint config: a multimodal container's `text_config` (keeping its own
    `model_type`), completed with the top-level keys it lacks where the container states them (containers keep e.g.
    `tie_word_embeddings` or `quantization_config` at the top); a plain config as it is. The twin of transformers'
    `PretrainedConfig.get_text_config()`."""
    inner = config.get("text_config")
    if not isinstance(inner, dict):
        return config
    from . import containers

    if containers.container_of(config):  # the table says what the text model takes from the container
        return containers.text_config(config)
    # Other sub-models' configs (`vision_config`, `audio_config`, ...) are not the text model's.
    inherited = {k: v for k, v in config.items() if k not in inner and k not in _CONTAINER_ONLY
                 and not (k.endswith("_config") and k != "quantization_config" and isinstance(v, dict))}
    return {**inherited, **inner}


def source_dtype(config: dict) -> Optional[str]:
    """The checkpoint's stored dtype name (`dtype` in transformers 5, `torch_dtype` in 4)."""
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype.replace("torch.", "") if isinstance(dtype, str) else None


@dataclass
class BaseModelArgs:
    """Typed view of `config.json`. Subclasses list their fields; unknown keys are ignored."""

    @classmethod
    def from_dict(cls, config: dict) -> "BaseModelArgs":
        params = dict(config)
        rope = rope_config(config)
        for key in _ROPE_FIELDS:
            if key in rope:
                params[key] = rope[key]
        params["rope_scaling"] = rope_scaling(rope)
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in names})


def create_causal_mask(
    N: int,
    offset: int = 0,
    window_size: Optional[int] = None,
    left_padding: Optional[mx.array] = None,
    right_padding: Optional[mx.array] = None,
) -> mx.array:
    """Boolean mask (True = attend) of N queries over offset + N keys.

    Shape (N, offset + N), or (B, 1, N, offset + N) when padding per batch row is given. `left_padding[b]` pad
    tokens sit at the start of row b's keys; `right_padding[b]` at its end.
    """
    queries = mx.arange(offset, offset + N)[:, None]
    keys = mx.arange(offset + N)[None]
    mask = queries >= keys
    if window_size is not None:
        mask = mask & (queries < keys + window_size)
    if left_padding is not None:
        mask = mask & (keys >= left_padding.reshape(-1, 1, 1, 1))
    if right_padding is not None:
        mask = mask & (keys < (offset + N) - right_padding.reshape(-1, 1, 1, 1))
    return mask


def create_attention_mask(h: mx.array, cache: Any = None, window_size: Optional[int] = None):
    """The mask for hidden states h (B, L, D) given the layer's cache.

    Returns None (single token), the string "causal" (lets the fused kernel build it), or a boolean array when a
    window actually cuts keys off.
    """
    N = h.shape[1]
    if cache is not None:
        return cache.make_mask(N, window_size=window_size)
    if N == 1:
        return None
    if window_size is not None and N > window_size:
        return create_causal_mask(N, window_size=window_size)
    return "causal"


def _explicit_attention(queries, keys, values, scale, mask, softcap=None, group_size=None, bits=None):
    """Attention written out for what the fused kernel cannot do: tanh soft-capping of the scores (gemma2) and
    keys/values stored quantized, as (weights, scales, biases) tuples, when `bits` is given."""
    B, n_heads, L, D = queries.shape
    n_kv = (keys[0] if bits else keys).shape[-3]
    repeats = n_heads // n_kv
    queries = queries * scale
    if repeats > 1:
        # Group query heads by their shared KV head instead of repeating the cache.
        queries = queries.reshape(B, n_kv, repeats, L, D)
        grouped = (lambda x: tuple(mx.expand_dims(t, -3) for t in x)) if bits else (lambda x: mx.expand_dims(x, -3))
        keys, values = grouped(keys), grouped(values)
    if bits:
        scores = mx.quantized_matmul(queries, *keys, transpose=True, group_size=group_size, bits=bits)
    else:
        scores = queries @ keys.swapaxes(-1, -2)
    if softcap is not None:
        scores = mx.tanh(scores / softcap) * softcap
    if isinstance(mask, str):
        kL = scores.shape[-1]
        mask = mx.arange(kL - L, kL)[:, None] >= mx.arange(kL)[None]
    if mask is not None:
        if repeats > 1 and mask.ndim == 4:
            mask = mx.expand_dims(mask, -3)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = mx.softmax(scores, axis=-1, precise=True)
    if bits:
        out = mx.quantized_matmul(weights, *values, transpose=False, group_size=group_size, bits=bits)
    else:
        out = weights @ values
    return out.reshape(B, n_heads, L, -1) if repeats > 1 else out


def scaled_dot_product_attention(queries, keys, values, cache, scale: float, mask, sinks=None,
                                 softcap: Optional[float] = None) -> mx.array:
    """softmax(cap(q k^T * scale) + mask) v: the fused kernel unless the scores are soft-capped or the cache
    stores quantized KV."""
    bits = getattr(cache, "bits", None)
    if bits is not None or softcap is not None:
        if sinks is not None:
            raise ValueError("attention sinks are not supported with soft-capping or a quantized KV cache")
        return _explicit_attention(queries, keys, values, scale, mask, softcap, getattr(cache, "group_size", None),
                                   bits)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask, sinks=sinks)
