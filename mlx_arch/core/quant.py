"""Quantized/float module pairs, registered where each module kind is defined: dequantization (the gate's float32
pass, `--dequantize`, the exact-weights reference) turns every registered quantized module back into the float
module that computes the same function, so a new quantizable block (an expert switch layer, say) registers its pair
here and nothing in `convert/` changes."""

import os
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn

_TO_FLOAT: Dict[type, Callable[[nn.Module], nn.Module]] = {}


def register(quantized_type: type, to_float: Callable[[nn.Module], nn.Module]):
    """Declare how a quantized module type becomes its float twin (float32 weights)."""
    _TO_FLOAT[quantized_type] = to_float


def quantized_types() -> tuple:
    return tuple(_TO_FLOAT)


def is_quantized(module) -> bool:
    return isinstance(module, quantized_types())


def dequantized_weight(module) -> mx.array:
    """The float32 weight a quantized module computes with, exactly as the MLX format defines it."""
    return dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                      bits=module.bits, mode=module.mode)


_CPU_STREAMS: list = []
SPLIT_CORES = 4


def cpu_streams() -> list:
    """The CPU streams `dequantize` splits over, created once: one per core up to 16, or just the default stream."""
    if not _CPU_STREAMS:
        cores = os.cpu_count() or 1
        _CPU_STREAMS.extend([mx.new_stream(mx.cpu) for _ in range(min(16, cores))] if cores >= SPLIT_CORES
                            else [mx.default_stream(mx.cpu)])
    return _CPU_STREAMS


def dequantize(w, scales, biases: Optional[mx.array], dtype=mx.float32, **params) -> mx.array:
    """`mx.dequantize(...)` cast to `dtype`. On the CPU the rows are split over one stream per core, which MLX runs
    in parallel (its CPU kernel uses one thread; 4.3x faster with 16 streams on a 16-core machine); every value is
    computed by the same kernel as without the split, so the result is identical. With fewer than SPLIT_CORES cores
    there is one stream (on 2 cores the split measured no faster: 81 s against 72 s for the 1.1B gate)."""
    streams = cpu_streams() if mx.default_device() == mx.cpu else []
    if w.ndim < 2 or len(streams) < 2:
        return mx.dequantize(w, scales, biases, **params).astype(dtype)
    step = -(-w.shape[0] // len(streams))
    parts = [mx.dequantize(w[i:i + step], scales[i:i + step], None if biases is None else biases[i:i + step],
                           stream=stream, **params).astype(dtype, stream=stream)
             for i, stream in zip(range(0, w.shape[0], step), streams)]
    return mx.concatenate(parts, axis=0)


def to_float(module) -> nn.Module:
    for kind in type(module).__mro__:
        if kind in _TO_FLOAT:
            return _TO_FLOAT[kind](module)
    raise TypeError(f"no float twin registered for {type(module).__name__}")


def _linear(module):
    weight = dequantized_weight(module)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
    if "bias" in module:
        layer.bias = module.bias.astype(mx.float32)
    layer.weight = weight
    return layer


def _embedding(module):
    weight = dequantized_weight(module)
    layer = nn.Embedding(*weight.shape)
    layer.weight = weight
    return layer


register(nn.QuantizedLinear, _linear)
register(nn.QuantizedEmbedding, _embedding)
