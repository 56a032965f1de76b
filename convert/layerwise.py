"""The converted MLX model run with bounded memory, the MLX twin of `reference.py`.

The model is built on lazy arrays straight from its saved files; each decoder layer's weights are read (and made
float32) when that layer runs and released right after, so memory holds one layer plus the embedding, whatever the
model's size. Every probe the gate needs travels through the layers together, so one pass over the weights gives:

- the padded batch of probe prompts: logits and each layer's hidden states;
- one prompt run alone, and the same prompt fed through the KV cache as a prefill chunk, a multi-token chunk and
  then its last tokens one at a time (the cache check);
- the shortest prompts run alone, without padding (the batch check);
- for float16 outputs, the padded batch again in float16 activations, as a reader runs it: float16's range ends at
  65504, and a model whose activations grow past it gives infinities there while every float32 check passes.

Running the cached decode layer by layer instead of token by token computes the same thing: a layer's cache
depends only on that layer's inputs, in order.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from mlx_arch.core import quant


def as_float32(model):
    """Evaluate in float32 activations, quantized layers dequantized (lazily: nothing is read yet).

    On the CPU, bf16 quantized matmuls carry ~3% error of their own and run at a twentieth of the float speed;
    dequantized float32 weights compute the same function as the quantized layer, exactly and faster. Embeddings
    and heads outside the decoder layers stay as stored and are read in blocks of rows (`RowBlocks`), so their
    float32 form never exists whole.
    """
    from . import affine

    floats = (mx.float16, mx.bfloat16)
    inside = {id(m) for layer in model.layers for _, m in layer.named_modules()}
    replacements = []
    for path, module in model.named_modules():
        if id(module) not in inside and isinstance(module, VOCAB_SIZED):
            replacements.append((path, RowBlocks(module)))
        elif quant.is_quantized(module):
            twin = quant.to_float(module)
            if id(module) in inside and isinstance(twin, nn.Linear) and affine.quantized_layer(module):
                twin.stored = _Stored(module)  # dequantized in torch when its layer runs (`materialize`)
            replacements.append((path, twin))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype in floats else p, model.parameters()))
    return model


VOCAB_SIZED = (nn.Embedding, nn.QuantizedEmbedding, nn.Linear, nn.QuantizedLinear)


class _Stored:
    """Holds a module out of sight of `Module.parameters()`, so that casting the model leaves it as stored."""

    def __init__(self, module):
        self.module = module


def materialize(layer, scratch: "Scratch"):
    """The float twins in `layer` of affine-quantized linear layers get their weights dequantized in torch
    (`affine.dequantized_layer`: MLX's values, several times faster than its single-threaded kernel) instead of
    through their lazy MLX dequantization, just before the layer runs."""
    from . import affine

    for _, module in layer.named_modules():
        stored = getattr(module, "stored", None)
        if isinstance(stored, _Stored):
            q = stored.module
            out = affine.dequantized_layer(q, scratch.view((q.weight.shape[0], q.weight.shape[1] * 32 // q.bits)))
            module.weight = mx.array(out.numpy())  # a copy: MLX keeps its own
            module.stored = None


class Scratch:
    """One float32 torch buffer, reused for every weight `materialize` dequantizes in a pass (filling memory already
    touched is 2.5x faster than fresh pages), grown to the largest and let go with the pass."""

    def __init__(self):
        self.flat = None

    def view(self, shape):
        import torch

        n = math.prod(shape)
        if self.flat is None or self.flat.numel() < n:
            self.flat = None
            self.flat = torch.empty(n, dtype=torch.float32)
        return self.flat[:n].view(shape)


class RowBlocks(nn.Module):
    """An embedding or linear layer evaluated in float32 (or `dtype`) from its stored weights, `ROWS` output rows
    at a time: a lookup dequantizes only the rows it reads; a product (head, tied head) is computed block by block
    and each block evaluated before the next is read, so memory holds one block instead of the float32 matrix."""

    ROWS = 8192

    def __init__(self, module):
        super().__init__()
        self.stored = _Stored(module)
        self.dtype = mx.float32

    def rows(self, start: int, stop: int):
        m = self.stored.module
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return quant.dequantized_weight(m, slice(start, stop), self.dtype)
        return m.weight[start:stop].astype(self.dtype)

    def as_linear(self, x):
        n = self.stored.module.weight.shape[0]
        blocks = []
        for start in range(0, n, self.ROWS):
            block = x.astype(self.dtype) @ self.rows(start, min(start + self.ROWS, n)).T
            mx.eval(block)
            blocks.append(block)
        return mx.concatenate(blocks, axis=-1)

    def __call__(self, x):
        m = self.stored.module
        if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)):
            return m(x).astype(self.dtype)  # the same values as dequantizing everything, then looking up
        out = self.as_linear(x)
        return out + m.bias.astype(self.dtype) if "bias" in m else out


class Released:
    """Stands in for a decoder layer whose weights were released: masks are still built from its kind."""

    def __init__(self, kind):
        self.kind = kind


@dataclass
class Outputs:
    logits: np.ndarray  # (B, L, vocab) for the padded batch
    layers: list  # hidden states after each layer, (B, L, D) each
    alone: dict  # row -> logits (1, n, vocab) of that prompt run alone
    cached: np.ndarray  # logits of row 0 through prefill + token-by-token decode
    low_max_abs: list = None  # with `low_precision`: largest |hidden state| after each layer, then of the logits
    extra_logits: np.ndarray = None  # with `extra`: its logits


def as_dtype(module, dtype):
    """Cast a module's float parameters (lazily)."""
    module.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                           module.parameters()))


