"""The validation gate: does the converted folder compute what the source checkpoint computes?

Runs on the converted model reloaded from its saved files, against the transformers model of the source in float32.
Both run one layer at a time with weights read just before use and released after (`reference.py`,
`layerwise.py`), so memory stays bounded for models larger than memory. Three parts, reported separately:

- **Exact-weights parity (the proof).** The reference runs with the weights the output actually holds (each
  quantized tensor dequantized as the MLX format defines it, mapped back to the checkpoint's names by the inverse
  of the family's weight rules). Both sides then compute the same function, so float32 bounds (`exact_bound`)
  apply to the logits and to every layer's hidden states, at 4 bits as in bf16: a layout, config or code bug fails
  here, however much quantization error there is. Each stored tensor is also compared with its source tensor, so
  a weight put in the wrong place cannot pass either (`weight_bound`).
- **Shadow long-range parity** (`shadow.py`): the release's config with small widths and random weights, compared
  with transformers past every window, chunk and original context the config names, cached decode included.
- **Consistency**: KV-cache decode against a full forward, padded batch against single prompts, non-finite
  weights, tokenizer fidelity, and (for float16 outputs) activations within float16's range.
- **Quantization cost (measured, not proof)**: KL, top-1 and cosine against the float original, with per-precision
  bounds (`THRESHOLDS`) loose enough for a healthy quantization and tight enough to catch a broken one.
"""

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
from mlx_arch.core.base import source_dtype, text_config

from . import backend
from .layerwise import rel_error

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Über naïve café — 東京 🙂, numbers 3.14159 and 2048.",
]
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
TOKENIZER_PROBES = PROMPTS + ["  leading and   inner  spaces\n\ttabs\r\n", "", "ÅÄÖ ß Ω 🤖 \u200b zero-width"]
MAX_PROBE_TOKENS = 48

# Gate thresholds per output precision: logits KL(reference || ours) averaged over positions, top-1 agreement
# (on positions where the reference's choice is decided), max relative logit error (float formats only), and the
# hidden-state relative error that marks a layer as the first one to diverge. Quantized bounds are loose enough
# for small real models at that bit width (SmolLM2-135M with plain round-to-nearest: KL 0.005 at 8 bits, 0.81 at
# 4 bits) and tight enough to catch a broken conversion (a wrong layout or RoPE gives KL of several nats and random
# top-1).
THRESHOLDS = {
    "float32": dict(kl_mean=1e-6, top1=0.99, layer_error=1e-3),
    "float16": dict(kl_mean=1e-3, top1=0.97, layer_error=3e-2),
    "bfloat16": dict(kl_mean=5e-3, top1=0.95, layer_error=1e-1),
    8: dict(kl_mean=0.03, top1=0.9, layer_error=0.15),
    6: dict(kl_mean=0.12, top1=0.8, layer_error=0.3),
    5: dict(kl_mean=0.3, top1=0.75, layer_error=0.5),
    4: dict(kl_mean=1.0, top1=0.6, layer_error=0.8),
    3: dict(kl_mean=2.0, top1=0.4, layer_error=1.5),
    2: dict(kl_mean=4.0, top1=0.2, layer_error=3.0),
}
CONSISTENCY_TOL = 1e-3  # cache vs full and batch vs single, both in float32 activations

def exact_bound(n_layers: int, hidden: int) -> float:
    """Exact-weights parity bound (relative error of logits and of every layer's hidden states): both sides hold
    the same float32 weights, so only float32 rounding separates them, and it grows with depth and width (about
    sqrt(layers * width)). Measured: tiny 3-layer test models 5e-7; SmolLM2-135M (30 layers, 576 wide) 4.7e-6 at
    4 bits (bound 8e-5); a random 7B-shaped model (32 layers, 4096 wide) 1.1e-4 (bound 2.3e-4), its random weights
    amplifying rounding more than trained ones. A RoPE base 1% off gives 3e-5 on the tiny model (bound 1e-5), a
    GELU approximated with tanh 9e-5."""
    return max(1e-5, 5e-6 * math.sqrt(n_layers * hidden / 64))


