"""Calibrated affine quantization: better rounding, the same MLX file format.

Every method here writes what `mx.dequantize` reads (packed codes, one scale and one bias per group, in the model's
float dtype); only the choice of codes, scales and biases differs from round-to-nearest (`nn.quantize`):

- `search`: per group, the clipping range (and so scale and bias) that minimises the reconstruction error weighted
  by the mean square of each input channel's activations (a plain weight error without calibration activations).
- `gptq`: error-feedback rounding (GPTQ, Frantar et al. 2022): columns are rounded one by one and each rounding
  error is spread over the columns not yet rounded, through the inverse Hessian of the layer's output error
  (H = X^T X of the layer's inputs, damped); each group's scale and bias are chosen, by the same search, when the
  rounding reaches the group.

Calibration runs layer by layer, in float32 activations: decoder layer i sees the hidden states that the already
quantized layers 0..i-1 produce on the calibration tokens, its linear layers' Hessians are accumulated, its weights
are quantized and installed, and the rows are run through it again for layer i+1. Memory holds one layer's weights
and Hessians, the calibration hidden states and the quantized weights done so far. The output head (a tied embedding
included) is calibrated on the final hidden states; an untied input embedding has no activations to weigh its error
and gets the weight-error search.

The calibration text: `convert/data/calibration.txt` (written for this package, Apache-2.0), or a user's file in
the same format (`read_documents`).
"""

import contextlib
import copy
import ctypes
import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from .errors import ConvertError

DATA = Path(__file__).with_name("data")
BUILTIN_CALIBRATION = DATA / "calibration.txt"
DOCUMENT, CHAT = "<<<document>>>", "<<<chat>>>"
ROLES = ("system", "user", "assistant")
# Calibration rows: the token stream cut into rows of this length, run a batch of rows at a time (short rows keep
# attention, slow on the CPU, cheap), and cut at MAX_CALIBRATION_TOKENS (GPTQ gains little past a few thousand).
CALIBRATION_ROW, CALIBRATION_BATCH, MAX_CALIBRATION_TOKENS = 256, 8, 8192
# Hessians are well conditioned with a few times more tokens than their width: tiny (test) models stop earlier.
TOKENS_PER_INPUT = 16
DAMP = 0.01  # GPTQ damping: a fraction of the mean Hessian diagonal added to the diagonal
ACT_ORDER = True  # GPTQ rounds columns by decreasing activation energy
SEQUENTIAL = False  # True: a layer's linear layers calibrated in call order, each group on inputs from the quantized ones
# before it (SmolLM2-135M 4-bit: KL 0.176 instead of 0.182, within noise, for 2.5 times the forward passes)
BLOCK = 128  # GPTQ columns rounded one by one within a block; the rest of the matrix is updated once per block (the
# paper's 128: a down projection of the 1.1B shape 1.53 s against 1.93 s at 32, the same error to 3 digits)
# Clipping search: the group's [min, max] range scaled by these factors (1.0 is round-to-nearest's range).
SHRINK = tuple(np.round(np.arange(1.0, 0.59, -0.05), 2))
REFITS = 3  # then rounds of weighted least squares for each group's scale and bias


# ---------------------------------------------------------------------------------------------------- texts


def read_documents(path: Path, header: bool = False) -> list:
    """Documents of a text file: plain strings, and conversations (lists of {"role", "content"}).

    Documents are separated by lines holding only `<<<document>>>`; one whose first line is `<<<chat>>>` is a
    conversation whose turns start with lines `[user]`, `[assistant]` or `[system]`. A file without separators is
    one document. With `header`, the leading `#` lines (up to the first blank line) are a comment and dropped.
    """
    text = Path(path).read_text(encoding="utf-8")
    if header:
        lines = text.split("\n")
        while lines and lines[0].startswith("#"):
            lines.pop(0)
        text = "\n".join(lines)
    documents = []
    for part in text.split(f"\n{DOCUMENT}\n"):
        part = part.strip("\n")
        if part.startswith(CHAT + "\n"):
            documents.append(conversation(part[len(CHAT) + 1:]))
        elif part.strip():
            documents.append(part)
    return documents


def conversation(text: str) -> list:
    turns = []
    for line in text.split("\n"):
        role = line[1:-1] if line.startswith("[") and line.endswith("]") else None
        if role in ROLES:
            turns.append({"role": role, "content": ""})
        elif turns:
            turns[-1]["content"] += ("\n" if turns[-1]["content"] else "") + line
    return [{"role": t["role"], "content": t["content"].strip("\n")} for t in turns]


def document_ids(tokenizer, document) -> list:
    """Token ids of a document; a conversation through the tokenizer's chat template when it has one."""
    if isinstance(document, str):
        return tokenizer(document, add_special_tokens=True)["input_ids"]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(document, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in document)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def stream_batches(tokenizer, documents: list, vocab_size: int, row: int = CALIBRATION_ROW,
                   batch: int = CALIBRATION_BATCH, max_tokens: int = MAX_CALIBRATION_TOKENS) -> list:
    """The documents' tokens as one stream (each document as the tokenizer starts it), cut into rows of `row`
    tokens and stacked `batch` rows at a time: (B, row) int32 arrays; the stream's tail is a last, shorter row."""
    stream = np.concatenate([np.asarray(document_ids(tokenizer, d), np.int32) for d in documents] or
                            [np.zeros(0, np.int32)])[:max_tokens]
    stream = np.minimum(stream, vocab_size - 1)
    full = len(stream) // row
    rows = stream[: full * row].reshape(full, row)
    batches = [rows[i:i + batch] for i in range(0, full, batch)]
    if len(stream) - full * row >= 2:
        batches.append(stream[full * row:][None])
    return batches


