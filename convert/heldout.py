"""Quantization cost on a held-out text: how far the converted model's next-token distributions are from the float
original's on text that calibrated nothing (`convert/data/heldout.txt`, written for this package, Apache-2.0;
never used as calibration data).

Both sides run in float32 activations with bounded memory: the transformers reference of the source checkpoint
streams its weights module by module (`reference.py`), the converted model is read layer by layer with quantized
layers dequantized (`layerwise.as_float32`). Rows are right-padded into batches (as many rows as keep the logits
within LOGITS_BYTES): under a causal mask the real positions never see the padding, and the metrics read the real
positions only.

    from convert import heldout
    metrics = heldout.measure(source_folder, output_folder, tokenizer)  # dict, see `summarize`
"""

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .calibrate import DATA, document_ids, read_documents

HELDOUT = DATA / "heldout.txt"
GATE_TOKENS = 512  # the gate's share: every document contributes its first tokens
MAX_ROW_TOKENS = 512  # longer documents are cut into rows of this many tokens
LOGITS_BYTES = 1 << 29  # rows run together while both models' float32 logits of them fit in this much, each


def rows(tokenizer, vocab_size: int, max_tokens: Optional[int] = GATE_TOKENS, max_len: int = MAX_ROW_TOKENS) -> list:
    """Token rows of the held-out text: with `max_tokens`, the first max_tokens / (number of documents) tokens of
    every document (prose, code and chat in several languages all count); None: every document whole, cut into
    rows of `max_len`."""
    documents = read_documents(HELDOUT, header=True)
    per_document = None if max_tokens is None else max(2, max_tokens // len(documents))
    return token_rows(tokenizer, documents, vocab_size, max_len=max_len, max_tokens=max_tokens,
                      per_document=per_document)


def token_rows(tokenizer, documents: list, vocab_size: int, max_len: int = MAX_ROW_TOKENS,
               max_tokens: Optional[int] = None, per_document: Optional[int] = None) -> list:
    """Rows of token ids (numpy int32): each document cut into pieces of at most `max_len` tokens (the first
    `per_document` tokens only, if given), rows of fewer than 2 tokens dropped, `max_tokens` in all at most."""
    rows, total = [], 0
    for document in documents:
        ids = document_ids(tokenizer, document)[:per_document]
        for start in range(0, len(ids), max_len):
            piece = ids[start:start + max_len][: (max_tokens - total) if max_tokens else None]
            if len(piece) >= 2:
                rows.append(np.minimum(np.asarray(piece, np.int32), vocab_size - 1))
                total += len(piece)
    return rows


def padded(rows: list) -> tuple:
    ids = np.zeros((len(rows), max(len(r) for r in rows)), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def token_stats(ours: np.ndarray, ref: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict:
    """Per real position: KL(float original || ours), top-1 agreement, and each model's negative log-likelihood of
    the next token (positions that have one)."""
    real = mask.astype(bool)
    out = {"kl": [], "agree": [], "nll": [], "reference_nll": []}
    for b in range(ids.shape[0]):  # row by row: float64 over the vocabulary stays small
        n = int(real[b].sum())
        lq, lp = _log_softmax(ours[b, :n]), _log_softmax(ref[b, :n])
        out["kl"].append((np.exp(lp) * (lp - lq)).sum(-1))
        out["agree"].append(lq.argmax(-1) == lp.argmax(-1))
        out["nll"].append(-lq[np.arange(n - 1), ids[b, 1:n]])
        out["reference_nll"].append(-lp[np.arange(n - 1), ids[b, 1:n]])
    return {k: np.concatenate(v) for k, v in out.items()}


def summarize(stats: list) -> dict:
    """The held-out metrics from `token_stats` of one or more passes."""
    s = {k: np.concatenate([part[k] for part in stats]) for k in stats[0]}
    ppl, ref_ppl = float(np.exp(s["nll"].mean())), float(np.exp(s["reference_nll"].mean()))
    return {"tokens": int(s["kl"].size), "kl_mean": float(s["kl"].mean()), "kl_max": float(s["kl"].max()),
            "top1": float(s["agree"].mean()), "perplexity": ppl, "reference_perplexity": ref_ppl,
            "perplexity_ratio": ppl / ref_ppl}


def metrics(ours: np.ndarray, ref: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict:
    """KL(float original || ours) (mean and max over positions), top-1 agreement, and each model's perplexity on
    the text, with their ratio (ours / the float original's)."""
    return summarize([token_stats(ours, ref, ids, mask)])


def passes(rows: list, vocab_size: int, budget: int = LOGITS_BYTES) -> list:
    """`rows` in consecutive groups whose padded float32 logits fit in `budget` bytes, as (ids, mask) batches."""
    groups, current = [], []
    for r in rows:
        if current and (len(current) + 1) * max(len(x) for x in current + [r]) * vocab_size * 4 > budget:
            groups.append(current)
            current = []
        current.append(r)
    return [padded(g) for g in groups + [current] if g]


def mlx_logits(folder, ids: np.ndarray, on_layer: Optional[Callable] = None) -> np.ndarray:
    """Logits (B, L, vocab) of the converted folder in float32 activations, one layer in memory at a time."""
    import mlx.core as mx

    from mlx_arch import load_model

    from .layerwise import Released, Scratch, as_float32, materialize

    model, _ = load_model(folder, lazy=True)
    as_float32(model)
    h = model.embed(mx.array(ids))
    masks, context = model.masks(h), model.stream_context(mx.array(ids), h)  # what layers read besides h
    scratch = Scratch()
    for i in range(len(model.layers)):
        layer = model.layers[i]
        materialize(layer, scratch)
        h = layer(h, masks[i], None, *model.layer_args(context, i))
        mx.eval(h)
        model.layers[i] = Released(layer.kind)
        del layer
        if on_layer is not None:
            on_layer(i)
    return np.array(model.head(h))


def reference_logits(source, ids: np.ndarray, mask: np.ndarray, on_layer: Optional[Callable] = None,
                     blocks: bool = False) -> np.ndarray:
    """Logits of the float original: the transformers model of the source checkpoint in float32, streamed (`blocks`:
    the model's `reference_reads_children` hook, as in the gate's reference pass)."""
    from .reference import CheckpointReader, StreamedForward, build_reference

    reference = StreamedForward(build_reference(source), CheckpointReader(source), blocks=blocks)
    reference.on_layer = on_layer or (lambda index: None)
    return reference(ids, mask)[0]


def measure(source, output, tokenizer=None, max_tokens: Optional[int] = GATE_TOKENS,
            progress: Optional[Callable] = None) -> dict:
    """Held-out metrics (`summarize`) of the converted folder `output` against the float original in `source`.
    `tokenizer`: the source's (loaded from `source` when None); `progress(iterable, desc=, unit=)` shows both
    passes, as in the gate."""
    import json

    from transformers import AutoTokenizer

    import mlx_arch
    from mlx_arch.core.base import text_config

    from .validate import digest, layer_ticker, once

    config = json.loads((Path(output) / "config.json").read_text())
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(source))
    vocab_size = text_config(config)["vocab_size"]
    model = mlx_arch.build_model(config)  # parameters stay lazy: no memory
    n_layers, blocks = len(model.layers), getattr(model, "reference_reads_children", False)
    stats = []
    for ids, mask in passes(rows(tokenizer, vocab_size, max_tokens), vocab_size):
        ours = mlx_logits(output, ids, layer_ticker(progress, n_layers, "held-out: mlx"))
        ref = once(("held-out", str(source), digest(ids, mask)), lambda: reference_logits(
            source, ids, mask, layer_ticker(progress, n_layers, "held-out: transformers"), blocks))
        stats.append(token_stats(ours, ref, ids, mask))
        del ours, ref
    return summarize(stats)


def summary_rows(heldout: dict) -> list:
    """(check, value) rows for the gate's summary table and the model card."""
    if not heldout:
        return []
    return [("held-out text (not calibration data): tokens", f"{heldout['tokens']}"),
            ("held-out text: KL to the float original (mean / max)",
             f"{heldout['kl_mean']:.3g} / {heldout['kl_max']:.3g}"),
            ("held-out text: top-1 agreement", f"{heldout['top1']:.1%}"),
            ("held-out text: perplexity ratio (ours / float original)",
             f"{heldout['perplexity_ratio']:.4f} ({heldout['perplexity']:.2f} / "
             f"{heldout['reference_perplexity']:.2f})")]
