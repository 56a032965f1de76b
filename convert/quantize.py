"""Model assembly, cast and quantization. Arrays stay lazy here: the work happens when save evaluates a shard."""

import re
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

import mlx_arch
from mlx_arch.base import source_dtype

from .errors import ConvertError
from .plan import RECIPES, ConvertPlan

# Layers that carry the most quantization error per bit: value and down projections (their outputs feed the
# residual stream directly); matched by the last path component.
SENSITIVE_PROJECTIONS = ("v_proj", "down_proj")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class QuantReport:
    config: Optional[dict] = None  # the "quantization" entry of config.json
    skipped: list = field(default_factory=list)  # quantizable layers kept in full precision, with the reason


def build_model(config: dict, weights: dict):
    """Our model of `config` with the sanitized weights strictly loaded (still lazy)."""
    model = mlx_arch.build_model(config)
    weights = model.sanitize(weights)
    mlx_arch.quantize_like(model, config, weights)
    try:
        mlx_arch.load_weights(model, weights)
    except ValueError as e:
        raise ConvertError(f"the checkpoint does not fit the {config['model_type']} architecture: {e}") from None
    return model


def target_dtype(plan: ConvertPlan, config: dict) -> str:
    return plan.dtype or source_dtype(config) or "float16"


def cast(model, dtype: str):
    """Cast floating parameters (a model's optional `cast_predicate(path)` keeps some in their dtype)."""
    keep = getattr(model, "cast_predicate", lambda path: True)
    target = getattr(mx, dtype)
    flat = [(k, v.astype(target) if mx.issubdtype(v.dtype, mx.floating) and keep(k) else v)
            for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten(flat))


def layer_bits(path: str, module, n_layers: int, recipe: Optional[str], bits: int) -> int:
    """Bits for one layer under a mixed recipe: embeddings, the head and sensitive projections get more."""
    if not recipe:
        return bits
    low, high = RECIPES[recipe]
    if isinstance(module, nn.Embedding) or path.endswith("lm_head"):
        return high
    match = _LAYER_INDEX.search(f".{path}.")
    if match and path.rsplit(".", 1)[-1] in SENSITIVE_PROJECTIONS:
        i, edge = int(match.group(1)), max(1, n_layers // 8)
        if i < edge or i >= n_layers - edge or (i - edge) % 3 == 2:
            return high
    return low


def quantize(model, plan: ConvertPlan) -> QuantReport:
    report = QuantReport()
    group, mode = plan.q_group_size, plan.q_mode
    hook = getattr(model, "quant_predicate", None)
    n_layers = len(model.layers)
    overrides = {}

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if hook is not None and not hook(path, module):
            return False
        width = module.weight.shape[-1]
        if width % group:
            report.skipped.append(f"{path} (input size {width} is not a multiple of group size {group})")
            overrides[path] = False
            return False
        bits = layer_bits(path, module, n_layers, plan.quant_recipe, plan.q_bits)
        if bits != plan.q_bits:
            overrides[path] = {"group_size": group, "bits": bits, "mode": mode}
        return {"group_size": group, "bits": bits, "mode": mode}

    nn.quantize(model, class_predicate=predicate)
    report.config = {"group_size": group, "bits": plan.q_bits, "mode": mode, **overrides}
    return report


def dequantize(model, dtype: str):
    """Replace quantized layers by float layers computing the same function."""
    from .validate import dequantized

    swaps = [(path, dequantized(m)) for path, m in model.named_modules()
             if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    cast(model, dtype)


def parameter_count(model) -> int:
    """Number of weights the model represents (packed quantized weights counted unpacked)."""
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            packed = m.weight.size + m.scales.size + (m.biases.size if m.get("biases") is not None else 0)
            total += m.weight.size * 32 // m.bits - packed
    return total