@dataclass(frozen=True)
class Calibration:
    """Which text calibrates, as the card and the log name it."""

    path: Path = BUILTIN_CALIBRATION
    builtin: bool = True

    @classmethod
    def of(cls, file: Optional[Path]) -> "Calibration":
        return cls() if file is None else cls(Path(file), False)

    def batches(self, tokenizer, vocab_size: int, widest: int) -> list:
        """(B, L) token batches of the calibration text (`stream_batches`) for a model whose widest calibrated layer
        has `widest` inputs."""
        budget = min(MAX_CALIBRATION_TOKENS, max(CALIBRATION_ROW * CALIBRATION_BATCH, TOKENS_PER_INPUT * widest))
        rows = stream_batches(tokenizer, read_documents(self.path, header=self.builtin), vocab_size,
                              max_tokens=budget)
        if not rows:
            raise ConvertError(f"the calibration text ({self.path}) gives no tokens with this model's tokenizer; use "
                               "another --calibration-file or --q-method rtn")
        return rows


# ---------------------------------------------------------------------------------------------------- MLX affine format


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to what `dtype` stores (round to nearest even); numpy in and out (`stored_t`)."""
    import torch

    return stored_t(torch.from_numpy(np.array(x, np.float32)), dtype).numpy()


def affine_params(lo, hi, bits: int, dtype: str) -> tuple:
    """Scale and bias (torch float32, as stored in `dtype`) that map codes 0..2**bits-1 onto [lo, hi]."""
    import torch

    tiny = 6.2e-5 if dtype == "float16" else 1e-12  # keeps the stored scale non-zero
    return stored_t(torch.clamp_min((hi - lo) / (2**bits - 1), tiny), dtype), stored_t(lo, dtype)


def stored_t(x, dtype: str):
    """`stored` of a torch float32 tensor (torch's casts round to nearest even too)."""
    import torch

    return x.to(getattr(torch, dtype)).float() if dtype in ("float16", "bfloat16") else x


def codes_of(w, scales, biases, bits: int, out=None):
    """Round to nearest, clamped to 0..2**bits-1 (torch float32; into `out` when given)."""
    import torch

    out = torch.sub(w, biases, out=out)
    return out.div_(scales).round_().clamp_(0, 2**bits - 1)


def dequantized(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, dtype: str) -> np.ndarray:
    """What `mx.dequantize` computes: scale * code, then + bias, each rounded to the stored dtype (in torch, on
    every core; numpy in and out)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(codes)).float()
    t = stored_t(t.mul_(torch.from_numpy(np.ascontiguousarray(scales, np.float32))), dtype)
    return stored_t(t.add_(torch.from_numpy(np.ascontiguousarray(biases, np.float32))), dtype).numpy()


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packed layout of integer codes (rows, cols) as uint32 words (`affine.pack_into`)."""
    import torch

    from .affine import pack_into

    rows, cols = codes.shape
    out = torch.empty(rows, cols * bits // 8, dtype=torch.uint8)
    pack_into(out, torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8)), bits)
    return out.numpy().view(np.uint32)


