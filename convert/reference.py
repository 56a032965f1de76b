"""The transformers reference, run with bounded memory: built on the meta device, each module's weights loaded
from the checkpoint just before it runs and released right after, so that a model larger than memory can still be
compared layer by layer."""

import contextlib
import copy
import functools
import json
import math
import re
from pathlib import Path
from typing import Optional

import torch

from . import affine


@contextlib.contextmanager
def parameters_on_meta():
    """Create module parameters on the meta device (buffers such as rotary tables stay real)."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and not param.is_meta:  # an already-meta parameter is a tied one: keep sharing it
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


class TensorSource:
    """Tensors by checkpoint name, read one at a time; also answers to the names transformers gives checkpoint
    keys on load (`rename`)."""

    aliases: dict

    def keys(self):
        raise NotImplementedError

    def _get(self, key, into=None) -> torch.Tensor:
        raise NotImplementedError

    def rename(self, renames):
        """Answer to transformers' load-time names too (e.g. `embed_out.` -> `lm_head.`); `renames` are (regex,
        replacement) pairs."""
        keys = set(self.keys())
        for key in keys:
            new = key
            for pattern, replacement in renames:
                new = re.sub(pattern, replacement, new)
            if new != key and new not in keys:
                self.aliases[new] = key

    def __contains__(self, key):
        return key in self.aliases or key in self.keys()

    def get(self, key, into=None) -> torch.Tensor:
        """The tensor of `key`. `into(shape)` hands out reusable float32 storage, for a reader that computes a
        float32 tensor (a dequantized weight) to fill instead of fresh memory."""
        return self._get(self.aliases.get(key, key), into)


class CheckpointReader(TensorSource):
    """Tensors of a checkpoint folder by name, read one at a time (safetensors) or per file (.bin)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.files = {}
        index = next(iter(self.folder.glob("*.index.json")), None)
        if index is not None:
            for key, file in json.loads(index.read_text())["weight_map"].items():
                self.files[key] = self.folder / file
        else:
            for f in list(self.folder.glob("*.safetensors")) or list(self.folder.glob("pytorch_model*.bin")):
                for key in self._keys(f):
                    self.files[key] = f
        self._bin_cache = {}
        self.aliases = {}
        self.packed = packed_parameters(self.folder, self.files)
        self.fp8 = fp8_parameters(self.folder, self.files)

    @staticmethod
    def _keys(file):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "pt") as f:
                return list(f.keys())
        return list(torch.load(file, map_location="cpu", weights_only=True, mmap=True).keys())

    def keys(self):
        return (self.files.keys() - self.fp8.consumed) | self.packed.keys()

    def __contains__(self, key):
        return key in self.files or key in self.packed or key in self.aliases

    def _get(self, key, into=None) -> torch.Tensor:
        if key in self.packed:
            return dequantized_mxfp4(*(self._get(k) for k in self.packed[key]))
        if key in self.fp8.scales:
            return self.fp8.dequantized(self._stored(key), self._stored(self.fp8.scales[key]))
        return self._stored(key)

    def _stored(self, key) -> torch.Tensor:
        file = self.files[key]
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "pt") as f:
                return f.get_tensor(key)
        if file not in self._bin_cache:
            self._bin_cache = {file: torch.load(file, map_location="cpu", weights_only=True, mmap=True)}
        return self._bin_cache[file][key]


# --- transformers-quantized sources --------------------------------------------------------------------------------
# A checkpoint whose config says `quant_method: mxfp4` stores some parameters P (expert matrices) as `P_blocks` +
# `P_scales`. The reference is built unquantized (`from_config`), so the reader also answers to P: dequantized by
# transformers' own MXFP4 loader function, which `from_pretrained` uses on a machine without its Triton kernels, so
# that the gate does not depend on how mlx_arch repacks those bytes.