def largest(x, real: np.ndarray) -> float:
    """Largest |x| over the real (unpadded) positions; inf if any is not finite."""
    x = np.abs(np.array(x.astype(mx.float32)))[real.astype(bool)]
    return float(x.max()) if np.isfinite(x).all() else float("inf")


def rel_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


SINGLE_STEPS = 4  # one-token decode steps of the cache check


def run(model, ids: np.ndarray, mask: np.ndarray, on_layer: Optional[Callable] = None,
        low_precision=None, extra: Optional[np.ndarray] = None) -> Outputs:
    """All probes through `model` (lazy, as loaded with `load_model(..., lazy=True)`), one layer at a time.

    The model is consumed: its layers are released as they finish. `on_layer(i)` is called after layer i. With
    `low_precision` (an MLX dtype), the padded batch also runs in that dtype and `low_max_abs` is filled. `extra`:
    another right-padded batch of ids (the held-out text) whose logits alone are kept, in `extra_logits`.
    """
    as_float32(model)
    lengths = mask.sum(1)
    rows = sorted({0, *np.argsort(lengths)[:2].tolist()})
    length = int(lengths[0])
    # The cache check feeds the prompt as a prefill of half of it, a multi-token chunk, then its last tokens one by
    # one: every way a reader extends a cache, with each single-token step reading all the layer's weights once.
    split = max(1, length // 2)
    singles = max(split, length - SINGLE_STEPS)
    chunks = [(0, split)] + ([(split, singles)] if singles > split else []) + [(t, t + 1) for t in range(singles, length)]

    # Each stream keeps what its layers read besides the hidden states (the model's `stream_context`).
    batch = model.embed(mx.array(ids))
    batch_masks, batch_context = model.masks(batch), model.stream_context(mx.array(ids), batch)
    alone_ids = {r: mx.array(ids[r : r + 1, : int(lengths[r])]) for r in rows}
    alone = {r: model.embed(x) for r, x in alone_ids.items()}
    alone_masks = {r: model.masks(h) for r, h in alone.items()}
    alone_context = {r: model.stream_context(alone_ids[r], h) for r, h in alone.items()}
    cached = [model.embed(mx.array(ids[:1, a:b]), a) for a, b in chunks]
    cached_context = [model.stream_context(mx.array(ids[:1, a:b]), h) for h, (a, b) in zip(cached, chunks)]
    caches = model.make_cache()
    held_out = None
    if extra is not None:
        extra_ids = mx.array(extra)
        held_out = model.embed(extra_ids)
        extra_masks, extra_context = model.masks(held_out), model.stream_context(extra_ids, held_out)
    n_layers = len(model.layers)
    hidden = []
    low = None if low_precision is None else batch.astype(low_precision)
    low_masks = None if low is None else model.masks(low)
    low_context = None if low is None else model.stream_context(mx.array(ids), low)
    low_max_abs = None if low is None else []
    scratch = Scratch()
    for i in range(n_layers):
        layer = model.layers[i]
        materialize(layer, scratch)
        batch = layer(batch, batch_masks[i], None, *model.layer_args(batch_context, i))
        alone = {r: layer(h, alone_masks[r][i], None, *model.layer_args(alone_context[r], i))
                 for r, h in alone.items()}
        # The mask for a cached chunk depends on the cache state when the chunk arrives: the layer's kind builds
        # it from the layer's own cache.
        cached = [layer(h, model.masks(h, [caches[i]], a, kinds=[layer.kind])[0], caches[i],
                        *model.layer_args(context, i))
                  for h, (a, _), context in zip(cached, chunks, cached_context)]
        if held_out is not None:
            held_out = layer(held_out, extra_masks[i], None, *model.layer_args(extra_context, i))
        mx.eval(batch, alone, cached, held_out)
        hidden.append(np.array(batch))
        if low is not None:
            as_dtype(layer, low_precision)
            low = layer(low, low_masks[i], None, *model.layer_args(low_context, i))
            low_max_abs.append(largest(low, mask))
        model.layers[i], caches[i] = Released(layer.kind), None
        del layer
        if on_layer is not None:
            on_layer(i)
    # One head call for every stream, their positions side by side (the head is position-wise): the vocabulary-sized
    # matrix is read and dequantized once instead of once per stream.
    streams = [batch, *alone.values(), mx.concatenate(cached, axis=1)] + ([] if held_out is None else [held_out])
    logits = np.array(model.head(mx.concatenate([h.reshape(1, -1, h.shape[-1]) for h in streams], axis=1)))[0]
    ends = np.cumsum([h.shape[0] * h.shape[1] for h in streams])
    logits = [part.reshape(*h.shape[:2], -1) for part, h in zip(np.split(logits, ends[:-1]), streams)]
    out = Outputs(
        logits=logits[0],
        layers=hidden,
        alone=dict(zip(alone, logits[1 : 1 + len(alone)])),
        cached=logits[1 + len(alone)],
        extra_logits=None if held_out is None else logits[-1],
    )
    if low is not None:
        as_dtype(model, low_precision)  # what is left: embedding, final norm, head
        for module in model.modules():
            if isinstance(module, RowBlocks):
                module.dtype = low_precision
        out.low_max_abs = low_max_abs + [largest(model.head(low), mask)]
    return out


def cache_rel_error(out: Outputs) -> float:
    """Prefill + token-by-token decode through the cache vs the full forward of the same prompt."""
    return rel_error(out.cached, out.alone[0])


def batch_rel_error(out: Outputs, mask: np.ndarray) -> float:
    """Largest relative error between a padded-batch row and the same prompt run alone."""
    return max(rel_error(out.logits[r, : int(mask[r].sum())], alone[0]) for r, alone in out.alone.items())
