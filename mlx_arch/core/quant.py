"""Quantized/float module pairs, registered where each module kind is defined: dequantization (the gate's float32
pass, `--dequantize`, the exact-weights reference) turns every registered quantized module back into the float
module that computes the same function, so a new quantizable block (an expert switch layer, say) registers its pair
here and nothing in `convert/` changes."""

from typing import Callable, Dict

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
    return mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                         bits=module.bits, mode=module.mode).astype(mx.float32)


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
