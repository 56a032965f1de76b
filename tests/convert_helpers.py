"""Helpers shared by the pipeline tests: logits of converted folders through our loader, mlx-lm and
transformers."""

import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_map

import mlx_arch
from checkpoints import load_reference

TOKENS = np.array([[1, 17, 42, 99, 7, 250, 33, 64, 5, 12, 300, 2]])


def float32_logits(model, tokens=TOKENS) -> np.ndarray:
    """Logits with float32 activations (quantized matmuls in bf16 carry ~3% error on the CPU)."""
    floats = (mx.float16, mx.bfloat16)
    model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype in floats else p, model.parameters()))
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def ours(path, tokens=TOKENS):
    model, _ = mlx_arch.load_model(path)
    return float32_logits(model, tokens)


def mlx_lm_logits(path, tokens=TOKENS):
    from mlx_lm import load

    model, _ = load(str(path))
    return float32_logits(model, tokens)


def reference(path, tokens=TOKENS):
    with torch.no_grad():
        return load_reference(path)(torch.tensor(tokens)).logits.float().numpy()


def rel_error(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())