def weight_bound(bits) -> float:
    """Largest relative (Frobenius) error of a stored tensor against its source tensor. Round-to-nearest affine
    quantization of a Gaussian-like tensor gives about 2**-bits * 1.5 (0.09 at 4 bits); a misplaced tensor gives
    1.0 (zeroed) to 1.4 (another tensor of the same shape). Float casts: bfloat16 rounding is 0.4%."""
    if isinstance(bits, int):
        return min(0.9, 8.0 * 2.0**-bits)
    return 2e-2


# Probes with fewer distinct token ids than this cannot tell positions apart (attention over identical keys ignores
# RoPE): the gate adds a row of ids drawn deterministically from the vocabulary.
MIN_DISTINCT_IDS = 16


@dataclass
class Report:
    precision: str
    thresholds: dict
    prompts: int = 0
    tokens: int = 0
    logits: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    first_divergent_layer: Optional[int] = None
    layer_kinds: list = field(default_factory=list)  # each decoder layer's kind (full, sliding, chunked, recurrent)
    parity: dict = field(default_factory=dict)  # exact-weights parity: logit metrics and per-layer errors
    weights: dict = field(default_factory=dict)  # stored tensors against their source tensors
    probes: dict = field(default_factory=dict)  # how the probes were built
    shadow: dict = field(default_factory=dict)  # long-range parity on the shadow model (convert/shadow.py)
    heldout: dict = field(default_factory=dict)  # quantized outputs: KL and perplexity ratio on held-out text
    seconds: dict = field(default_factory=dict)  # time per part of the gate (logged, not in validation.json)
    backend: dict = field(default_factory=dict)  # the device the MLX checks ran on and its float32 precision
    cache_rel_error: Optional[float] = None
    batch_rel_error: Optional[float] = None
    tokenizer: dict = field(default_factory=dict)
    non_finite: list = field(default_factory=list)
    float16_max_abs: Optional[list] = None  # float16 outputs: largest |activation| per layer, then the logits
    failures: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        """What validation.json holds: everything but the timings, so identical runs write identical bytes."""
        out = {"passed": self.passed, **asdict(self)}
        del out["seconds"]
        return out


def precision_of(config: dict) -> tuple:
    """(name, threshold key) of a converted folder: its quantization bits or its float dtype."""
    quant = config.get("quantization")
    if quant:
        bits = min([quant["bits"]] + [v["bits"] for v in quant.values() if isinstance(v, dict) and "bits" in v])
        mode = quant.get("mode", "affine")
        return f"{mode} {quant['bits']}-bit (min {bits})" if bits != quant["bits"] else f"{mode} {bits}-bit", bits
    dtype = source_dtype(config) or "float32"
    return dtype, dtype


# ---------------------------------------------------------------------------------------------------- metrics


