"""Mixed precision under a bits-per-weight budget (`--target-bpw`), chosen by measured sensitivity.

Each quantized layer's cost at each candidate bit width is estimated as the loss increase its quantization error
would cause, to second order: for a layer with output y = W x, quantizing W adds E x to y (E = W - Q(W)), and the
language-modelling loss grows by about sum_c F_c (E H E^T)_cc, where H = sum x x^T over the calibration tokens (the
Hessian GPTQ uses) and F_c the mean square gradient of the loss with respect to output channel c (the Fisher of
the layer's output, next tokens sampled from the float model: the curvature of the KL to it). F comes from one
backward pass of the float model over a few calibration rows; H
from a layer-by-layer forward pass, as in calibration; E is the error of the method that will write the codes, at
each candidate width, on a sample of each layer's rows (gptq repairs some layers far better than others: ranking by
round-to-nearest errors gave SmolLM2-135M at 4.5 bpw a held-out KL of 0.173, no better than uniform 4-bit gptq's
0.163; gptq's own errors give 0.150). Stacked experts sum their experts' round-to-nearest errors, each on the rows
routed to it. A tied embedding is the output layer (its H is the final
hidden states') plus its lookup role (H = the token counts).

Bits are then allocated greedily: every layer starts at the lowest candidate width, and the upgrade with the most
estimated loss removed per added bit is taken while the whole model stays within the budget.

mlx-lm's comparison point: its fixed recipes give a tied embedding the low width (only a separate `lm_head` gets
the high one), and its `dynamic_quant` ranks layers by a first-order gradient term between two widths; here the
tied embedding competes as the output layer, and every width in the candidate range is open to every layer.
"""

import time
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .calibrate import (_Hessians, blas_threads, calibration_threads, capture, float_twin, gptq_plan, head_hessians,
                        solve, stacked, swap)
from .errors import ConvertError
from .plan import AFFINE_BITS

FISHER_TOKENS = 2048  # calibration tokens through the backward pass that measures F
FISHER_ROW = 256  # tokens per backward pass (the head's gradient is a (row, vocabulary) array)
# Labels of the backward pass: "model" samples each next token from the float model's own distribution (the Fisher
# of the KL to the float model, which quantization should keep small); "text" uses the calibration text's tokens.
FISHER_LABELS = "model"
MAX_ROWS = 512  # output rows per layer the error is measured on (the F-heaviest half exactly, the rest sampled)


def scale_bits(dtype: str) -> int:
    """Bits of one stored scale or bias (the model's float dtype)."""
    return 32 if dtype == "float32" else 16


def cost_bits(n_weights: int, bits: int, group_size: int, dtype: str) -> float:
    """Stored bits of a quantized weight: the codes, plus one scale and one bias per group."""
    return n_weights * (bits + 2 * scale_bits(dtype) / group_size)


def candidates(target: float, group_size: int, dtype: str) -> tuple:
    """Widths open to every layer: from one below the widest uniform width that fits the budget, up to 8."""
    fits = [b for b in AFFINE_BITS if b + 2 * scale_bits(dtype) / group_size <= target]
    base = fits[-1] if fits else AFFINE_BITS[0]
    return tuple(b for b in AFFINE_BITS if b >= max(AFFINE_BITS[0], base - 1))


# ---------------------------------------------------------------------------------------------------- F


class _Probe(nn.Module):
    """Stands in for a quantized layer in the backward pass: adds a zero perturbation to its output, whose gradient
    is the loss's gradient with respect to that output (one per call: `Probes.key`)."""

    def __init__(self, path: str, module, probes: "Probes"):
        super().__init__()
        self.inner = module
        self.__dict__.update(path=path, probes=probes)

    def __call__(self, *args, **kwargs):
        return self.probes.perturb(self.path, self.inner(*args, **kwargs))

    def as_linear(self, x):  # a tied embedding used as the output head
        return self.probes.perturb(self.path + "@head", self.inner.as_linear(x))


class Probes:
    """The perturbations of one forward pass: recorded (shapes) in a first pass, then fed as the differentiated
    argument."""

    def __init__(self):
        self.shapes, self.deltas, self.calls = {}, None, {}

    def perturb(self, path: str, y):
        n = self.calls[path] = self.calls.get(path, -1) + 1
        key = f"{path}#{n}"
        if self.deltas is None:
            self.shapes[key] = y.shape
            return y
        return y + self.deltas[key]