@dataclass
class Affine:
    """One quantized weight: codes (rows, cols) and per-group scales and biases (rows, cols / group)."""

    codes: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int
    dtype: str

    def dequantized(self) -> np.ndarray:
        g = self.group_size
        rows, cols = self.codes.shape
        shape = (rows, cols // g, g)
        return dequantized(self.codes.reshape(shape), self.scales[..., None], self.biases[..., None],
                           self.dtype).reshape(rows, cols)

    def arrays(self) -> tuple:
        """(packed weight, scales, biases) as the MLX arrays a quantized layer holds."""
        dtype = getattr(mx, self.dtype)
        return (mx.array(pack(self.codes, self.bits)), mx.array(self.scales).astype(dtype),
                mx.array(self.biases).astype(dtype))


# ---------------------------------------------------------------------------------------------------- methods


def group_params(w, bits: int, dtype: str, weights=None, shrink=SHRINK, refits: int = REFITS) -> tuple:
    """Scale and bias per group of `w` (torch float32 (..., group)) with the least squared error weighted by `weights`
    (broadcast against `w`; unweighted when None): the best clipped range [min, max] * f, f in `shrink`, then `refits`
    rounds of weighted least squares for scale and bias given the codes (each kept only where it lowers the error).
    In torch, in place where it can: it runs once per group of columns in GPTQ, on every core."""
    import torch

    lo, hi = w.amin(-1), w.amax(-1)
    scales, biases = affine_params(lo, hi, bits, dtype)  # round to nearest's range: the starting point
    scratch = torch.empty_like(w)
    best = group_error(w, scales, biases, bits, weights, scratch)

    def keep(new_scales, new_biases):
        nonlocal best, scales, biases
        err = group_error(w, new_scales, new_biases, bits, weights, scratch)
        better = err < best
        best, scales, biases = (torch.where(better, err, best), torch.where(better, new_scales, scales),
                                torch.where(better, new_biases, biases))

    for f in shrink:
        keep(*affine_params(lo * float(f), hi * float(f), bits, dtype))
    if refits:
        weighted_w = w if weights is None else w * weights
        sums = (weighted_w.sum(-1), (weights.expand_as(w).sum(-1) if weights is not None
                                     else torch.full_like(lo, w.shape[-1])))
        for _ in range(refits):
            codes = codes_of(w, scales[..., None], biases[..., None], bits, scratch)
            new_scales, new_biases = least_squares(w, codes, weights, scales, biases, sums)
            keep(stored_t(torch.clamp_min(new_scales, 1e-12), dtype), stored_t(new_biases, dtype))
    return scales, biases


def group_error(w, scales, biases, bits: int, weights, scratch):
    """Weighted squared error per group (in float32: the stored rounding of scale * code + bias barely moves it);
    `scratch` (like `w`) is overwritten."""
    s, b = scales[..., None], biases[..., None]
    e = codes_of(w, s, b, bits, scratch)
    e.mul_(s).add_(b).sub_(w).square_()
    if weights is not None:
        e.mul_(weights)
    return e.sum(-1)


def least_squares(w, codes, weights, scales, biases, sums) -> tuple:
    """Per group, the scale and bias minimising sum(weights * (w - scale * codes - bias)^2) (a 2x2 system; groups
    whose codes are all equal keep `scales` and `biases`). `sums`: (sum of weights * w, sum of weights) per group,
    which do not depend on the codes. `codes` is overwritten."""
    import torch

    sw, n = sums
    weighted = codes if weights is None else codes * weights
    sq, sqq, sqw = weighted.sum(-1), (weighted * codes).sum(-1), (weighted.mul_(w)).sum(-1)
    det = n * sqq - sq * sq
    ok = det > 1e-9 * n * sqq
    det = torch.where(ok, det, 1.0)
    new_s = torch.where(ok, (n * sqw - sq * sw) / det, scales)
    return new_s, torch.where(ok, (sw - new_s * sq) / n, biases)


def rtn(w: np.ndarray, bits: int, group_size: int, dtype: str) -> Affine:
    """Round to nearest over each group's full [min, max] range."""
    return search(w, bits, group_size, dtype, shrink=(1.0,), refits=0)


def search(w: np.ndarray, bits: int, group_size: int, dtype: str, channel_weights: Optional[np.ndarray] = None,
           shrink=SHRINK, refits: int = REFITS) -> Affine:
    """Round to nearest within each group's best clipping range (`group_params`); `channel_weights` (cols,): the
    mean square activation of each input channel."""
    import torch

    rows, cols = w.shape
    groups = torch.from_numpy(np.ascontiguousarray(w, np.float32)).reshape(rows, cols // group_size, group_size)
    weights = None if channel_weights is None else torch.from_numpy(
        np.ascontiguousarray(channel_weights, np.float32)).reshape(cols // group_size, group_size)
    scales, biases = group_params(groups, bits, dtype, weights, shrink, refits)
    codes = codes_of(groups, scales[..., None], biases[..., None], bits).reshape(rows, cols)
    return Affine(codes.to(torch.uint8).numpy(), scales.numpy(), biases.numpy(), bits, group_size, dtype)


def inverse_hessian_factor(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper triangular U with U^T U = (H + damping)^-1, in float32 (computed in float64). Channels that were never
    active get a unit diagonal: their columns are rounded without moving other columns.

    With J the reversal permutation and J H J = L L^T, U = J L^-1 J: one Cholesky factorisation and one triangular
    inverse (torch's LAPACK: numpy has no triangular inverse)."""
    import torch

    h = torch.from_numpy(np.array(h, np.float64))
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damp * (diag[~dead].mean() if bool((~dead).any()) else 1.0)
    flipped = torch.flip(h, (0, 1))
    for attempt in range(5):  # an ill-conditioned H (few tokens, wide layer) needs more damping
        lower, info = torch.linalg.cholesky_ex(flipped)
        if int(info) == 0:
            break
        flipped.diagonal().add_(damp * 10**attempt * float(diag.mean()))
    return torch.flip(lower_inverse(lower), (0, 1)).float().numpy()


def lower_inverse(lower, leaf: int = 512):
    """The inverse of a lower triangular torch matrix, by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1,
    D^-1]]. Half the arithmetic of a triangular solve against the identity (which ignores that the right-hand side
    is triangular too): 1.5 s against 2.3 s at 5632 columns on 2 cores."""
    import torch

    n = len(lower)
    if n <= leaf:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype), upper=False)
    k = n // 2
    out = torch.empty_like(lower)
    out[:k, k:] = 0
    out[:k, :k] = a = lower_inverse(lower[:k, :k], leaf)
    out[k:, k:] = lower_inverse(lower[k:, k:], leaf)
    out[k:, :k] = -torch.linalg.solve_triangular(lower[k:, k:], lower[k:, :k] @ a, upper=False)
    return out


def activation_order(h: np.ndarray) -> np.ndarray:
    """Columns by decreasing activation energy (the Hessian's diagonal): rounding them first leaves the most
    freedom to compensate their error."""
    return np.argsort(-np.diag(h), kind="stable")


def gptq(w: np.ndarray, h: np.ndarray, bits: int, group_size: int, dtype: str, u: Optional[np.ndarray] = None,
         order: Optional[np.ndarray] = None, shrink=SHRINK) -> Affine:
    """Error-feedback rounding of `w` (rows, cols) against the Hessian `h` (cols, cols) = X^T X.

    Columns are rounded in `order` (default: as stored); `u` is `inverse_hessian_factor` of h in that order, when
    already computed (layers fed the same inputs share it). A group's scale and bias are chosen when the rounding
    first reaches one of its columns, from the group's columns as the errors fed back so far have moved them.
    In torch, columns as rows (codes, scales and biases are built transposed, so every write is contiguous)."""
    import torch

    cols = w.shape[1]
    order = np.arange(cols) if order is None else order
    u = inverse_hessian_factor(h[np.ix_(order, order)]) if u is None else u
    # columns as rows, in the order they are rounded: a block is a contiguous slice, every write below is contiguous
    w = torch.from_numpy(np.ascontiguousarray(w.T[order], dtype=np.float32))
    u = torch.from_numpy(np.ascontiguousarray(u, np.float32))
    position = np.argsort(order)
    energy = torch.from_numpy(np.diag(h).astype(np.float32))
    rows = w.shape[1]
    codes = torch.empty((cols, rows), dtype=torch.uint8)
    scales = torch.empty((cols // group_size, rows))
    biases = torch.empty_like(scales)
    ready = np.zeros(cols // group_size, bool)
    q, fit = torch.empty(rows), torch.empty(rows)
    for b0 in range(0, cols, BLOCK):
        b1 = min(b0 + BLOCK, cols)
        part, errors = w[b0:b1], torch.empty((b1 - b0, rows))
        for j in range(b1 - b0):
            c = order[b0 + j]
            g = c // group_size
            if not ready[g]:  # its columns are all at or after this one, as the errors fed back so far moved them
                now = w[torch.from_numpy(position[g * group_size:(g + 1) * group_size])].T
                scales[g], biases[g] = group_params(now, bits, dtype, energy[g * group_size:(g + 1) * group_size],
                                                    shrink)
                ready[g] = True
            s, b = scales[g], biases[g]
            codes_of(part[j], s, b, bits, q)
            codes[c] = q
            p = b0 + j
            # the error fed back (the stored rounding of s * q + b is negligible here), spread over the block's rest
            torch.addcmul(b, s, q, out=fit)
            torch.sub(part[j], fit, out=errors[j]).div_(u[p, p])
            if j + 1 < b1 - b0:
                part[j + 1:].addr_(u[p, p + 1:b1], errors[j], alpha=-1)
        w[b1:].addmm_(u[b0:b1, b1:].T, errors, alpha=-1)  # the rest of the matrix, once per block
    return Affine(codes.T.contiguous().numpy(), scales.T.contiguous().numpy(), biases.T.contiguous().numpy(), bits,
                  group_size, dtype)


def weighted_error(w: np.ndarray, approx: np.ndarray, h: np.ndarray, max_rows: Optional[int] = None) -> float:
    """Output error of `approx` on the calibration activations relative to the output: tr(E H E^T) / tr(W H W^T)
    (over `max_rows` evenly spaced rows at most, an estimate that bounds the cost for wide layers)."""
    if max_rows and len(w) > max_rows:
        w, approx = w[:: len(w) // max_rows], approx[:: len(w) // max_rows]
    e = (w - approx).astype(np.float32)
    return float(((e @ h) * e).sum() / max(float(((w @ h) * w).sum()), 1e-30))


def gptq_plan(h: np.ndarray) -> tuple:
    """(column order, inverse Hessian factor in that order) for `gptq`: shared by the layers fed the same inputs."""
    order = activation_order(h) if ACT_ORDER else np.arange(len(h))
    return order, inverse_hessian_factor(h[np.ix_(order, order)])


def solve(method: str, w: np.ndarray, h: Optional[np.ndarray], params: dict, dtype: str,
          plan: Optional[tuple] = None) -> Affine:
    """`method` applied to `w` with the Hessian `h` of its inputs (None: no activations, weight error only);
    `plan`: `gptq_plan(h)` when already computed."""
    bits, group = params["bits"], params["group_size"]
    if method == "gptq" and h is not None:
        order, u = plan or gptq_plan(h)
        return gptq(w, h, bits, group, dtype, u, order)
    if method in ("gptq", "search"):
        return search(w, bits, group, dtype, None if h is None else np.diag(h).astype(np.float32))
    return rtn(w, bits, group, dtype)


# ---------------------------------------------------------------------------------------------------- layer by layer


class _Hessians:
    """X^T X (float32, numpy) of the inputs of the modules being calibrated, by path. Modules fed the same array (q, k and
    v; gate and up) share one sum, computed once."""

    def __init__(self, stop_after=()):
        self.sums, self.key = {}, {}
        # once every path in `stop_after` was fed in a pass, the pass stops: its output is not needed. `fed` counts
        # the calls of each path in the current pass (`new_pass`)
        self.stop_after, self.fed = set(stop_after), {}
        self.counts, self.experts = {}, {}  # stacked experts: tokens per expert by key, number of experts by path
        self._last = (None, None)  # the array the previous module was fed, and its sum's key

    def add(self, path: str, x):
        last, key = self._last
        if x is not last:
            key = path
            # numpy turns X^T X into a symmetric rank-k update (half the products of MLX's general one)
            flat = np.asarray(x.reshape(-1, x.shape[-1]).astype(mx.float32))
            xtx = flat.T @ flat
            if key in self.sums:
                self.sums[key] += xtx
            else:
                self.sums[key] = xtx
        if self.key.setdefault(path, key) != key:
            raise RuntimeError(f"calibration: {path} was fed different inputs from one batch to the next")
        self._last = (x, key)

    def add_routed(self, path: str, x, indices):
        """Per-expert X^T X of a layer of stacked experts (SwitchLinear): x (..., M, in) with `indices` broadcastable
        against its batch axes; each row counts for the expert its index names. Sums (E, in, in) and the tokens each
        expert received (`counts[key]`)."""
        last, key = self._last
        if x is not last:
            key = path
            shape = tuple(np.broadcast_shapes(tuple(x.shape[:-2]), tuple(indices.shape)))
            rows = np.array(mx.broadcast_to(x, shape + tuple(x.shape[-2:])).astype(mx.float32)).reshape(-1, x.shape[-1])
            experts = np.repeat(np.array(mx.broadcast_to(indices, shape)).reshape(-1), x.shape[-2])
            n_experts = self.experts[path]
            sums = self.sums.setdefault(key, np.zeros((n_experts, x.shape[-1], x.shape[-1]), np.float32))
            counts = self.counts.setdefault(key, np.zeros(n_experts, np.int64))
            for e in np.unique(experts):
                chosen = rows[experts == e]
                sums[e] += chosen.T @ chosen
                counts[e] += len(chosen)
        if self.key.setdefault(path, key) != key:
            raise RuntimeError(f"calibration: {path} was fed different inputs from one batch to the next")
        self._last = (x, key)

    def groups(self, paths: list) -> list:
        """`paths` grouped by shared input, in the order the inputs came; paths never called come last."""
        out = [[p for p in paths if self.key.get(p) == key] for key in self.sums]
        rest = [p for p in paths if p not in self.key]
        return [g for g in out if g] + ([rest] if rest else [])

    def pop(self, path: str) -> tuple:
        """(X^T X, key shared by the modules fed the same inputs) of `path`, (None, None) if it was never called."""
        key = self.key.get(path)
        if key is None:
            return None, None
        users = [p for p, k in self.key.items() if k == key]
        h = self.sums[key]  # shared by its users, read only
        if users == [path]:
            del self.sums[key]
        del self.key[path]
        return h, key

    def new_pass(self):
        self.fed = {}

    def fed_once_each(self, paths) -> bool:
        """Whether each of `paths` was fed exactly once in the pass that just ran (a module called twice in a layer's
        forward must see both calls, so its passes may not stop early)."""
        return all(self.fed.get(p) == 1 for p in paths)

    def stop_if_done(self, path: str):
        """Raise `_Stop` when `path` was the last of `stop_after` to be fed in this pass."""
        self.fed[path] = self.fed.get(path, 0) + 1
        if self.stop_after and all(p in self.fed for p in self.stop_after):
            raise _Stop



class _Capture(nn.Module):
    """Stands in for a linear layer while calibrating: records its input's Hessian, then computes as it."""

    def __init__(self, path: str, module, hessians: _Hessians):
        super().__init__()
        self.inner = module
        self.__dict__.update(path=path, hessians=hessians)  # outside the parameter tree

    def __call__(self, x):
        self.hessians.add(self.path, x)
        self.hessians.stop_if_done(self.path)
        return self.inner(x)


class _RoutedCapture(_Capture):
    """Stands in for a layer of stacked experts (SwitchLinear: weight (E, out, in), called with the experts' indices):
    records each expert's Hessian on the rows routed to it."""

    def __init__(self, path: str, module, hessians: _Hessians):
        super().__init__(path, module, hessians)
        hessians.experts[path] = module.weight.shape[0]

    def __call__(self, x, indices, *args, **kwargs):
        self.hessians.add_routed(self.path, x, indices)
        self.hessians.stop_if_done(self.path)
        return self.inner(x, indices, *args, **kwargs)


def capture(path: str, module, twin, hessians: _Hessians):
    """The stand-in recording the inputs of `module` (computing as `twin`)."""
    return (_RoutedCapture if stacked(module) else _Capture)(path, twin, hessians)


class _Stop(Exception):
    pass


class _HeadCapture(_Capture):
    """Stands in for the output head (a linear layer, or an embedding used as the head through `as_linear`):
    records the input's Hessian and stops the forward pass, whose logits are not needed."""

    def __call__(self, x):
        if isinstance(self.inner, nn.Embedding):
            return self.inner(x)  # a lookup
        self.as_linear(x)

    def as_linear(self, x):
        self.hessians.add(self.path, x)
        raise _Stop


@dataclass
class CalibrationReport:
    """What calibration did, for the log and the tests."""

    method: str
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    errors: dict = field(default_factory=dict)  # path -> (method's, round-to-nearest's) activation-weighted error
    uncalibrated: list = field(default_factory=list)  # quantized by the weight-error search: no activations
    # stacked experts: "path#e" -> (method's, round-to-nearest's) error on the rows routed to expert e
    expert_errors: dict = field(default_factory=dict)
    fallback: dict = field(default_factory=dict)  # "path#e" -> routed tokens, too few: the search method instead
    expert_tokens: dict = field(default_factory=dict)  # "path#e" -> calibration tokens routed to expert e

    def summary(self) -> str:
        ratios = sorted(ours / max(rtn, 1e-30) for ours, rtn in self.errors.values())
        median = f"{ratios[len(ratios) // 2]:.0%}" if ratios else "n/a"
        return (f"{self.method} on {self.tokens} calibration tokens ({self.rows} rows) in {self.seconds:.1f} s: "
                f"{len(self.errors)} layers calibrated, output error {median} of round-to-nearest's (median)"
                + (f"; without activations: {', '.join(self.uncalibrated)}" if self.uncalibrated else "")
                + self.experts_summary())

    def experts_summary(self) -> str:
        if not self.expert_errors and not self.fallback:
            return ""
        ratios = sorted(ours / max(rtn, 1e-30) for ours, rtn in self.expert_errors.values())
        median = f", output error {ratios[len(ratios) // 2]:.0%} of round-to-nearest's (median)" if ratios else ""
        return (f"; experts: {len(self.expert_errors)} calibrated on their routed tokens{median}, "
                f"{len(self.fallback)} with fewer than {MIN_EXPERT_TOKENS} routed tokens quantized by the search "
                "method instead")


def rtn_error(w: np.ndarray, h: np.ndarray, params: dict, dtype: str) -> float:
    """The activation-weighted error that `mx.quantize` (round to nearest) would give the same weight."""
    w = w[:: max(1, len(w) // REPORT_ROWS)]
    q = mx.quantize(mx.array(w).astype(getattr(mx, dtype)), group_size=params["group_size"], bits=params["bits"])
    return weighted_error(w, np.array(mx.dequantize(*q, group_size=params["group_size"], bits=params["bits"])
                                      .astype(mx.float32)), h)


REPORT_ROWS = 256  # the report's errors are estimated on this many rows of wide layers
# An expert calibrated by error feedback needs at least this many routed calibration tokens (fewer give a Hessian
# that describes those few tokens rather than the expert's inputs); others get the search method, weighted by
# whatever tokens they saw.
MIN_EXPERT_TOKENS = 64


def stacked(module) -> bool:
    """Whether `module` holds stacked experts: a 3-D weight (E, out, in) applied to the rows routed to each expert,
    called with the experts' `indices` (MoE blocks' switch layers; not per-head layers, which every row goes
    through)."""
    return (hasattr(module, "to_quantized") and "weight" in module and module.weight.ndim == 3
            and "indices" in inspect.signature(type(module).__call__).parameters)


def handles(module) -> bool:
    """Whether calibration quantizes this kind of module: linear layers, embeddings and stacked experts (others are
    rounded to nearest by `nn.quantize`)."""
    return type(module) in (nn.Linear, nn.Embedding) or stacked(module)


class Experts(list):
    """One Affine per expert of a stacked-expert layer, stored as one (E, ...) array each."""

    def dequantized(self) -> np.ndarray:
        return np.stack([r.dequantized() for r in self])

    def arrays(self) -> tuple:
        return tuple(mx.stack(parts) for parts in zip(*(r.arrays() for r in self)))

    @property
    def bits(self):
        return self[0].bits

    @property
    def group_size(self):
        return self[0].group_size


def quantized_module(module, result: Affine, arrays: tuple):
    """The MLX quantized twin of `module` holding `arrays` (`result.arrays()`, perhaps as reloaded from a spill
    file): the module's own `to_quantized` layout (what `nn.quantize` produces), codes replaced."""
    layer = module.to_quantized(group_size=result.group_size, bits=result.bits)  # its round to nearest: dropped
    layer.weight, layer.scales, layer.biases = arrays
    return layer


def float_twin(module, weight: np.ndarray):
    """`module` computing in float32 with `weight` (and its bias)."""
    twin = copy.copy(module)  # a shallow copy: the module's own parameters stay as they are
    twin.weight = mx.array(weight)
    if "bias" in module:
        twin.bias = module.bias.astype(mx.float32)
    return twin


class LayerwiseQuantizer:
    """Runs calibration batches through `model` one decoder layer at a time (float32 activations), quantizing the
    layers in `settings` ({path: {bits, group_size, mode: affine}}) on the way; see the module docstring."""

    def __init__(self, model, settings: dict, method: str, spill: Optional[Path] = None,
                 progress: Optional[Callable] = None):
        self.model, self.settings, self.method, self.spill = model, settings, method, spill
        self.progress = progress or (lambda iterable, **kwargs: iterable)
        self.report = CalibrationReport(method)

    def install(self, root, prefix: str, name: str, modules: dict, results: dict):
        """Replace `modules` (by full path) with their quantized twins holding `results`. With `spill` (a folder), the
        arrays are written there and read back lazily, so that memory does not hold the quantized layers done so
        far: saving reads them again, one at a time."""
        arrays = {path: result.arrays() for path, result in results.items()}
        if self.spill is not None and arrays:
            file = Path(self.spill) / f"calibrated-{name}.safetensors"
            mx.save_safetensors(str(file), {f"{p}.{k}": a for p, group in arrays.items()
                                            for k, a in zip(("weight", "scales", "biases"), group)})
            loaded = mx.load(str(file))
            arrays = {p: tuple(loaded[f"{p}.{k}"] for k in ("weight", "scales", "biases")) for p in arrays}
        swap(root, prefix, {p: quantized_module(modules[p], results[p], arrays[p]) for p in arrays})

    def run(self, batches: list) -> CalibrationReport:
        with blas_threads(calibration_threads()):
            return self._run(batches)

    def _run(self, batches: list) -> CalibrationReport:
        start = time.perf_counter()
        model = self.model
        self.report.rows = sum(b.shape[0] for b in batches)
        self.report.tokens = int(sum(b.size for b in batches))
        hidden = [model.embed(mx.array(b)).astype(mx.float32) for b in batches]
        masks = [model.masks(h) for h in hidden]
        # What the layers read besides the hidden states (the model's `stream_context`, e.g. the token embeddings).
        self.contexts = [model.stream_context(mx.array(b), h) for b, h in zip(batches, hidden)]
        paths = {id(m): p for p, m in model.named_modules()}
        for i in self.progress(range(len(model.layers)), desc=f"quantize: {self.method}", unit="layer"):
            hidden = self.layer(paths[id(model.layers[i])], i, hidden, [m[i] for m in masks])
        self.head(hidden)
        self.report.seconds = time.perf_counter() - start
        return self.report

    def layer(self, prefix: str, i: int, hidden: list, masks: list) -> list:
        """Calibrate decoder layer i on its inputs `hidden`; returns its outputs once quantized.

        With SEQUENTIAL, the layer's linear layers are quantized in the order they are called, a group of layers fed
        the same input at a time (q, k, v; then o; gate, up; down), each group's Hessian measured on inputs that the
        groups before it compute quantized; otherwise every Hessian comes from one pass."""
        layer = self.model.layers[i]
        targets = {f"{prefix}.{p}": m for p, m in layer.named_modules()
                   if f"{prefix}.{p}" in self.settings and (type(m) is nn.Linear or stacked(m))}
        floats = {p: np.array(m.weight.astype(mx.float32)) for p, m in targets.items()}
        done, groups = {}, None
        while len(done) < len(targets):
            todo = groups.pop(0) if groups else [p for p in targets if p not in done]
            # After a first whole pass, the passes stop once every module in `todo` has its input (the rest, e.g. the
            # down projection's product, is not needed), unless the first pass fed one of them twice or never.
            hessians = _Hessians()
            swap(layer, prefix, {p: capture(p, targets[p], float_twin(targets[p], floats[p]), hessians) for p in todo})
            for n, (h, mask, context) in enumerate(zip(hidden, masks, self.contexts)):
                hessians.new_pass()
                try:
                    mx.eval(layer(h, mask, None, *self.model.layer_args(context, i)))
                except _Stop:
                    pass
                if n == 0 and hessians.fed_once_each(todo):
                    hessians.stop_after = set(todo)
            if groups is None and SEQUENTIAL:
                groups = hessians.groups(todo)
                todo = groups.pop(0)
            plans = {}
            for path in todo:
                h, key = hessians.pop(path)
                if stacked(targets[path]):
                    counts = hessians.counts[key] if h is not None else None
                    done[path] = self.quantize_experts(path, floats.pop(path), h, counts, targets[path], plans, key)
                    continue
                if self.method == "gptq" and h is not None and key not in plans:
                    plans[key] = gptq_plan(h)
                done[path] = self.quantize(path, floats.pop(path), h, targets[path], plans.get(key))
            # later groups and the next layer see this group as quantized (computed in float32)
            swap(layer, prefix, {p: float_twin(targets[p], done[p].dequantized()) for p in todo})
        out = []
        for h, mask, context in zip(hidden, masks, self.contexts):
            out.append(layer(h, mask, None, *self.model.layer_args(context, i)))
            mx.eval(out[-1])
        self.install(layer, prefix, f"layer-{i}", targets, done)
        return out

    def head(self, hidden: list):
        """Calibrate the output head on the final hidden states (`model.head` stopped at the head's input); an
        embedding that is not the head has no activations to weigh its error and gets the weight-error search."""
        model = self.model
        vocab, hessians = head_hessians(model, self.settings, hidden)
        done = {}
        for path, module in vocab.items():
            h = hessians.pop(path)[0]
            if h is None:
                self.report.uncalibrated.append(path)
            done[path] = self.quantize(path, np.array(module.weight.astype(mx.float32)), h, module)
        self.install(model, "", "head", vocab, done)

    def quantize_experts(self, path: str, w: np.ndarray, h: Optional[np.ndarray], counts, module, plans: dict,
                         key) -> Experts:
        """Each expert of a stacked-expert layer `w` (E, out, in) by the method on the rows routed to it (`h`
        (E, in, in), `counts` tokens per expert); an expert with fewer than MIN_EXPERT_TOKENS gets the search
        method (activation-weighted by the tokens it saw, if any). `plans` (by (key, expert)) shares GPTQ plans
        between the layers fed the same rows (gate and up)."""
        dtype = str(module.weight.dtype).rpartition(".")[2]
        params, results = self.settings[path], Experts()
        for e in range(w.shape[0]):
            he = None if h is None or counts[e] == 0 else h[e]
            name = f"{path}#{e}"
            self.report.expert_tokens[name] = 0 if counts is None else int(counts[e])
            if he is None or counts[e] < MIN_EXPERT_TOKENS:
                results.append(solve("search" if self.method != "rtn" else "rtn", w[e], he, params, dtype))
                self.report.fallback[name] = 0 if counts is None else int(counts[e])
                continue
            if self.method == "gptq" and (key, e) not in plans:
                plans[(key, e)] = gptq_plan(he)
            results.append(solve(self.method, w[e], he, params, dtype, plans.get((key, e))))
            self.report.expert_errors[name] = (weighted_error(w[e], results[-1].dequantized(), he, REPORT_ROWS),
                                               rtn_error(w[e], he, params, dtype))
        return results

    def quantize(self, path: str, w: np.ndarray, h: Optional[np.ndarray], module, plan=None) -> Affine:
        dtype = str(module.weight.dtype).rpartition(".")[2]  # scales and biases are stored in the weight's dtype
        result = solve(self.method, w, h, self.settings[path], dtype, plan)
        if h is not None:
            self.report.errors[path] = (weighted_error(w, result.dequantized(), h, REPORT_ROWS),
                                        rtn_error(w, h, self.settings[path], dtype))
        return result


def head_hessians(model, settings: dict, hidden: list) -> tuple:
    """({path: module} of the vocabulary layers in `settings`, _Hessians of their inputs as the output head): the
    final hidden states `hidden` run through `model.head`, stopped at the head's input."""
    vocab = {p: m for p, m in model.named_modules()
             if p in settings and model.is_vocab(p) and type(m) in (nn.Linear, nn.Embedding)}
    hessians = _Hessians()
    swap(model, "", {p: _HeadCapture(p, m, hessians) for p, m in vocab.items()})
    for h in hidden:
        try:
            model.head(h)
        except _Stop:
            pass
    swap(model, "", vocab)
    return vocab, hessians


def calibration_threads() -> Optional[int]:
    """BLAS threads for calibration: None (every core, the libraries' default) unless other processes already keep
    every core busy (`others_busy_cores`), then 1. Calibration runs many small products (attention over short rows,
    GPTQ's block updates); on cores shared with other work, waking a second thread for each costs more than the
    product. Measured on this 2-core machine: idle, gptq on 2 layers of a TinyLlama-1.1B-shaped model took 67 s
    with both cores against 95 s with one thread; with both cores busy elsewhere, 6 layers of SmolLM2-135M took 43
    s with both against 29 s with one (and a batch of 32 products of 256x16x256, 0.5 s against 1 ms). The load
    average is no guide: it counts this process, and a conversion run right after another saw the first one's load
    and calibrated on one thread."""
    cores = os.cpu_count() or 1
    others = others_busy_cores()
    return 1 if others is not None and others >= cores - 0.5 else None


def others_busy_cores(window: float = 0.25) -> Optional[float]:
    """How many cores other processes kept busy over the next `window` seconds (Linux: /proc/stat's busy time
    less this process's own; None where /proc is not there)."""

    def sample():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        with open("/proc/self/stat") as f:
            own = f.read().rpartition(")")[2].split()  # after the command name: state is field 0, utime 11, stime 12
        return sum(ticks), ticks[3] + ticks[4], int(own[11]) + int(own[12])

    try:
        (total0, idle0, own0), _, (total1, idle1, own1) = sample(), time.sleep(window), sample()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0  # ticks over every core
    if elapsed <= 0:
        return None
    busy = (elapsed - (idle1 - idle0)) - (own1 - own0)
    return max(0.0, busy) / elapsed * (os.cpu_count() or 1)


@contextlib.contextmanager
def blas_threads(n: Optional[int]):
    """Every BLAS of this process (the OpenBLAS serving MLX, see blas.py; numpy's OpenBLAS; torch's threads)
    limited to `n` threads (None: left as they are)."""
    import torch

    limits = [] if n is None else [(get, set_) for get, set_ in _openblas_thread_controls()] + [
        (torch.get_num_threads, torch.set_num_threads)]
    before = [get() for get, _ in limits]
    for _, set_ in limits:
        set_(n)
    try:
        yield
    finally:
        for (_, set_), count in zip(limits, before):
            set_(count)


_THREAD_SYMBOLS = [("openblas_get_num_threads", "openblas_set_num_threads"),
                   ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                   ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                   ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads")]


def _openblas_thread_controls() -> list:
    """(get, set) thread-count functions of every OpenBLAS loaded in this process (Linux: read from
    /proc/self/maps; elsewhere none)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:
        return []
    controls = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same library
        except OSError:
            continue
        for get, set_ in _THREAD_SYMBOLS:
            if hasattr(lib, get) and hasattr(lib, set_):
                controls.append((getattr(lib, get), getattr(lib, set_)))
                break
    return controls


def swap(root, prefix: str, modules: dict):
    """Replace modules of `root` by full path (`prefix` is root's own path)."""
    if modules:
        cut = len(prefix) + 1 if prefix else 0
        root.update_modules(tree_unflatten([(p[cut:], m) for p, m in modules.items()]))
