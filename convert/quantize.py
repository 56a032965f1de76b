"""Model assembly, cast and quantization. Arrays stay lazy here: the work happens when save evaluates a shard
(calibrated methods excepted: they compute each layer's quantized weights as they go, see calibrate.py)."""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

import mlx_arch
from mlx_arch.core import quant
from mlx_arch.core.base import source_dtype

from .errors import ConvertError
from .plan import RECIPES, ConvertPlan



@dataclass
class QuantReport:
    config: Optional[dict] = None  # the "quantization" entry of config.json
    skipped: list = field(default_factory=list)  # quantizable layers kept in full precision, with the reason
    excluded: list = field(default_factory=list)  # layers the model keeps in full precision (routers, gates)
    method: str = ""  # how the codes were chosen: rtn, search or gptq
    method_description: str = ""  # the same, with the calibration text, for the model card
    calibration: Optional[object] = None  # calibrate.CalibrationReport for the gptq and search methods
    allocation: Optional[object] = None  # allocate.Allocation for --target-bpw
    rounded: dict = field(default_factory=dict)  # {path: affine.Rounding}: layers save rounds in torch


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


def layer_bits(model, path: str, recipe: Optional[str], bits: int) -> int:
    """Bits for one layer under a mixed recipe: the embeddings and the head get more, and so do the projections the
    model calls sensitive (`model.sensitive(path)`) in the first and last eighth of the layers and every third
    layer between."""
    if not recipe:
        return bits
    low, high = RECIPES[recipe]
    if model.is_vocab(path):
        return high
    if model.sensitive(path):
        n_layers = len(model.layers)
        i, edge = model.layer_index(path), max(1, n_layers // 8)
        if i < edge or i >= n_layers - edge or (i - edge) % 3 == 2:
            return high
    return low


def layer_settings(model, plan: ConvertPlan) -> tuple:
    """What `quantize` will do, from module shapes alone: ({path: {group_size, bits, mode}}, {path: why not}).

    A model's optional `quant_predicate(path, module)` may exclude a layer (False) or give it its own settings
    (a dict merged over the plan's)."""
    hook = getattr(model, "quant_predicate", None)
    settings, skipped = {}, {}
    for path, module in model.named_modules():
        if not path or not hasattr(module, "to_quantized"):
            continue
        verdict = hook(path, module) if hook is not None else True
        if not verdict:
            continue
        params = {"group_size": plan.q_group_size,
                  "bits": layer_bits(model, path, plan.quant_recipe, plan.q_bits), "mode": plan.q_mode}
        if isinstance(verdict, dict):
            params.update(verdict)
        width = module.weight.shape[-1]
        if width % params["group_size"]:
            skipped[path] = f"input size {width} is not a multiple of group size {params['group_size']}"
            continue
        settings[path] = params
    return settings, skipped


def excluded_layers(model) -> list:
    """Quantizable layers the model's `quant_predicate` keeps in full precision (routers, gates): recorded as False
    per layer in config.json, so every reader sees the same thing."""
    hook = getattr(model, "quant_predicate", None)
    if hook is None:
        return []
    return [path for path, module in model.named_modules()
            if path and hasattr(module, "to_quantized") and not hook(path, module)]


def check_applicable(config: dict, plan: ConvertPlan):
    """Refuse, from the config alone (before any weight is fetched), a quantization that would leave every
    layer in full precision."""
    if not plan.quantize:
        return
    settings, skipped = layer_settings(mlx_arch.build_model(config), plan)  # parameters stay lazy: no memory
    if not settings:
        detail = "".join(f": {path} has {why}" for path, why in list(skipped.items())[:1])
        raise ConvertError(f"no layer can be quantized with group size {plan.q_group_size}{detail}; choose "
                           "another --q-group-size")


def quantize(model, plan: ConvertPlan, tokenizer_folder=None, log=None, scratch=None, progress=None) -> QuantReport:
    """Quantize `model` in place as `plan` says. The gptq and search methods calibrate the affine layers they
    handle (convert/calibrate.py) on text tokenized by the tokenizer in `tokenizer_folder`, writing each layer's
    result to the folder `scratch` (when given) to be read again lazily by save; the rest (block formats, layers
    calibration does not handle) is rounded to nearest by `nn.quantize`. `progress(iterable, desc=, unit=)` shows
    calibration layer by layer."""
    settings, skipped = layer_settings(model, plan)
    excluded = excluded_layers(model)
    log = log or (lambda message: None)
    calibration, allocation = None, None
    method = quantization_method(model, plan, settings, tokenizer_folder, log)
    affine = {path: params for path, params in settings.items() if params["mode"] == "affine"}
    default = {"group_size": plan.q_group_size, "bits": plan.q_bits, "mode": plan.q_mode}
    if plan.target_bpw and affine:
        from . import allocate

        batches = calibration_batches(model, plan, affine, tokenizer_folder, "--target-bpw")
        allocation = allocate.allocate(model, affine, plan.target_bpw, batches, target_dtype_of(model, affine), log,
                                       method)
        for path, bits in allocation.bits.items():
            settings[path] = affine[path] = {**affine[path], "bits": bits}
        widths = [params["bits"] for params in affine.values()]
        default["bits"] = max(set(widths), key=widths.count)  # the config's default: the commonest width
    if method != "rtn" and affine:
        calibration = calibrated(model, plan, method, affine, tokenizer_folder, scratch, progress)
        log(f"quantization: {calibration.summary()}")
    modules = dict(model.named_modules())
    rounded = round_to_nearest(model, {path: params for path, params in settings.items()
                                       if hasattr(modules[path], "to_quantized")})
    # mlx-lm reads per-layer entries: a dict where a layer differs from the default, False where it stays float.
    overrides = {path: params for path, params in settings.items() if params != default}
    overrides.update({path: False for path in [*excluded, *skipped]})
    leftovers = float_leftovers(model)
    kept = [f"{p} ({why})" for p, why in skipped.items()]
    if leftovers:
        kept.append(f"{sum(leftovers.values())} parameters outside linear, embedding and norm layers ("
                    + ", ".join(f"{name} x{n}" for name, n in sorted(leftovers.items()))
                    + "): state-space and convolution parameters, sinks and scalars, which MLX does not quantize")
    return QuantReport(config={**default, **overrides}, skipped=kept, rounded=rounded,
                       excluded=excluded, method=method, calibration=calibration, allocation=allocation,
                       method_description=plan.describe_method(method) + (f"; {allocation.summary()}"
                                                                          if allocation else ""))


_STREAMS: list = []


def quantize_streams() -> list:
    """Where `round_to_nearest` quantizes: on the CPU one new stream per core (up to 8), created once; on a GPU
    its default stream."""
    if mx.default_device() != mx.cpu:
        return [mx.default_stream(mx.default_device())]
    if not _STREAMS:
        _STREAMS.extend(mx.new_stream(mx.cpu) for _ in range(min(8, os.cpu_count() or 1)))
    return _STREAMS


def round_to_nearest(model, settings: dict) -> dict:
    """`nn.quantize` of the modules in `settings` ({path: quantization parameters}), lazily, spread over
    `quantize_streams()` (MLX's CPU quantize kernel uses one thread; the streams run side by side): linear and
    embedding layers in row blocks, one per stream (rows quantize independently), other quantizable modules dealt
    over the streams whole. Save computes the next layers while it writes one (`save.Lookahead`). On the CPU, where
    torch is imported anyway, linear and embedding layers in the affine format are rounded in torch instead (the
    same bytes, several times faster): returns {path: affine.Rounding} for them, which `convert_weights` puts in the
    weights dict. The bytes are those of one `mx.quantize` on one stream (tested)."""
    from . import affine

    streams, paths = quantize_streams(), sorted(settings)
    modules = dict(model.named_modules())
    sources = {path: modules[path].weight for path in paths}
    for k, stream in enumerate(streams):
        mine = set(paths[k :: len(streams)])
        with mx.stream(stream):
            nn.quantize(model, class_predicate=lambda path, module: settings[path] if path in mine else False)
    jobs = {}
    for path, module in model.named_modules():
        source = sources.get(path)
        if type(module) not in (nn.QuantizedLinear, nn.QuantizedEmbedding) or source is None:
            continue
        params = settings[path]
        if len(streams) > 1:
            split_rows(module, source, params, streams)
        if mx.default_device() == mx.cpu and affine.applies(source, params):  # MLX's arrays: where torch is not
            jobs[path] = affine.Rounding(source, params["bits"], params["group_size"],
                                         (module.weight, module.scales, module.biases))
    return jobs


def split_rows(module, source, params: dict, streams: list):
    """A quantized linear or embedding layer's arrays computed in row blocks, one per stream."""
    step = -(-source.shape[0] // len(streams))
    parts = []
    for start, stream in zip(range(0, source.shape[0], step), streams):
        with mx.stream(stream):
            parts.append(mx.quantize(source[start : start + step], params["group_size"], params["bits"],
                                     mode=params["mode"]))
    names = ["weight", "scales", "biases"][: len(parts[0])]
    with mx.stream(streams[-1]):  # not the default stream, where the source reads queue (`save.Lookahead`)
        module.update({name: mx.concatenate([part[k] for part in parts]) for k, name in enumerate(names)})


def float_leftovers(model) -> dict:
    """{name: count} of the arrays held by modules other than linear, embedding and norm layers (a Mamba mixer's
    A_log, D and dt_bias, convolution weights, attention sinks, layer scalars): MLX quantizes none of them, so they
    stay in the float dtype; the report names them."""
    counts = {}
    for _, module in model.named_modules():
        kind = type(module).__name__
        if (isinstance(module, (nn.Linear, nn.Embedding)) or hasattr(module, "to_quantized") or "Quantized" in kind
                or "Norm" in kind):
            continue
        for name, value in module.items():
            if isinstance(value, mx.array):
                label = f"{kind}.{name}" if isinstance(module, (nn.Conv1d, nn.Conv2d)) else name
                counts[label] = counts.get(label, 0) + 1
    return counts


def quantization_method(model, plan: ConvertPlan, settings: dict, tokenizer_folder, log) -> str:
    """The plan's method; by default round to nearest where calibration cannot run: without a tokenizer for the
    calibration text, or for models with quantized layers that calibration does not handle (calibrate.handles:
    linear layers, embeddings and stacked experts, each expert on the tokens routed to it, are handled)."""
    from .calibrate import handles
    from .checks import TOKENIZER_FILES

    if plan.q_method is not None or plan.method == "rtn":
        return plan.method
    modules = dict(model.named_modules())
    whole = [path for path in settings if not handles(modules[path])]
    why = None
    if tokenizer_folder is None or not any((Path(tokenizer_folder) / f).is_file() for f in TOKENIZER_FILES):
        why = "the source has no tokenizer to read the calibration text with"
    elif whole:
        why = (f"it does not calibrate layers such as {whole[0]} ({type(modules[whole[0]]).__name__}); "
               f"--q-method {plan.method} calibrates the other layers anyway")
    if why:
        log(f"quantization: round to nearest (rtn), the default for this model: no {plan.method} because {why}")
        return "rtn"
    return plan.method


def calibrated(model, plan: ConvertPlan, method: str, settings: dict, tokenizer_folder, scratch=None, progress=None):
    """Quantize the layers in `settings` with a calibrated method; returns the CalibrationReport."""
    from . import calibrate

    batches = calibration_batches(model, plan, settings, tokenizer_folder, f"--q-method {method}")
    return calibrate.LayerwiseQuantizer(model, settings, method, scratch, progress).run(batches)


def calibration_batches(model, plan: ConvertPlan, settings: dict, tokenizer_folder, option: str) -> list:
    """The calibration text's token batches for the layers in `settings` (`option` names what needs them)."""
    from transformers import AutoTokenizer

    from . import calibrate

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    except (OSError, ValueError, TypeError) as e:
        raise ConvertError(f"{option} needs the model's tokenizer to read its calibration text, and "
                           f"{tokenizer_folder} has none that loads ({str(e).splitlines()[0][:120]}); add the "
                           "tokenizer files or use --q-method rtn") from None
    widest = max(m.weight.shape[-1] for path, m in model.named_modules() if path in settings)
    return calibrate.Calibration.of(plan.calibration_file).batches(tokenizer, model.args.vocab_size, widest)


def target_dtype_of(model, settings: dict) -> str:
    """The float dtype the quantized layers' scales and biases are stored in (their weights' dtype)."""
    modules = dict(model.named_modules())
    return str(modules[next(iter(settings))].weight.dtype).rpartition(".")[2]


def source_quantization(model) -> QuantReport:
    """The `quantization` entry for layers that arrive quantized from the source (a transformers checkpoint's MXFP4
    experts, an MLX-quantized folder) and are kept as they are."""
    settings = {path: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
                for path, m in model.named_modules() if quant.is_quantized(m)}
    if not settings:
        return QuantReport()
    default = next(iter(settings.values()))
    return QuantReport(config={**default, **{path: s for path, s in settings.items() if s != default}})


def dequantized(module):
    """The float32 module that a quantized module computes (pairs registered in mlx_arch.core.quant)."""
    return quant.to_float(module)


def dequantize(model, dtype: str):
    """Replace quantized modules by float modules computing the same function."""
    swaps = [(path, dequantized(m)) for path, m in model.named_modules() if quant.is_quantized(m)]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    cast(model, dtype)


def parameter_count(model) -> int:
    """Number of weights the model represents (packed quantized weights counted unpacked)."""
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, m in model.named_modules():
        if quant.is_quantized(m):
            packed = m.weight.size + m.scales.size + (m.biases.size if m.get("biases") is not None else 0)
            total += m.weight.size * 32 // m.bits - packed
    return total