def fisher(model, paths: list, batches: list, labels: Optional[str] = None) -> dict:
    """{path or path@head: (out,)} the sum over calibration tokens of each output channel's squared gradient of
    the next-token loss (float32 weights and activations), the next tokens as `labels` (FISHER_LABELS) says."""
    labels = labels or FISHER_LABELS
    rows = np.concatenate([b.reshape(-1) for b in batches])[:FISHER_TOKENS]
    rows = [rows[i:i + FISHER_ROW][None] for i in range(0, len(rows) - 1, FISHER_ROW) if len(rows[i:]) >= 2]
    modules = dict(model.named_modules())
    probes = Probes()
    original = model.parameters()
    model.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a, original))
    swap(model, "", {p: _Probe(p, modules[p], probes) for p in paths})
    out = {}
    try:
        for i, ids in enumerate(rows):
            ids = mx.array(ids)
            probes.deltas, probes.calls, probes.shapes = None, {}, {}
            logits = model(ids[:, :-1])  # (records the perturbations' shapes)
            targets = ids[:, 1:] if labels == "text" else mx.random.categorical(logits.astype(mx.float32),
                                                                                 key=mx.random.key(i))
            mx.eval(targets)

            def loss(deltas):
                probes.deltas, probes.calls = deltas, {}
                logits = model(ids[:, :-1]).astype(mx.float32)
                return nn.losses.cross_entropy(logits, targets, reduction="sum")

            zeros = {k: mx.zeros(s, mx.float32) for k, s in probes.shapes.items()}
            try:
                grads = mx.grad(loss)(zeros)
            except ValueError as e:  # a layer whose gradient MLX cannot compute (e.g. through integer indices)
                raise ConvertError(f"--target-bpw measures sensitivity with a backward pass, which this model does "
                                   f"not support ({str(e).splitlines()[0][:160]}); use --quant-recipe or --q-bits "
                                   "instead") from None
            for key, g in grads.items():
                path = key.rsplit("#", 1)[0]
                g = g.reshape(-1, g.shape[-1])
                square = np.array((g * g).sum(0))
                out[path] = out[path] + square if path in out else square
    finally:
        swap(model, "", {p: modules[p] for p in paths})
        model.update(original)
        probes.deltas = None
    return out


# ---------------------------------------------------------------------------------------------------- errors


