"""Long-range checks on a shadow model: the release's own config with only widths, vocabulary and (where the layer
pattern allows) depth shrunk, random weights, converted by the same code path and compared with transformers on a
sequence longer than every window, chunk and original context that the config names.

The gate's probes are short (at most 48 tokens), so a sliding window, chunked attention, RoPE scaling that acts past
the original context or a rotating cache that wraps is never exercised by them. The shadow model runs those lengths
cheaply (a few hundred thousand parameters), full forward and cached decode, with single-token steps across every
boundary and multi-token chunks after the rotating caches have wrapped.

Both sides are built from configs shrunk by the same function: transformers from the source's config, our model from
the output's config.json, so a config value that the conversion changed (a window halved, a RoPE scaling dropped)
shows up as a divergence here.
"""

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

HEADS = 2  # query heads of the shadow model (one KV head under GQA); head_dim stays the release's (RoPE frequencies)
WIDTH = 128  # MLP width
VOCAB = 512
MAX_LAYERS = 8
LONG_CAP = 8192 + 64  # longest shadow sequence (tokens): past an 8k original context (Llama 3), ~15 s on 2 CPU cores
MIN_LENGTH = 64
TOLERANCE = 1e-3  # float32 on both sides, a few thousand positions
_KEEP = ("quantization", "quantization_config")  # output-only keys that do not describe the architecture


@dataclass
class ShadowReport:
    length: int = 0
    boundaries: dict = field(default_factory=dict)  # what each checked length is (window, chunk, original context)
    capped: bool = False
    layers: int = 0
    full_rel_error: Optional[float] = None
    cached_rel_error: Optional[float] = None
    skipped: Optional[str] = None
    failures: list = field(default_factory=list)

    def to_dict(self):
        return asdict(self)


def _key(config_class, name: str) -> str:
    """The config key transformers stores a standard attribute under (GPT-2's `n_embd` for `hidden_size`)."""
    return getattr(config_class, "attribute_map", {}).get(name, name)


def layer_selection(layer_types: Optional[list], n: int) -> list:
    """Indices of the layers the shadow keeps: one period of a periodic pattern (at least two layers), else the
    first layer of each kind, at most MAX_LAYERS."""
    if not layer_types:
        return list(range(min(n, 2)))
    for p in range(1, min(n, MAX_LAYERS) + 1):
        if all(layer_types[i] == layer_types[i % p] for i in range(n)):
            return list(range(min(n, max(p, 2))))
    first = {}
    for i, t in enumerate(layer_types[:n]):
        first.setdefault(t, i)
    return sorted(set(first.values()) | {0, 1})[:MAX_LAYERS]


def shrink(config: dict, config_class, widths: bool = True) -> dict:
    """The config with widths (unless `widths` is False), vocabulary and depth shrunk; every other key kept.
    Per-layer lists follow the kept layers."""
    config = {k: v for k, v in config.items() if k not in _KEEP + derived_keys(config)}
    key = lambda name: _key(config_class, name)  # noqa: E731
    heads, hidden = config.get(key("num_attention_heads")), config.get(key("hidden_size"))
    types = config.get(key("layer_types"))
    # some configs only list the layers; some classes derive the count from other keys
    n = config.get(key("num_hidden_layers")) or len(types or ()) or derived_layers(config, config_class)
    if not (heads and hidden and n):
        raise ValueError("config has no hidden_size / num_attention_heads / num_hidden_layers")
    if widths:
        shrink_widths(config, key, heads, hidden)
    shrink_experts(config)
    config[key("vocab_size")] = VOCAB
    for token in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(config.get(token), int) and config[token] >= VOCAB:
            config[token] = None
    keep = layer_selection(types, n)
    for name, value in list(config.items()):
        if isinstance(value, list) and len(value) == n:
            config[name] = [value[i] for i in keep]
    config[key("num_hidden_layers")] = len(keep)
    return config


def derived_keys(config: dict) -> tuple:
    """Keys that the config class derives from others but reads back as stored when present (Zamba2's attention
    width): the family lists them in `Model.derived_config_keys`; dropped so that they follow the shrunk model."""
    import mlx_arch

    try:
        return tuple(getattr(mlx_arch.architecture(config).Model, "derived_config_keys", ()))
    except mlx_arch.UnsupportedArchitecture:
        return ()


