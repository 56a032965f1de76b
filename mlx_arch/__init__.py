"""MLX implementations of Hugging Face architectures, one module per `model_type`.

A module is found by its `model_type` name (a new file is the registration); `ALIASES` maps model types that
share code with another module. Each module defines `ModelArgs` and `Model`.
"""

import importlib
import json
import pkgutil
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .core import cache
from .core.base import text_config

ALIASES = {"mistral": "llama", "ministral": "llama"}

# `mlx_arch.cache.make_prompt_cache(model)` is the public path of the caches (as in mlx-lm); the module lives in
# `core/` with the other shared blocks, so that every module directly in this package is a model type.
sys.modules[f"{__name__}.cache"] = cache


class UnsupportedArchitecture(ValueError):
    pass


def architecture_modules() -> list:
    """Names of every architecture module in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg and not m.name.startswith("_"))


def supported_model_types() -> list:
    return sorted(set(architecture_modules()) | set(ALIASES))


def get_architecture(model_type: str):
    """The module implementing `model_type`; raises UnsupportedArchitecture naming the supported ones."""
    name = ALIASES.get(model_type, model_type)
    if name not in architecture_modules():
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    return importlib.import_module(f"{__name__}.{name}")


def architecture(config: dict):
    """The module implementing a config's model: its own model_type's, or a multimodal container's text model's
    (raises UnsupportedArchitecture naming both types when we lack the text family, or the container)."""
    from .core.containers import CONTAINERS, container_of, text_type

    model_type = config.get("model_type")
    if container_of(config):
        try:
            return get_architecture(text_type(config))
        except UnsupportedArchitecture:
            raise UnsupportedArchitecture(
                f"{model_type!r} is a multimodal checkpoint whose text model {text_type(config)!r} is not supported; "
                f"supported text models: {', '.join(sorted(set(architecture_modules()) | set(ALIASES)))}") from None
    if isinstance(config.get("text_config"), dict) and model_type not in architecture_modules():
        inner = config["text_config"].get("model_type")
        raise UnsupportedArchitecture(
            f"{model_type!r} is a multimodal checkpoint (text model {inner!r}) of a kind mlx-convert does not unpack; "
            f"supported multimodal checkpoints: {', '.join(sorted(CONTAINERS))}")
    return get_architecture(model_type)


def build_model(config: dict):
    """An uninitialised `Model` for a config dict (float32 parameters until weights are loaded); a multimodal
    container's config gives its text model (`text_config`, the resolver the gate's reference side mirrors), whose
    `sanitize` then also selects and renames the language model's weights (core/containers.py)."""
    from .core.containers import container_of

    arch = architecture(config)
    model = arch.Model(arch.ModelArgs.from_dict(text_config(config)))
    model.container = container_of(config)
    return model


def quantize_like(model, config: dict, weights: dict):
    """Turn the layers that were saved quantized into quantized layers before loading weights."""
    from .core import fp8

    quant = config.get("quantization") or config.get("quantization_config")
    if not quant or fp8.is_source(config):  # FP8 checkpoints arrive dequantized (convert/load.py)
        return
    if "quant_method" in quant:  # transformers' quantization_config: the MLX format its packed tensors are read as
        from .core.mxfp4 import mlx_settings

        quant = mlx_settings(quant)
    defaults = {"group_size": quant.get("group_size", 64), "bits": quant.get("bits", 4), "mode": quant.get("mode", "affine")}

    def predicate(path, module):
        if f"{path}.scales" not in weights:
            return False
        override = quant.get(path)
        return {**defaults, **override} if isinstance(override, dict) else defaults

    nn.quantize(model, class_predicate=predicate)


def load_weights(model, weights: dict):
    """Strict load: every missing or unexpected key is named."""
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        raise ValueError("weights do not match the model: " + "; ".join(parts))
    bad = [k for k, v in weights.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError("shape mismatch: " + ", ".join(f"{k} {weights[k].shape} vs {expected[k].shape}" for k in bad))
    model.load_weights(list(weights.items()), strict=True)


def load_model(path, lazy: bool = False):
    """Load a converted MLX folder: returns (model, config)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {path}")
    weights = {}
    for f in files:
        weights.update(mx.load(str(f)))
    model = build_model(config)
    weights = model.sanitize(weights)
    quantize_like(model, config, weights)
    load_weights(model, weights)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config
