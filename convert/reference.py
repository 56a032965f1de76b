"""The transformers reference, run with bounded memory: built on the meta device, each module's weights loaded
from the checkpoint just before it runs and released right after, so that a model larger than memory can still be
compared layer by layer."""

import contextlib
import json
import re
from pathlib import Path

import torch


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


class CheckpointReader:
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

    @staticmethod
    def _keys(file):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "pt") as f:
                return list(f.keys())
        return list(torch.load(file, map_location="cpu", weights_only=True, mmap=True).keys())

    def rename(self, renames):
        """Also answer to the names transformers gives checkpoint keys on load (e.g. `embed_out.` ->
        `lm_head.`); `renames` are (regex, replacement) pairs."""
        for key in list(self.files):
            new = key
            for pattern, replacement in renames:
                new = re.sub(pattern, replacement, new)
            if new != key and new not in self.files:
                self.aliases[new] = key

    def __contains__(self, key):
        return key in self.files or key in self.aliases

    def get(self, key) -> torch.Tensor:
        key = self.aliases.get(key, key)
        file = self.files[key]
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "pt") as f:
                return f.get_tensor(key)
        if file not in self._bin_cache:
            self._bin_cache = {file: torch.load(file, map_location="cpu", weights_only=True, mmap=True)}
        return self._bin_cache[file][key]


def build_reference(folder):
    """The transformers model of `folder` with parameters on the meta device, float32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


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


def decoder_layers(model, n_layers: int):
    """The ModuleList of decoder layers (named differently per family: model.layers, transformer.h, ...)."""
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError("cannot find the decoder layers of the reference model")


class StreamedForward:
    """Runs the meta-device reference with each module's weights loaded just before it runs and released after.

    Also records every decoder layer's output hidden states.
    """

    def __init__(self, model, reader: CheckpointReader):
        self.model, self.reader = model, reader
        reader.rename(transformers_renames(model))
        self.sources = self._map_names(model, reader)
        self.layer_outputs = []
        self.on_layer = lambda index: None  # called as each decoder layer finishes (progress)
        for module in model.modules():
            if any(p is not None for p in module._parameters.values()):
                module.register_forward_pre_hook(self._load)
                module.register_forward_hook(self._release)
        layers = decoder_layers(model, model.config.num_hidden_layers)
        for layer in layers:
            layer.register_forward_hook(self._record)
        self._names = {id(m): n for n, m in model.named_modules()}

    @staticmethod
    def _map_names(model, reader):
        """Checkpoint key for every parameter name, following tied parameters and the base-model prefix."""
        aliases = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        prefix = getattr(model, "base_model_prefix", "") + "."
        sources, missing = {}, []
        for names in aliases.values():
            candidates = names + [n[len(prefix):] for n in names if n.startswith(prefix)]
            key = next((c for c in candidates if c in reader), None)
            if key is None:
                missing.append(names[0])
            for n in names:
                sources[n] = key
        if missing:
            raise ValueError(f"the source checkpoint lacks weights the reference needs: {', '.join(missing)}")
        return sources

    def _load(self, module, args):
        prefix = self._names[id(module)]
        for name, p in module._parameters.items():
            if p is not None:
                full = f"{prefix}.{name}" if prefix else name
                module._parameters[name] = torch.nn.Parameter(self.reader.get(self.sources[full]).float(),
                                                              requires_grad=False)

    @staticmethod
    def _release(module, args, output):
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=False)

    def _record(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        self.layer_outputs.append(hidden.detach().float().numpy())
        self.on_layer(len(self.layer_outputs) - 1)

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask=None):
        """(logits, [hidden states after each layer]) as float32 numpy arrays."""
        self.layer_outputs = []
        out = self.model(input_ids=torch.as_tensor(input_ids),
                         attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask),
                         use_cache=False)
        return out.logits.float().numpy(), self.layer_outputs