def derived_layers(config: dict, config_class) -> int:
    """`num_hidden_layers` where the config class computes it rather than storing it (LongCat-Flash's is twice its
    `num_layers`; setting it sets them, as `shrink` does); 0 elsewhere."""
    if isinstance(getattr(config_class, "num_hidden_layers", None), property):
        return config_class.from_dict(config).num_hidden_layers
    return 0


def shrink_widths(config: dict, key, heads: int, hidden: int):
    """HEADS attention heads of the same head size, MLP widths WIDTH."""
    head_dim = config.get("head_dim") or hidden // heads
    kv_key = key("num_key_value_heads")
    if config.get(kv_key):
        config[kv_key] = HEADS if config[kv_key] == heads else (1 if config[kv_key] == 1 else HEADS // 2)
    config[key("num_attention_heads")] = HEADS
    config[key("hidden_size")] = HEADS * head_dim
    for width in ("intermediate_size", "n_inner", "ffn_hidden_size", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "expert_ffn_hidden_size"):
        if config.get(width):
            config[width] = WIDTH


EXPERTS = 8  # experts per MoE layer in the shadow (top-k and groups shrunk to fit)
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")
_TOP_K = ("num_experts_per_tok", "top_k", "moe_topk")


def shrink_experts(config: dict):
    """At most EXPERTS experts, top-k below that (a wrong router must still show), one expert group."""
    for key in _EXPERT_COUNTS:
        if isinstance(config.get(key), int) and config[key] > EXPERTS:
            config[key] = EXPERTS
    experts = min([config[k] for k in _EXPERT_COUNTS if isinstance(config.get(k), int)] or [EXPERTS])
    for key in _TOP_K:
        if isinstance(config.get(key), int) and config[key] >= experts:
            config[key] = max(1, experts // 4)
    for key in ("n_group", "topk_group"):
        if isinstance(config.get(key), int) and config[key] > 1:
            config[key] = 1


def randomize(model, seed: int = 0):
    """Weights large enough that a bug moves the logits (transformers' std 0.02 gives near-zero logits): matrices
    ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms 1 + N(0, 0.1), biases and offset norms N(0, 0.1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            if id(p) in embeddings:
                p.copy_(noise)
            elif p.ndim >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            elif bool((p == 1).all()):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def boundaries(ours) -> dict:
    """The lengths past which the output's model behaves differently: windows and chunks of its layers, the
    original context of its RoPE scaling, and the trained length for dynamic scaling."""
    args = ours.args
    found = {}
    for kind in {layer.kind for layer in ours.layers}:
        if kind.window:
            found[f"{kind.name} window"] = kind.window
    rope = getattr(args, "rope_scaling", None) or {}
    if rope.get("original_max_position_embeddings"):
        found["original context"] = rope["original_max_position_embeddings"]
    if rope.get("rope_type") == "dynamic" and getattr(args, "max_position_embeddings", None):
        found["trained context"] = args.max_position_embeddings
    return found


def decode_chunks(length: int, marks: list) -> list:
    """(start, end) chunks covering the sequence: single tokens within two of each boundary, multi-token chunks
    elsewhere (so a rotating cache also takes multi-token updates after it has wrapped)."""
    singles = {p for b in marks for p in range(b - 2, b + 3) if 0 < p < length}
    chunks, start = [], 0
    for p in range(1, length + 1):
        if p == length or p in singles or (p - 1) in singles:
            if p > start:
                chunks.append((start, p))
                start = p
    return chunks


def reference_logits(reference, ids, chunks) -> tuple:
    """transformers' logits for the whole sequence in one pass, and through its own cache over the same chunks: a
    cached decode is compared with transformers' cached decode, since some position encodings legitimately differ
    between the two (LongRoPE picks its factors per call, from the length seen so far)."""
    import torch

    import inspect

    # transformers 5.25 renamed `past_key_values` to `cache`
    name = "cache" if "cache" in inspect.signature(reference.forward).parameters else "past_key_values"
    with torch.no_grad():
        full = reference(input_ids=torch.as_tensor(ids), use_cache=False).logits.float().numpy()
        cache, steps = None, []
        try:
            for a, b in chunks:
                out = reference(input_ids=torch.as_tensor(ids[:, a:b]), use_cache=True, **{name: cache})
                cache = out[name]
                steps.append(out.logits.float().numpy())
        except (RuntimeError, ValueError):  # transformers' own cached decode fails for some hybrids (minimax with a
            return full, None  # window; recurrent_gemma, whose cache has no attention layer where its mask looks)
    return full, np.concatenate(steps, axis=1)


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check(source_config: dict, output_config: dict) -> ShadowReport:
    """Build, convert and compare the shadow model; the report says what was checked and what diverged."""
    import mlx.core as mx
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .quantize import build_model

    report = ShadowReport()
    model_type = source_config["model_type"]
    config_class = CONFIG_MAPPING[model_type]
    from huggingface_hub.errors import StrictDataclassError

    try:
        theirs = config_class.from_dict(shrink(source_config, config_class))
        widths = True
    except StrictDataclassError:  # the widths depend on each other in ways shrinking breaks (state-space heads)
        theirs, widths = config_class.from_dict(shrink(source_config, config_class, widths=False)), False
    ours_config = shrink(output_config, config_class, widths)
    report.layers = theirs.num_hidden_layers

    from transformers.utils import logging

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(theirs, dtype=torch.float32).eval()
    randomize(reference)
    with tempfile.TemporaryDirectory() as tmp:
        shown = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()
        try:
            reference.save_pretrained(tmp)  # the checkpoint layout, as a release stores it
        finally:
            if shown:
                logging.enable_progress_bar()
        weights = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            weights.update(mx.load(str(f)))
        ours = build_model(ours_config, weights)
        mx.eval(ours.parameters())

    report.boundaries = boundaries(ours)
    needed = max([MIN_LENGTH] + [b + 16 for b in report.boundaries.values()])
    cap = LONG_CAP
    if not getattr(ours.args, "rope_scaling", None) or "trained context" not in report.boundaries:
        positions = getattr(reference.config, "max_position_embeddings", None)
        cap = min(cap, positions) if positions else cap
    report.length, report.capped = min(needed, cap), needed > cap

    ids = np.random.default_rng(1).integers(0, VOCAB, size=(1, report.length))
    chunks = decode_chunks(report.length, sorted(report.boundaries.values()))
    expected_full, expected_cached = reference_logits(reference, ids, chunks)
    report.full_rel_error = rel_error(np.array(ours(mx.array(ids)).astype(mx.float32)), expected_full)

    cache = ours.make_cache()
    steps = []
    for a, b in chunks:
        out = ours(mx.array(ids[:, a:b]), cache=cache)
        mx.eval(out)
        steps.append(np.array(out.astype(mx.float32)))
    # Against transformers' cached decode, or its full forward where its own cached decode fails or drifts from it
    # (minimax, bamba on random weights): either is a faithful statement of the function.
    cached = np.concatenate(steps, axis=1)
    report.cached_rel_error = min(rel_error(cached, ref) for ref in (expected_cached, expected_full) if ref is not None)

    what = ", ".join(f"{name} {n}" for name, n in report.boundaries.items()) or "no window or scaled context"
    for name, err in (("full forward", report.full_rel_error), ("cached decode", report.cached_rel_error)):
        if not err <= TOLERANCE:
            report.failures.append(f"shadow long-range parity: {name} relative error {err:.2e} (bound "
                                   f"{TOLERANCE:.0e}) over {report.length} tokens ({what})")
    return report


def check_folders(source, output) -> ShadowReport:
    """`check` on a source checkpoint folder and a converted folder; a shadow that cannot be built is reported as
    skipped with the reason (the exact-weights parity still stands)."""
    from mlx_arch.core.base import text_config
    from transformers import PreTrainedConfig

    # As transformers reads config.json: infinities stored as {"__float__": "Infinity"} become floats.
    source_config = PreTrainedConfig._dict_from_json_file(Path(source) / "config.json")
    source_config = text_config(source_config)  # a multimodal container's text model (as its output config is)
    output_config = PreTrainedConfig._dict_from_json_file(Path(output) / "config.json")
    from huggingface_hub.errors import StrictDataclassError  # a config class refusing the shrunk config

    try:
        return check(source_config, output_config)
    except (ValueError, KeyError, TypeError, NotImplementedError, StrictDataclassError) as e:
        return ShadowReport(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