def packed_parameters(folder: Path, files: dict) -> dict:
    """{parameter name: (blocks key, scales key)} of an MXFP4 checkpoint; empty for any other."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "mxfp4" or "quantization" in config:
        return {}
    suffix = "_blocks"
    return {k[: -len(suffix)]: (k, k[: -len(suffix)] + "_scales") for k in files
            if k.endswith(suffix) and k[: -len(suffix)] + "_scales" in files}


def dequantized_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)


class FP8Scales:
    """An FP8 block-scaled checkpoint's (config `quant_method: fp8`) scale tensors: `scales` {weight key: its
    `_scale_inv` key}, `consumed` the keys that are not parameters. `dequantized` is transformers' FP8Linear
    dequantization (blocks from the config, ragged last blocks; see mlx_arch/core/fp8.py)."""

    def __init__(self, config: dict, files: dict):
        from mlx_arch.core import fp8

        found = fp8.is_source(config)
        self.block = fp8.block_size(config["quantization_config"]) if found else None
        self.scales = {k[: -len(fp8.SCALE)]: k for k in files if found and k.endswith(fp8.SCALE)}
        self.consumed = {k for k in files if found and k.endswith((fp8.SCALE, fp8.DROPPED))}

    def dequantized(self, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
        from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

        return _dequantize_fp8_weight(weight, scale_inv, self.block, torch.float32)


def fp8_parameters(folder: Path, files: dict) -> FP8Scales:
    config_file = folder / "config.json"
    return FP8Scales(json.loads(config_file.read_text()) if config_file.is_file() else {}, files)


class OutputWeights(TensorSource):
    """The weights a converted folder actually holds, under the checkpoint's names and layouts: each quantized
    tensor dequantized exactly as the MLX format defines it, then the inverse of the family's weight rules. Run
    with these, the reference computes the same function as the converted model, whatever its precision.

    Keys the rules drop by declaration (buffers, a head tied to the embeddings) are read from `fallback`, the
    source checkpoint. Everything stays lazy: `get` evaluates one tensor and lets it go (an evaluated MLX array
    keeps its data, so a tensor is taken out of the lazy map when read; a second read maps the files again)."""

    def __init__(self, folder, fallback: TensorSource):
        import mlx_arch
        from mlx_arch.core.weights import dropped

        self.folder = Path(folder)
        self.config = json.loads((self.folder / "config.json").read_text())
        self.rules = output_rules(self.config, fallback)
        self.tensors = self._mapped()
        self.held = set(self.tensors)  # checkpoint names of what the output holds
        self.fallback, self.aliases = fallback, {}
        self._keys = self.held | {k for k in fallback.keys() if k not in self.held and dropped(self.rules, k)}

    def _mapped(self) -> dict:
        """Lazy {checkpoint name: float32 array} of everything the folder holds. Also fills `direct`: the checkpoint
        names whose tensor is one affine-quantized weight as stored (no rule reshapes it), which `_get` dequantizes
        in torch (`affine.dequantize`: the same values, several times faster than MLX's kernel)."""
        import mlx.core as mx
        from mlx_arch.core.weights import apply_rules, inverse

        stored = {}
        for f in sorted(self.folder.glob("model*.safetensors")):
            stored.update(mx.load(str(f)))
        floats = float_weights(stored, self.config)
        mapped = apply_rules(floats, inverse(self.rules))
        self.direct = direct_dequantization(stored, floats, mapped, self.config)
        return mapped

    def keys(self):
        return self._keys

    def _get(self, key, into=None) -> torch.Tensor:
        import mlx.core as mx

        if key not in self.held:
            return self.fallback.get(key)
        if key not in self.tensors:
            self.tensors = self._mapped()
        if key in self.direct:
            self.tensors.pop(key)
            weight, scales, biases, bits, group_size = self.direct.pop(key)
            out = None if into is None else into((weight.shape[0], weight.shape[1] * 32 // bits))
            views = [affine.torch_view(a) for a in (weight, scales, biases)]
            return affine.dequantize(*views, bits, group_size, out)
        # a view of MLX's buffer, which the tensor keeps alive: no copy (a copy into fresh pages cost ~10 s per 1.1B
        # weights here). bf16 and float16 stay as stored (numpy has no bf16: its bits go through as uint16), for the
        # reader to make float32 in its reused buffers, faster than MLX's single-threaded cast into fresh memory.
        array = self.tensors.pop(key)
        return affine.torch_view(array if array.dtype in (mx.bfloat16, mx.float16) else array.astype(mx.float32))


def output_rules(config: dict, source: TensorSource) -> list:
    """Weight rules from the source checkpoint's names to the output's: the output model's own, after those of the
    multimodal container the source may be (its language model's prefix; its other towers dropped, so the reference
    reads them from the source)."""
    import mlx_arch
    from mlx_arch.core.containers import container_of

    source_config = Path(getattr(source, "folder", "")) / "config.json"
    container = container_of(json.loads(source_config.read_text())) if source_config.is_file() else None
    return (container.rules() if container else []) + mlx_arch.build_model(config).weight_rules()


def float_weights(stored: dict, config: dict) -> dict:
    """Stored MLX weights with every quantized (weight, scales, biases) group replaced by its float32 weight."""
    from mlx_arch.core.quant import dequantize

    out = {}
    for key, value in stored.items():
        base, _, leaf = key.rpartition(".")
        if f"{base}.scales" not in stored or leaf not in ("weight", "scales", "biases"):
            out[key] = value
        elif leaf == "weight":
            out[key] = dequantize(value, stored[f"{base}.scales"], stored.get(f"{base}.biases"),
                                  **quantization_params(config, base))
    return out


def direct_dequantization(stored: dict, floats: dict, mapped: dict, config: dict) -> dict:
    """{checkpoint name: (packed weight, scales, biases, bits, group size)} of the affine-quantized weights that the
    inverse rules hand through unchanged (the same array object under a checkpoint name: no transpose, split or
    concatenation), which torch can dequantize straight from the stored arrays."""
    quantized = {id(floats[key]): key.rpartition(".")[0] for key in floats  # alive in `floats`: ids are unique
                 if key.endswith(".weight") and f"{key.rpartition('.')[0]}.scales" in stored}
    direct = {}
    for name, array in mapped.items():
        base = quantized.get(id(array))
        params = quantization_params(config, base) if base else None
        if params and params["mode"] == "affine" and params["bits"] in affine.BITS and \
                stored[f"{base}.weight"].ndim == 2 and f"{base}.biases" in stored:
            direct[name] = tuple(stored[f"{base}.{leaf}"] for leaf in ("weight", "scales", "biases")) + (
                params["bits"], params["group_size"])
    return direct


def quantization_params(config: dict, base: str) -> dict:
    """Group size, bits and mode of the quantized layer `base` (its own entry in the config, else the default)."""
    quant = config.get("quantization") or config.get("quantization_config") or {}
    params = {"group_size": quant.get("group_size", 64), "bits": quant.get("bits", 4),
              "mode": quant.get("mode", "affine")}
    if isinstance(quant.get(base), dict):
        params.update({k: v for k, v in quant[base].items() if k in params})
    return params


def build_reference(folder):
    """The transformers model of `folder` with parameters on the meta device, float32, eval mode."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with parameters_on_meta():
            model = reference_class(config).from_config(config, dtype=torch.float32)
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:  # the config, not our code
        from .errors import ConvertError

        raise ConvertError(f"transformers cannot build the reference model from this config.json ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:160]}), so the gate cannot run: fix the config, or pass "
                           "--skip-validation to convert without proof") from None
    return model.eval()


def reference_class(config):
    """AutoModelForCausalLM; for a multimodal container, the container's own image-text model, which the gate runs
    on input ids only: its text path (AutoModelForCausalLM maps some containers to their bare text model, e.g.
    Llama 4's, whose names are not the checkpoint's)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    is_container = config.get_text_config() is not config
    if is_container and type(config) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def text_modules(model):
    """The module holding the text model's layers: a multimodal container's decoder (its vision tower may have as
    many layers), else the model."""
    if model.config.get_text_config() is not model.config and hasattr(model, "get_decoder"):
        return model.get_decoder()
    return model


def transformers_renames(model) -> list:
    """The plain key renamings transformers applies when loading this model's checkpoints."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers 4 has no conversion mapping
        return []
    renames = []
    for transform in get_model_conversion_mapping(model) or []:
        if isinstance(transform, WeightRenaming):
            renames += list(zip(transform.source_patterns, transform.target_patterns))
    return renames


def _read(reader, key):
    # float32 before converting, as transformers casts each source tensor to the parameter's dtype first
    return reader.get(key).float()


def _literal_halves(pattern: str):
    """(text before `*`, text after) of a converter source pattern that is plain text around one `*`, else None
    (a pattern with other regex syntax cannot be instantiated for a wildcard value)."""
    text = pattern.replace(r"\.", ".")
    if text.count("*") != 1 or re.search(r"[\\^$()\[\]?+{}|]", text):
        return None
    return tuple(text.split("*"))


class Converted:
    """One parameter group that a transformers `WeightConverter` builds from several checkpoint tensors (e.g. one
    layer's per-expert `gate_proj`/`up_proj` stacked and concatenated into `mlp.experts.gate_up_proj`). Holds only
    the checkpoint keys; the tensors are read and converted when the parameter is loaded, one group at a time."""

    def __init__(self, converter, target: str):
        # target: the full name of the converter's first target, under which transformers files the group
        self.converter, self.target = converter, target
        self.keys = {}  # source pattern -> checkpoint keys, in the order transformers collects them

    def add(self, pattern: str, key: str):
        self.keys.setdefault(pattern, []).append(key)

    def names(self, params) -> list:
        """The parameter names this group produces (a one-to-many converter, e.g. qkv -> q, k, v, produces several;
        named the way transformers expands its first target)."""
        first = self.converter.target_patterns[0]
        return [n for n in (self.target.replace(first, t) for t in self.converter.target_patterns) if n in params]

    def missing(self) -> list:
        """Checkpoint keys the conversion needs but the checkpoint lacks: every `*` pattern must be present for each
        wildcard value (expert index) any pattern of the group has, and integer ones must run from 0 without gaps.
        Otherwise transformers' ops would stack too few experts, or pair gate and up of different experts."""
        halves = {p: _literal_halves(p) for p in self.converter.source_patterns}
        if None in halves.values():
            return []
        found = {p: {} for p in halves}  # pattern -> {wildcard value: (key, match)}
        for pattern, keys in self.keys.items():
            head, tail = halves[pattern]
            for key in keys:
                match = re.search(re.escape(head) + r"([^.]+)" + re.escape(tail), key)
                if match:  # a renaming may have rewritten the matched part: then this key cannot serve as a template
                    found[pattern][match.group(1)] = (key, match)
        values = set().union(*found.values())
        if not values:
            return []
        if all(v.isdigit() for v in values):
            values |= {str(i) for i in range(max(map(int, values)) + 1)}
        key, match = next(v for f in found.values() for v in f.values())
        return [key[:match.start()] + head + v + tail + key[match.end():]
                for pattern, (head, tail) in halves.items()
                for v in sorted(values - found[pattern].keys(), key=lambda v: (len(v), v))]

    def tensor(self, reader, model, name: str) -> torch.Tensor:
        """Parameter `name`, converted by transformers' own `WeightConverter.convert` (its ops in order, then its
        expansion of pattern names to full names) from tensors read now."""
        converter = copy.deepcopy(self.converter)  # collecting tensors changes a converter: one copy per use
        for pattern, keys in self.keys.items():
            for key in keys:  # a callable is read only when the converter materializes its inputs
                converter.add_tensor(self.target, key, pattern, functools.partial(_read, reader, key))
        out = converter.convert(self.target, model=model, config=model.config)
        if name not in out:
            raise ValueError(f"transformers' conversion of {', '.join(sum(self.keys.values(), []))} gives "
                             f"{', '.join(out)}, not {name}")
        value = out[name]
        return value[0] if isinstance(value, list) else value


def converted_parameters(model, reader) -> dict:
    """{parameter name: (Converted group, name)} for the parameters transformers builds from several checkpoint keys
    through `WeightConverter`s. Each checkpoint key is named as transformers names it on load (`rename_source_key`:
    its renamings, then at most one converter, then the base-model prefix), in transformers' order, so the experts
    stack in the order `from_pretrained` stacks them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:  # transformers 4 has no converters: every parameter is one checkpoint key
        return {}
    mapping = get_model_conversion_mapping(model) or []  # fresh copies: matching keys changes their state
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    if not converters:
        return {}
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    params = dict.fromkeys((n for n, _ in model.named_parameters(remove_duplicate=False)), True)
    groups = {}
    for key in sorted(reader.keys(), key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, params)
        if pattern is not None and target in params:
            groups.setdefault(target, Converted(by_pattern[pattern], target)).add(pattern, key)
    return {name: (group, name) for group in groups.values() for name in group.names(params)}


def layer_count(model) -> int:
    """How many decoder layers the model builds: the count its config holds under the key transformers' own
    hidden-state recorder reads (`num_layers` where `num_hidden_layers` counts two attention blocks per layer, as
    LongCat-Flash's does), else `num_hidden_layers`."""
    config = model.config.get_text_config()
    recorder = (getattr(model, "_can_record_outputs", None) or {}).get("hidden_states")
    return getattr(config, getattr(recorder, "num_hidden_layers_key", "num_hidden_layers"), None) \
        or config.num_hidden_layers


def decoder_layers(model, n_layers: int):
    """The ModuleList of decoder layers (named differently per family: model.layers, transformer.h, ...)."""
    for _, module in text_modules(model).named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError("cannot find the decoder layers of the reference model")


class Buffers:
    """Reusable float32 storage for the weights the streamed reference makes float32 one module at a time.

    Filling fresh memory costs a page fault per page, and on a virtual machine that is most of a conversion's cost
    (a 46 MB bf16 -> float32 conversion: 15 ms into fresh memory, 1 ms into memory already touched). A released
    weight's buffer goes back to the pool only when nothing else holds its storage (torch's storage use count; without
    that API nothing is reused), and is handed out again for a tensor that needs at least half of it. A buffer not
    taken again within KEEP conversions is let go, and none larger than `largest` elements is kept (the embedding
    and head, used once each per pass): the pool holds about one decoder layer's shapes."""

    KEEP = 16

    def __init__(self, largest: int):
        self.largest = largest
        self.free = []  # (flat float32 tensor, the conversion count when it came back)
        self.lent = {}  # id(parameter) -> (parameter, its flat buffer)
        self.use_count = getattr(torch._C, "_storage_Use_Count", None)
        self.count = 0

    def converted(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as float32 in a pooled buffer (a parameter: `release` it when it is let go)."""
        return self.empty(tensor.shape).copy_(tensor)

    def empty(self, shape) -> torch.Tensor:
        """A float32 parameter of `shape` in a pooled buffer, its values undefined (`release` it when let go)."""
        n = math.prod(shape)
        self.count += 1
        self.free = [(b, when) for b, when in self.free if when >= self.count - self.KEEP]
        fits = [i for i, (b, _) in enumerate(self.free) if n <= b.numel() <= 2 * n]
        best = min(fits, key=lambda i: self.free[i][0].numel(), default=None)
        flat = self.free.pop(best)[0] if best is not None else torch.empty(n, dtype=torch.float32)
        param = torch.nn.Parameter(flat[:n].view(shape), requires_grad=False)
        self.lent[id(param)] = (param, flat)
        return param

    def release(self, param):
        """`param` is no longer the model's: its buffer is free again unless something still holds it."""
        entry = self.lent.pop(id(param), None)
        if entry is None or self.use_count is None or entry[1].numel() > self.largest:
            return
        _, flat = entry
        storage = flat.untyped_storage()
        del entry, param
        # flat, the parameter's view of it and `storage` itself; anything more is a reference we did not make
        if self.use_count(storage._cdata) <= 3:
            self.free.append((flat, self.count))


class StreamedForward:
    """Runs the meta-device reference with each module's weights loaded just before it runs and released after.

    Also records every decoder layer's output hidden states. Runs on the GPU when torch sees one (in true float32:
    TF32 is switched off for the pass), weights moved there one module at a time like on the CPU.
    """

    def __init__(self, model, reader: CheckpointReader, device: Optional[str] = None, blocks: bool = False):
        self.model, self.reader = model, reader
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        for module in model.modules():  # rotary tables and other buffers are real tensors: move them once
            for name, buffer in module._buffers.items():
                if buffer is not None and not buffer.is_meta:
                    module._buffers[name] = buffer.to(self.device)
        reader.rename(transformers_renames(model))
        self.sources = self._map_names(model, reader)
        self.layer_outputs = []
        self.on_layer = lambda index: None  # called as each decoder layer finishes (progress)
        # a multimodal container's own config has no layer count: its text model's has (`text_config` twin)
        layers = decoder_layers(model, layer_count(model))
        self._names = {id(m): n for n, m in model.named_modules()}
        largest = max((p.numel() for layer in layers for p in layer.parameters()), default=0)
        self._buffers = Buffers(largest) if self.device == "cpu" else None  # a decoder layer's shapes at most
        self._loaded = {}  # id(module) -> the parameters its pre-hook loaded (released by its post-hook)
        self._load_buffers(model, reader)
        # Each module loads its own weights when it runs. With `blocks` (for families whose transformers modules read
        # their children's weights directly, e.g. DBRX's experts), each block below the decoder layers loads its whole
        # subtree instead; a part already loaded by an enclosing block is left to that block.
        above = {id(m) for m in model.modules() if any(sub is layers for sub in m.modules())}
        above |= {id(layer) for layer in layers}
        self._subtree = set()  # modules that load their whole subtree
        for module in model.modules():
            own = any(p is not None for p in module._parameters.values())
            if blocks and id(module) not in above and any(True for _ in module.parameters()):
                self._subtree.add(id(module))
            if own or id(module) in self._subtree:
                module.register_forward_pre_hook(self._load)
                module.register_forward_hook(self._release)
        for layer in layers:
            layer.register_forward_hook(self._record)

    @staticmethod
    def _map_names(model, reader):
        """Source of every parameter name: one checkpoint key (following tied parameters, the base-model prefix and
        renamings), else a group of keys that a transformers converter turns into it (`converted_parameters`)."""
        aliases = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        prefix = getattr(model, "base_model_prefix", "") + "."
        converted = converted_parameters(model, reader)
        sources, missing = {}, []
        for names in aliases.values():
            candidates = names + [n[len(prefix):] for n in names if n.startswith(prefix)]
            key = next((c for c in candidates if c in reader), None)
            if key is None:
                key = next((converted[n] for n in names if n in converted), None)
                missing += [f"{k} (for {names[0]})" for k in key[0].missing()] if key else [names[0]]
            for n in names:
                sources[n] = key
        if missing:
            raise ValueError(f"the source checkpoint lacks weights the reference needs: {', '.join(missing)}")
        return sources

    def _load_buffers(self, model, reader):
        """Persistent buffers the checkpoint holds (DeepSeek-style routing correction biases are real data that
        transformers keeps as buffers): loaded once, they are small."""
        prefix = getattr(model, "base_model_prefix", "") + "."
        for path, module in model.named_modules():
            for name, buffer in module._buffers.items():
                if buffer is None or name in module._non_persistent_buffers_set:
                    continue
                full = f"{path}.{name}" if path else name
                key = next((k for k in (full, full[len(prefix):] if full.startswith(prefix) else None)
                            if k and k in reader), None)
                if key is not None:
                    module._buffers[name] = reader.get(key).to(buffer.dtype).to(self.device)

    def _load(self, module, args):
        loaded = []
        prefix = self._names[id(module)]
        owners = module.named_modules(prefix=prefix) if id(module) in self._subtree else [(prefix, module)]
        for path, owner in owners:
            for name, p in owner._parameters.items():
                if p is not None and p.is_meta:
                    full = f"{path}.{name}" if path else name
                    tensor = self._tensor(full, p.shape)
                    owner._parameters[name] = (tensor if isinstance(tensor, torch.nn.Parameter)
                                               else torch.nn.Parameter(tensor, requires_grad=False))
                    loaded.append((owner, name))
        self._loaded.setdefault(id(module), []).extend(loaded)  # loaded ahead (see __call__) or by the pre-hook

    def _tensor(self, name, shape) -> torch.Tensor:
        source = self.sources[name]
        if isinstance(source, str):
            tensor = self.reader.get(source, self._buffers.empty if self._buffers is not None else None)
            if self._buffers is not None and tensor.dtype != torch.float32 and tensor.is_floating_point():
                return self._buffers.converted(tensor)
            return tensor.float().to(self.device)
        group, produced = source
        tensor = group.tensor(self.reader, self.model, produced).float().to(self.device)
        if tensor.shape != shape:  # e.g. a whole expert missing: transformers would report the key as mismatched
            raise ValueError(f"{name}: the checkpoint tensors convert to shape {tuple(tensor.shape)}, "
                             f"the reference expects {tuple(shape)}")
        return tensor

    def _release(self, module, args, output):
        for owner, name in self._loaded.pop(id(module), []):
            param = owner._parameters[name]
            owner._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)
            if self._buffers is not None:
                self._buffers.release(param)
            del param

    def _record(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        self.layer_outputs.append(hidden.detach().float().cpu().numpy())
        self.on_layer(len(self.layer_outputs) - 1)

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask=None):
        """(logits, [hidden states after each layer]) as float32 numpy arrays."""
        self.layer_outputs = []
        as_tensor = lambda x: None if x is None else torch.as_tensor(x).to(self.device)  # noqa: E731
        # The token embedding is loaded ahead, for models that move the input ids to its device before calling it
        # (Llama 4), which would be the meta device otherwise; its own forward hook releases it as usual.
        embedding = self.model.get_input_embeddings()
        self._load(embedding, ())
        try:
            with true_float32():
                out = self.model(input_ids=as_tensor(input_ids), attention_mask=as_tensor(attention_mask),
                                 use_cache=False)
        finally:
            if id(embedding) in self._loaded:  # never called (an error before it): release it here
                self._release(embedding, (), None)
            if self._buffers is not None:
                self._buffers.free.clear()  # the pool lives for one pass (a finished pass is freed only by the gc)
        return out.logits.float().cpu().numpy(), self.layer_outputs


@contextlib.contextmanager
def true_float32():
    """No TF32 on the GPU while the reference runs: the gate compares float32 computations."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