def _log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def logit_metrics(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Metrics over positions (rows) of two (N, vocab) logit matrices."""
    lp, lq = _log_softmax(ref), _log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    diff = np.abs(ours.astype(np.float64) - ref)
    # Top-1 is gated only where the reference is decided (runner-up at least 10 points of probability behind):
    # a near-tie flips under any rounding and says nothing about the conversion.
    top2 = np.sort(np.exp(lp), axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) >= 0.1
    agree = ours.argmax(-1) == ref.argmax(-1)
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-30)
    return dict(
        max_rel_error=float(diff.max() / np.abs(ref).max()),
        mean_rel_error=float(diff.mean() / np.abs(ref).mean()),
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        top1=float(agree.mean()),
        top1_decided=float(agree[decided].mean()) if decided.any() else 1.0,
        decided_positions=int(decided.sum()),
        cosine=float(cos.mean()),
    )


# ---------------------------------------------------------------------------------------------------- probes


def chat_templates(tokenizer) -> dict:
    """The tokenizer's chat templates by name ("default" for the unnamed one; named ones may come without it)."""
    templates = getattr(tokenizer, "chat_template", None) or {}
    return {"default": templates} if isinstance(templates, str) else dict(templates)


def templated(tokenizer, template: str) -> str:
    return tokenizer.apply_chat_template(CHAT, chat_template=template, tokenize=False, add_generation_prompt=True)


def informative(rows: list, vocab_size: int) -> bool:
    """Whether the probe ids can tell positions apart: at least MIN_DISTINCT_IDS distinct ids (or half the
    vocabulary, for tiny vocabularies)."""
    distinct = len({i for r in rows for i in r})
    return distinct >= min(MIN_DISTINCT_IDS, vocab_size // 2)


def drawn_ids(vocab_size: int, n: int = MAX_PROBE_TOKENS) -> list:
    """n ids drawn deterministically from the vocabulary, distinct where the vocabulary allows."""
    rng = np.random.default_rng(20261204)
    return rng.choice(vocab_size, size=n, replace=vocab_size < n).tolist()


def probe_rows(tokenizer, vocab_size: int) -> tuple:
    """Token ids of the fixed prompts plus a chat-templated conversation, and a note when drawn ids were added."""
    texts = list(PROMPTS)
    if "default" in chat_templates(tokenizer):
        texts.append(templated(tokenizer, chat_templates(tokenizer)["default"]))
    rows = [tokenizer(t, add_special_tokens=True)["input_ids"][:MAX_PROBE_TOKENS] for t in texts]
    rows = [[min(i, vocab_size - 1) for i in r] for r in rows if len(r) >= 2]
    note = {"texts": len(rows), "distinct_ids": len({i for r in rows for i in r})}
    if not informative(rows, vocab_size):
        rows.append(drawn_ids(vocab_size))
        note["added"] = (f"the tokenizer gives only {note['distinct_ids']} distinct ids on the probe texts: added "
                         f"{len(rows[-1])} ids drawn from the vocabulary")
    return rows, note


def probe_batch(tokenizer, vocab_size: int):
    """Right-padded ids (B, L) and their mask for the probe rows (see `probe_rows`)."""
    return padded(probe_rows(tokenizer, vocab_size)[0])


def padded(rows: list):
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


FLOAT_CODES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
SCAN_BLOCK = 1 << 23  # elements read and checked at a time by `non_finite_tensors`


def non_finite_tensors(folder) -> list:
    """Names of saved float tensors holding NaN or infinity. Each is read a block at a time into one reused buffer
    and checked by torch's multi-threaded `aminmax`, which gives NaN, or an infinite bound, exactly when a value is
    not finite (MLX's single-threaded isfinite on each tensor read whole took 4.7 s for a 1.1B bf16 model)."""
    import torch

    from .safetensors_file import read_header

    bad, buffer = [], None
    for f in sorted(Path(folder).glob("model*.safetensors")):
        length, header = read_header(f)
        found = []
        with open(f, "rb") as handle:  # in file order: one sequential read
            tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
            for name, entry in sorted(tensors.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if entry["dtype"] not in FLOAT_CODES:
                    continue
                dtype = getattr(torch, FLOAT_CODES[entry["dtype"]])
                buffer = buffer if buffer is not None else bytearray(SCAN_BLOCK * 8)
                start, end = (8 + length + o for o in entry["data_offsets"])
                handle.seek(start)
                for at in range(start, end, SCAN_BLOCK * dtype.itemsize):
                    size = min(end - at, SCAN_BLOCK * dtype.itemsize)
                    view = memoryview(buffer)[:size]
                    handle.readinto(view)
                    low, high = torch.aminmax(torch.frombuffer(view, dtype=dtype))
                    if not bool(torch.isfinite(low) & torch.isfinite(high)):
                        found.append(name)
                        break
        bad += sorted(found)
    return bad


# ---------------------------------------------------------------------------------------------------- tokenizer


def tokenizer_fidelity(source, output) -> dict:
    """Source and output tokenizers must encode identically and keep special tokens and the chat template."""
    from transformers import AutoTokenizer

    src = once(("tokenizer", str(source)), lambda: AutoTokenizer.from_pretrained(source))
    out = AutoTokenizer.from_pretrained(output)
    mismatches = []
    probes = TOKENIZER_PROBES + [t for t in (src.bos_token, src.eos_token) if t]
    for text in probes:
        if src(text)["input_ids"] != out(text)["input_ids"]:
            mismatches.append(f"encodes {text[:30]!r} differently")
    for attr in ("bos_token", "eos_token", "chat_template"):
        if getattr(src, attr, None) != getattr(out, attr, None):
            mismatches.append(f"{attr} differs")
    theirs = chat_templates(out)
    for name, template in chat_templates(src).items():
        if name not in theirs:
            continue  # already reported: chat_template differs
        texts = [templated(src, template), templated(out, theirs[name])]
        if texts[0] != texts[1] or src(texts[0])["input_ids"] != out(texts[1])["input_ids"]:
            mismatches.append(f"chat-templated conversation ({name} template) encodes differently")
    return {"passed": not mismatches, "probes": len(probes), "mismatches": mismatches}, src


# ---------------------------------------------------------------------------------------------------- the gate


def layer_ticker(progress, n_layers: int, desc: str) -> Callable:
    """A callback that advances a `progress(iterable, desc=, unit=)` bar (e.g. tqdm) by one layer per call."""
    if progress is None:
        return lambda *args: None
    bar = iter(progress(range(n_layers), desc=desc, unit="layer"))
    next(bar, None)  # started: shows 0/n; the n-th call finishes and closes the bar
    return lambda *args: next(bar, None)


_shared: Optional[dict] = None  # results of source-only parts, while `sharing()` is on


@contextlib.contextmanager
def sharing():
    """Within this block, gates on several outputs of one source (`--variants`) compute the parts that depend on
    the source alone once: the float original's pass, the shadow model, the held-out text's reference logits."""
    global _shared
    previous, _shared = _shared, {}
    try:
        yield
    finally:
        _shared = previous


def once(key: tuple, compute: Callable):
    """`compute()`, or its earlier result for `key` inside `sharing()`."""
    if _shared is None:
        return compute()
    if key not in _shared:
        _shared[key] = compute()
    return _shared[key]


def side_files_digest(folder) -> str:
    """SHA-256 of a folder's files other than its weights, config, card and report (the tokenizer and templates)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and not name.startswith("model") and name not in ("config.json", "README.md",
                                                                              "validation.json"):
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def digest(*arrays) -> str:
    import hashlib

    return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()


def validate(source, output, progress: Optional[Callable] = None) -> Report:
    """Validate the converted folder `output` against the source checkpoint folder `source`.

    `progress(iterable, desc=..., unit=...)` (e.g. tqdm) shows the layer-by-layer passes of both models. The time
    each part took is in `report.seconds`. The MLX side runs where float32 is true float32 (`backend.py`)."""

    gate = backend.choose()
    with mx.stream(backend.device_of(gate)):
        return _validate(source, output, progress, gate)


def _validate(source, output, progress, gate) -> Report:
    from mlx_arch import load_model

    from . import heldout, layerwise, shadow
    from .reference import CheckpointReader, OutputWeights

    model, config = load_model(output, lazy=True)  # weights are read layer by layer, see layerwise.py
    report = new_report(model, config)
    report.backend = gate.to_dict()
    with stage(report, "tokenizer"):
        tokenizer = check_tokenizer(report, source, output)
    with stage(report, "non-finite weights"):
        report.non_finite = non_finite_tensors(output)
    vocab_size = text_config(config)["vocab_size"]
    rows, report.probes = probe_rows(tokenizer, vocab_size)
    # A quantized output's held-out text rides in the MLX pass beside the probes (one read and dequantization of the
    # weights for both) when both models' logits of it fit the held-out budget; otherwise it gets passes of its own
    # (`heldout.measure`). On the transformers side it is a pass of its own: padding it to the probes' width
    # would cost more than reading the float weights again.
    quantized = bool(config.get("quantization"))
    held_out_rows = heldout.rows(tokenizer, vocab_size) if quantized else []
    batches = heldout.passes(held_out_rows, vocab_size, heldout.LOGITS_BYTES)  # the budget as it is now (tests set it)
    extra = batches[0] if len(batches) == 1 else None  # (ids, mask)
    ids, mask = padded(rows)
    report.prompts, report.tokens = ids.shape[0], int(mask.sum())
    source_reader = CheckpointReader(source)
    held = Compared(OutputWeights(output, source_reader), source_reader)
    n_layers = len(model.layers)
    with stage(report, "transformers, output's weights + weights vs source"):
        # A family whose transformers modules read their children's weights directly says so on its model.
        blocks = getattr(model, "reference_reads_children", False)
        exact = reference_pass(source, held, ids, mask, layer_ticker(progress, n_layers, "validate: transformers"),
                               blocks)
        report.weights = held.fidelity(report.thresholds["weights_rel_error"])
    with stage(report, "transformers, float original"):
        key = ("original", str(source), digest(ids, mask))
        if report.weights["worst_rel_error"] == 0.0:  # the output holds the source's own values: one pass serves
            original = once(key, lambda: exact)  # and serves the other variants too
        else:
            original = once(key, lambda: reference_pass(
                source, source_reader, ids, mask,
                layer_ticker(progress, n_layers, "validate: transformers, float original"), blocks))
        if extra is not None:
            extra_reference = once(("held-out", str(source), digest(*extra)), lambda: reference_pass(
                source, source_reader, *extra, layer_ticker(progress, n_layers, "held-out: transformers"), blocks)[0])
    float16 = source_dtype(config) == "float16"
    with stage(report, "mlx"):
        out = layerwise.run(model, ids, mask, on_layer=layer_ticker(progress, n_layers, "validate: mlx"),
                            low_precision=mx.float16 if float16 else None,
                            extra=None if extra is None else extra[0])
    with stage(report, "shadow long-range"):
        architecture = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
        shadow_report = once(("shadow", str(source), json.dumps(architecture, sort_keys=True, default=str)),
                             lambda: shadow.check_folders(source, output))
    if extra is not None:
        report.heldout = heldout.metrics(out.extra_logits, extra_reference, *extra)
    elif quantized:
        with stage(report, "held-out text"):
            report.heldout = heldout.measure(source, output, tokenizer, progress=progress)

    report.failures += [f"non-finite values in {', '.join(report.non_finite[:5])}"] if report.non_finite else []
    report.layer_kinds = [layer_kind(layer) for layer in model.layers]
    compare_exact(report, mask, out.logits, out.layers, *exact)
    compare_outputs(report, mask, out.logits, out.layers, *original)
    if report.weights["misplaced"]:
        report.failures.append("weights differ from their source tensors beyond quantization: "
                               + ", ".join(f"{k} (rel. error {e:.2g})" for k, e in report.weights["misplaced"][:3]))
    if float16:
        check_float16_range(report, out.low_max_abs)
    report.shadow = shadow_report.to_dict()
    report.failures += shadow_report.failures
    check_consistency(report, out, mask)
    return report


def new_report(model, config) -> Report:
    precision, key = precision_of(config)
    hidden = getattr(model.args, "hidden_size", None) or model.model.embed_tokens.weight.shape[-1]
    return Report(precision=precision, thresholds={**THRESHOLDS[key], "exact": exact_bound(len(model.layers), hidden),
                                                   "weights_rel_error": weight_bound(key)})


@contextlib.contextmanager
def stage(report: Report, name: str):
    """Time one part of the gate into `report.seconds`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        report.seconds[name] = round(time.perf_counter() - start, 3)


def check_tokenizer(report: Report, source, output):
    """The tokenizer check; within `sharing()`, outputs holding the same tokenizer files (--variants) share it."""
    key = ("tokenizer check", str(source), side_files_digest(output))
    report.tokenizer, tokenizer = once(key, lambda: tokenizer_fidelity(source, output))
    report.tokenizer = dict(report.tokenizer, mismatches=list(report.tokenizer["mismatches"]))
    report.failures += [f"tokenizer: {m}" for m in report.tokenizer["mismatches"]]
    return tokenizer


def reference_pass(source, weights, ids, mask, on_layer, blocks: bool = False) -> tuple:
    """(logits, per-layer hidden states) of the streamed transformers reference holding `weights`."""
    from .reference import StreamedForward, build_reference

    reference = StreamedForward(build_reference(source), weights, blocks=blocks)
    reference.on_layer = on_layer
    return reference(ids, mask)


def check_consistency(report: Report, out, mask):
    """Cache decode against a full forward, padded batch against single prompts (both in float32)."""
    from . import layerwise

    report.cache_rel_error = layerwise.cache_rel_error(out)
    report.batch_rel_error = layerwise.batch_rel_error(out, mask)
    for name, err in (("cache decode vs full forward", report.cache_rel_error),
                      ("padded batch vs single", report.batch_rel_error)):
        if not err <= CONSISTENCY_TOL:
            report.failures.append(f"{name}: relative error {err:.2e} > {CONSISTENCY_TOL:.0e}")


class Compared:
    """The output's weights (`OutputWeights`) as the reference reads them, each tensor compared with the source
    tensor of its checkpoint name as it goes by, so the weights are read and dequantized once for both checks."""

    def __init__(self, held, source):
        self.held, self.source, self.errors = held, source, {}

    def __getattr__(self, name):  # everything else a reader answers (keys, rename, aliases, ...) is `held`'s
        return getattr(self.held, name)

    def __contains__(self, key):
        return key in self.held

    def get(self, key, into=None):
        key = self.held.aliases.get(key, key)
        tensor = self.held.get(key, into)
        if key in self.held.held and key not in self.errors and key in self.source:
            self.errors[key] = tensor_error(self.held, key, tensor, self.source.get(key))
        return tensor

    def fidelity(self, bound: float) -> dict:
        """`weight_fidelity` of every tensor the output holds: those the reference never read are read now."""
        return weight_fidelity(self.held, self.source, bound, self.errors)


def tensor_error(held, key: str, ours, ref) -> float:
    """Relative Frobenius error of the output's tensor `ours` (float32) against the source's `ref` (in float32,
    a block of rows at a time: no float32 copy of a large source tensor); a tensor stored with a constant folded
    in (a norm's 1 + w) is judged against the size of what is stored."""
    import torch

    if ours.shape != ref.shape:
        return float("inf")
    if same_bits(ours, ref):  # a float output of its own source: one fast compare
        return 0.0
    offset = sum(rule.stored_offset(key) for rule in getattr(held, "rules", ()) if hasattr(rule, "stored_offset"))
    rows = ref.shape[0] if ref.ndim else 1
    ours, ref = ours.reshape(rows, -1), ref.reshape(rows, -1)
    step = max(1, ERROR_BLOCK // max(ref.shape[1], 1))
    # Two reused float32 blocks (fresh memory for every block cost more than the arithmetic).
    if not _SCRATCH or _SCRATCH[0].numel() < step * ref.shape[1]:
        _SCRATCH[:] = [torch.empty(max(ERROR_BLOCK, step * ref.shape[1]), dtype=torch.float32) for _ in range(2)]
    error = size = 0.0
    for start in range(0, ref.shape[0], step):
        part = ref[start:start + step]
        block = _SCRATCH[0][: part.numel()].view(part.shape).copy_(part)
        difference = torch.sub(ours[start:start + step], block, out=_SCRATCH[1][: part.numel()].view(part.shape))
        error += float(torch.linalg.vector_norm(difference)) ** 2
        size += float(torch.linalg.vector_norm(block.add_(offset) if offset else block)) ** 2
    return math.sqrt(error) / max(math.sqrt(size), 1e-30)


def same_bits(a, b) -> bool:
    """Whether two tensors hold the same bytes (compared as int64 where the size allows: 5x faster than comparing
    bf16 values)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape or not (a.is_contiguous() and b.is_contiguous()):
        return False
    a, b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    if a.numel() % 8 == 0:
        a, b = a.view(torch.int64), b.view(torch.int64)
    return torch.equal(a, b)


ERROR_BLOCK = 1 << 22  # elements of a source tensor made float32 at a time by `tensor_error`
_SCRATCH: list = []  # two float32 blocks of at least ERROR_BLOCK elements, made once


def weight_fidelity(held, source, bound: float, errors: Optional[dict] = None) -> dict:
    """Each tensor the output holds, mapped back to its checkpoint name, against the source tensor of that name:
    relative Frobenius error, worst first. A tensor past `bound` was misplaced, zeroed or corrupted. `errors`:
    those already measured."""
    errors = dict(errors or {})
    for key in sorted(held.held - errors.keys()):
        if key in source:
            errors[key] = tensor_error(held, key, held.get(key), source.get(key))
    worst = max(errors.items(), key=lambda kv: kv[1], default=(None, 0.0))
    misplaced = sorted(((k, e) for k, e in errors.items() if not e <= bound), key=lambda kv: -kv[1])
    return {"tensors": len(errors), "worst": worst[0], "worst_rel_error": worst[1], "bound": bound,
            "misplaced": misplaced}


def layer_kind(layer) -> str:
    kind = getattr(layer, "kind", None)
    return getattr(kind, "name", "full")


def named_layer(report, i: int) -> str:
    """`3 (recurrent)`: a layer index with its kind, for failure messages."""
    return f"{i} ({report.layer_kinds[i]})" if i < len(report.layer_kinds) else str(i)


def compare_exact(report, mask, logits, layers, exact_logits, exact_layers):
    """The proof: our model against the reference holding the same weights, at float32 bounds."""
    real = mask.astype(bool)
    if not np.isfinite(logits[real]).all():
        return  # reported by compare_outputs
    metrics = logit_metrics(logits[real], exact_logits[real])
    errors = [rel_error(ours[real], ref[real]) for ours, ref in zip(layers, exact_layers)]
    report.parity = {**metrics, "layers": errors}
    bound = report.thresholds["exact"]
    first = next((i for i, e in enumerate(errors) if not e <= bound), None)
    if first is not None or not metrics["max_rel_error"] <= bound:
        report.first_divergent_layer = first
        where = (f"; first diverging layer: {named_layer(report, first)}, relative error {errors[first]:.1e}"
                 if first is not None else "")
        report.failures.append(f"exact-weights parity: logits relative error {metrics['max_rel_error']:.2e} "
                               f"(bound {bound:.1e}) against transformers holding the same weights{where}: the "
                               "conversion computes another function")


def check_float16_range(report, max_abs: list):
    """Fail when float16 activations overflow (to infinity or NaN), naming the first layer where they do."""
    report.float16_max_abs = max_abs
    over = next((i for i, x in enumerate(max_abs) if not np.isfinite(x)), None)
    if over is not None:
        where = "the logits" if over == len(max_abs) - 1 else f"layer {over}"
        report.failures.append(f"float16 activations overflow at {where} (float16 ends at 65504): convert with "
                               "--dtype bfloat16 instead")


def compare_outputs(report, mask, logits, layers, ref_logits, ref_layers):
    """Fill the logit metrics and the per-layer report; record failures against the thresholds."""
    real = mask.astype(bool)
    if not np.isfinite(logits[real]).all():
        report.failures.append("non-finite logits")
        return
    report.logits = logit_metrics(logits[real], ref_logits[real])
    t = report.thresholds
    first = None
    for i, (ours, ref) in enumerate(zip(layers, ref_layers)):
        err = rel_error(ours[real], ref[real])
        report.layers.append({"layer": i, "kind": report.layer_kinds[i] if i < len(report.layer_kinds) else "full",
                              "rel_error": err})
        if first is None and not err <= t["layer_error"]:
            first = i
    m = report.logits
    bounds = {"kl_mean": m["kl_mean"] <= t["kl_mean"], "top1_decided": m["top1_decided"] >= t["top1"]}
    broken = [f"{name} {m[name]:.3g} (bound {t[name.replace('_decided', '')]})"
              for name, ok in bounds.items() if not ok]
    if broken:
        if report.first_divergent_layer is None:
            report.first_divergent_layer = first
        where = first
        report.failures.append("logits differ from the float original (quantization cost): " + ", ".join(broken)
                               + (f"; first diverging layer: {named_layer(report, where)}" if where is not None else ""))


def write_report(report: Report, folder) -> Path:
    path = Path(folder) / "validation.json"
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return path


def summary_table(report: Report) -> str:
    """A Markdown table of the main numbers, for the terminal and the model card: the proof (exact-weights parity,
    weights against their sources, shadow long-range parity), consistency, then the quantization cost."""
    rows = [
        ("result", "passed" if report.passed else "FAILED: " + "; ".join(report.failures)),
        ("precision", report.precision),
    ]
    if report.backend:
        b = report.backend
        blas = f", BLAS: {b['blas']}" if b.get("blas") else ""
        rows.append(("MLX checks ran on", f"{b['device']} (float32 product error {b['precision']:.0e}{blas})"
                     + (f"; {b['note']}" if b["note"] else "")))
    p = report.parity
    if p:
        worst = max(range(len(p["layers"])), key=lambda i: p["layers"][i]) if p["layers"] else None
        layer = f", worst layer {named_layer(report, worst)}: {p['layers'][worst]:.1e}" if worst is not None else ""
        rows.append(("exact-weights parity (transformers holding the output's weights)",
                     f"max relative logit error {p['max_rel_error']:.1e}{layer}"))
    w = report.weights
    if w:
        rows.append(("stored tensors vs source tensors", f"{w['tensors']} tensors, worst relative error "
                     f"{w['worst_rel_error']:.2g} (bound {w['bound']:.2g})"))
    s = report.shadow
    if s.get("skipped"):
        rows.append(("shadow long-range parity", f"not run: {s['skipped']}"))
    elif s:
        what = ", ".join(f"{k} {v}" for k, v in s["boundaries"].items()) or "no window or scaled context"
        rows.append(("shadow long-range parity", f"{s['length']} tokens ({what}{'; capped' if s['capped'] else ''}): "
                     f"full {s['full_rel_error']:.1e}, cached decode {s['cached_rel_error']:.1e}"))
    probes = f"{report.prompts} / {report.tokens}"
    if report.probes.get("added"):
        probes += f" ({report.probes['added']})"
    rows.append(("probe prompts / tokens", probes))
    if report.cache_rel_error is not None:
        rows.append(("cache decode vs full forward", f"{report.cache_rel_error:.2e}"))
        rows.append(("padded batch vs single", f"{report.batch_rel_error:.2e}"))
    if report.float16_max_abs:
        rows.append(("largest float16 activation (limit 65504)", f"{max(report.float16_max_abs):.3g}"))
    rows.append(("tokenizer", "identical" if report.tokenizer.get("passed") else "DIFFERS"))
    m = report.logits
    if m:
        rows += [
            ("quantization cost vs the float original: KL (mean / max)", f"{m['kl_mean']:.3g} / {m['kl_max']:.3g}"),
            ("quantization cost: top-1 agreement (all / decided positions)",
             f"{m['top1']:.1%} / {m['top1_decided']:.1%}"),
            ("quantization cost: cosine similarity", f"{m['cosine']:.6f}"),
        ]
    if report.layers:
        worst = max(report.layers, key=lambda r: r["rel_error"])
        rows.append(("quantization cost: worst layer (hidden-state rel. error)",
                     f"{named_layer(report, worst['layer'])}: {worst['rel_error']:.2e}"))
    from .heldout import summary_rows

    rows += summary_rows(report.heldout)
    lines = ["| check | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)