def sampled_rows(f: np.ndarray, max_rows: int = MAX_ROWS) -> tuple:
    """(rows, weights): the rows with the largest F exactly (weight 1), then evenly spaced rows of the others, each
    weighted by how many rows it stands for."""
    if len(f) <= max_rows:
        return np.arange(len(f)), np.ones(len(f), np.float32)
    order = np.argsort(-f, kind="stable")
    top, rest = order[: max_rows // 2], order[max_rows // 2:]
    step = len(rest) / (max_rows - len(top))
    picked = rest[(np.arange(max_rows - len(top)) * step).astype(int)]
    return np.concatenate([top, picked]), np.concatenate([np.ones(len(top)), np.full(len(picked), step)])


def rounded(w: np.ndarray, bits: int, group_size: int, dtype: str) -> np.ndarray:
    """Round to nearest as `mx.quantize` does, read back in float32."""
    q = mx.quantize(mx.array(w).astype(getattr(mx, dtype)), group_size=group_size, bits=bits)
    return np.array(mx.dequantize(*q, group_size=group_size, bits=bits).astype(mx.float32))


def loss_increase(w: np.ndarray, h: np.ndarray, f: np.ndarray, widths: tuple, group_size: int, dtype: str,
                  method: str = "rtn") -> dict:
    """{bits: sum_c F_c (E H E^T)_cc} for w (out, in), estimated on `sampled_rows`, E the error of `method` (rows
    are rounded independently of each other, so the sampled rows' errors are those of the whole layer's)."""
    rows, weights = sampled_rows(f)
    w = w[rows]
    plan = gptq_plan(h) if method == "gptq" else None
    out = {}
    for bits in widths:
        if method == "rtn":
            e = w - rounded(w, bits, group_size, dtype)
        else:
            e = w - solve(method, w, h, {"bits": bits, "group_size": group_size}, dtype, plan).dequantized()
        out[bits] = float((((e @ h) * e).sum(1) * f[rows] * weights).sum())
    return out


def lookup_increase(w: np.ndarray, counts: np.ndarray, f: np.ndarray, widths: tuple, group_size: int,
                    dtype: str) -> dict:
    """The same for an embedding's lookup role: rows are read as often as their token occurs; F is over its
    output (hidden) channels."""
    used = np.nonzero(counts)[0]
    w = w[used]
    return {bits: float((((w - rounded(w, bits, group_size, dtype)) ** 2 * f).sum(1) * counts[used]).sum())
            for bits in widths}


def measured_errors(model, settings: dict, batches: list, fisher_sums: dict, widths: tuple, dtype: str,
                    method: str = "rtn") -> dict:
    """{path: {bits: estimated loss increase}} for the layers of `settings` that were measured (F and H found)."""
    out = {}
    weight = lambda path, m: np.array(m.weight.astype(mx.float32))  # noqa: E731
    hidden = [model.embed(mx.array(b)).astype(mx.float32) for b in batches]
    masks = [model.masks(h) for h in hidden]
    contexts = [model.stream_context(mx.array(b), h) for b, h in zip(batches, hidden)]  # what layers read besides h
    paths = {id(m): p for p, m in model.named_modules()}
    for i in range(len(model.layers)):
        layer = model.layers[i]
        prefix = paths[id(layer)]
        targets = {f"{prefix}.{p}": m for p, m in layer.named_modules()
                   if f"{prefix}.{p}" in settings and (type(m) is nn.Linear or stacked(m))}
        hessians = _Hessians()
        swap(layer, prefix, {p: capture(p, m, float_twin(m, weight(p, m)), hessians) for p, m in targets.items()})
        next_hidden = []
        for h, mask, context in zip(hidden, [m[i] for m in masks], contexts):
            next_hidden.append(layer(h, mask, None, *model.layer_args(context, i)))
            mx.eval(next_hidden[-1])
        swap(layer, prefix, targets)
        hidden = next_hidden
        for path, module in targets.items():
            h, key = hessians.pop(path)
            if h is None or path not in fisher_sums:
                continue
            params, w = settings[path], weight(path, module)
            if stacked(module):
                errors = [loss_increase(w[e], h[e], fisher_sums[path], widths, params["group_size"], dtype, "rtn")
                          for e in range(w.shape[0]) if hessians.counts[key][e]]
                out[path] = {b: sum(e[b] for e in errors) for b in widths}
            else:
                out[path] = loss_increase(w, h, fisher_sums[path], widths, params["group_size"], dtype, method)
    out.update(head_errors(model, settings, batches, hidden, fisher_sums, widths, dtype, method))
    return out


def head_errors(model, settings, batches, hidden, fisher_sums, widths, dtype, method="rtn") -> dict:
    """The vocabulary layers: the output head on the final hidden states, an embedding's lookups on the token
    counts (both, summed, for a tied embedding)."""
    vocab, hessians = head_hessians(model, settings, hidden)
    counts = np.bincount(np.concatenate([b.reshape(-1) for b in batches]), minlength=model.args.vocab_size)
    out = {}
    for path, module in vocab.items():
        w, group = np.array(module.weight.astype(mx.float32)), settings[path]["group_size"]
        h = hessians.pop(path)[0]
        parts = []
        if h is not None and (path in fisher_sums or path + "@head" in fisher_sums):
            parts.append(loss_increase(w, h, fisher_sums.get(path + "@head", fisher_sums.get(path)), widths, group,
                                       dtype, method))
        if isinstance(module, nn.Embedding) and path in fisher_sums:
            parts.append(lookup_increase(w, counts[: len(w)], fisher_sums[path], widths, group, dtype))
        if parts:
            out[path] = {b: sum(p[b] for p in parts) for b in widths}
    return out


# ---------------------------------------------------------------------------------------------------- allocation


@dataclass
class Allocation:
    """The chosen widths and what the log and the card say about them."""

    target: float
    bits: dict  # path -> bits
    achieved: float  # bits per weight of the whole model (every tensor counted as stored)
    sensitivity: dict = field(default_factory=dict)  # path -> estimated loss increase per weight at the lowest width
    unmeasured: list = field(default_factory=list)  # layers without a measurement: the budget's base width
    seconds: float = 0.0
    vocab: tuple = ()  # the vocabulary layers (named in the summary)
    estimates: dict = field(default_factory=dict)  # path -> {bits: estimated loss increase}

    def summary(self) -> str:
        widths = {}
        for path, bits in self.bits.items():
            widths.setdefault(bits, []).append(path)
        parts = ", ".join(f"{b}-bit: {len(p)} layers" for b, p in sorted(widths.items()))
        vocab = [f"{p.rsplit('.', 1)[-1]} {b}-bit" for p, b in self.bits.items() if p in self.vocab]
        return (f"mixed precision by measured sensitivity for a budget of {self.target:g} bits per weight: "
                f"{self.achieved:.3f} achieved ({parts}" + (f"; {', '.join(vocab)}" if vocab else "") + ")"
                + (f"; not measured, at the base width: {len(self.unmeasured)} layers" if self.unmeasured else ""))


def allocate(model, settings: dict, target: float, batches: list, dtype: str, log=None,
             method: str = "rtn") -> Allocation:
    """Widths for the affine layers of `settings` within `target` bits per weight over the whole model; the errors
    at each width are those of `method` (the quantization method that will write the codes)."""
    start = time.perf_counter()
    log = log or (lambda message: None)
    group = next(iter(settings.values()))["group_size"]
    widths = candidates(target, group, dtype)
    modules = dict(model.named_modules())
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    fixed = sum(v.size * v.dtype.size * 8 for k, v in tree_flatten(model.parameters())
                if not (k.endswith(".weight") and k[: -len(".weight")] in settings))
    sizes = {p: modules[p].weight.size for p in settings}
    cost = {p: {b: cost_bits(sizes[p], b, settings[p]["group_size"], dtype) for b in widths} for p in settings}
    budget = target * total - fixed
    floor = fixed + sum(c[widths[0]] for c in cost.values())
    if floor > target * total:
        raise ConvertError(f"--target-bpw {target:g} is below what the narrowest width gives this model "
                           f"({floor / total:.3f} bits per weight with {widths[0]}-bit layers and group size "
                           f"{group}); raise it or use --q-bits {widths[0]}")
    ceiling = fixed + sum(c[widths[-1]] for c in cost.values())
    if ceiling <= target * total:
        raise ConvertError(f"--target-bpw {target:g} is at or above what {widths[-1]}-bit layers give this model "
                           f"({ceiling / total:.3f} bits per weight): use --q-bits {widths[-1]}")
    with blas_threads(calibration_threads()):
        sums = fisher(model, list(settings), batches)
        errors = measured_errors(model, settings, batches, sums, widths, dtype, method)
    base = max(b for b in widths if b + 2 * scale_bits(dtype) / group <= target) if target >= widths[0] else widths[0]
    unmeasured = [p for p in settings if p not in errors]
    choice = {p: widths[0] for p in errors}
    choice.update({p: base for p in unmeasured})
    spent = sum(cost[p][b] for p, b in choice.items())
    while True:
        best = None
        for path, now in choice.items():
            if path in unmeasured:
                continue
            for b in widths:
                extra = cost[path][b] - cost[path][now]
                gain = errors[path][now] - errors[path][b]
                if b > now and gain > 0 and spent + extra <= budget and (best is None or gain / extra > best[0]):
                    best = (gain / extra, path, b, extra)
        if best is None:
            break
        _, path, b, extra = best
        choice[path], spent = b, spent + extra
    allocation = Allocation(target, choice, (fixed + spent) / total,
                            {p: e[widths[0]] / sizes[p] for p, e in errors.items()}, unmeasured,
                            time.perf_counter() - start, tuple(p for p in settings if model.is_vocab(p)), errors)
    log(f"quantization: {allocation.summary()} ({allocation.seconds:.1f} s to measure and allocate)")
    return allocation


def ranked(allocation: Allocation, n: Optional[int] = None) -> list:
    """Layers by measured sensitivity per weight, most sensitive first."""
    return sorted(allocation.sensitivity, key=lambda p: -allocation.sensitivity[p])[:n]
