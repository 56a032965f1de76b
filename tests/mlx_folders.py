"""Write converted-looking MLX folders directly from our model, so the validation gate can be tested on
outputs with known defects without going through the pipeline."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from model_test_runner import load_hf_folder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def write_mlx_folder(source, out, dtype=None, bits=None, group_size=32, mutate=None) -> Path:
    """Convert `source` naively (float cast or uniform affine quantization); `mutate(weights)` injects defects."""
    model, config, _ = load_hf_folder(source)
    config = dict(config)
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))
        config["dtype"] = dtype
    if bits is not None:
        nn.quantize(model, group_size=group_size, bits=bits)
        config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    weights = dict(tree_flatten(model.parameters()))
    if mutate is not None:
        mutate(weights)
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        if (Path(source) / name).exists():
            shutil.copy(Path(source) / name, out / name)
    return out
