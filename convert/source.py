"""Pre-flight and fetch: learn what the source is from its config and file list alone, refuse what we cannot
convert before any weight is downloaded, then download exactly the files we need."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx_arch

from .errors import ConvertError
from .retry import transient
from .plan import ConvertPlan

SIDE_FILES = [
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
    "chat_template.json", "README.md", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE",
]
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
CODE_PREFIXES = ("modeling_", "configuration_", "tokenization_", "processing_")
TEMPLATE_DIR = "additional_chat_templates"  # named chat templates, one .jinja file each (transformers >= 4.54)


def is_named_template(name: str) -> bool:
    return name.startswith(TEMPLATE_DIR + "/") and name.endswith(".jinja") and name.count("/") == 1


@dataclass
class Source:
    """What pre-flight learned: the config, which weight files to read, and where they come from."""

    config: dict
    weight_files: list
    repo_id: Optional[str] = None  # None for a local folder
    commit: Optional[str] = None
    folder: Optional[Path] = None
    files: list = field(default_factory=list)
    ignored_code: str = ""  # the repo's own code, neither fetched nor run: its model_type is native to both sides
    sizes: dict = field(default_factory=dict)  # file sizes in bytes, where known before downloading

    def weight_bytes(self) -> Optional[int]:
        if not all(f in self.sizes for f in self.weight_files):
            return None
        return sum(self.sizes[f] for f in self.weight_files)


def hub_endpoint(plan: ConvertPlan) -> Optional[str]:
    # Read at call time: huggingface_hub reads HF_ENDPOINT only when it is imported.
    return plan.endpoint or os.environ.get("HF_ENDPOINT") or None


def hub_offline() -> bool:
    from huggingface_hub import constants

    # Also read at call time, for the same reason as HF_ENDPOINT.
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def choose_weight_files(files: list, read_index) -> list:
    """The weight files to read: safetensors preferred, through the index when sharded; `.bin` otherwise."""
    names = set(files)
    for index, single in zip(INDEXES, ("model.safetensors", "pytorch_model.bin")):
        if index in names:
            return sorted(set(read_index(index)["weight_map"].values()))
        if single in names:
            return [single]
    shards = sorted(f for f in names if "/" not in f and f.endswith(".safetensors"))
    if shards:
        return shards
    raise ConvertError("no weights found (model*.safetensors or pytorch_model*.bin): is this a model repo?")


def custom_code(config: dict, files: list) -> str:
    """What in the checkpoint asks for its own code: auto_map entries or custom modeling/configuration/tokenizer
    files (other .py files, such as inference handlers, are never downloaded nor run)."""
    found = [f"auto_map {name}" for name in config.get("auto_map", {})]
    found += [f for f in files if f.endswith(".py") and Path(f).name.startswith(CODE_PREFIXES)]
    return ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")


def native(model_type: str) -> bool:
    """Whether transformers and mlx-convert both implement `model_type` (then a repo's own code is not needed:
    transformers itself, with trust_remote_code=False, uses its native class)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return False
    try:
        mlx_arch.get_architecture(model_type)
    except mlx_arch.UnsupportedArchitecture:
        return False
    return True


def check_source(config: dict, files: list, plan: ConvertPlan) -> str:
    """Refusals that need only the config and the file list; returns the repo's own code that is ignored because
    its model_type is native (official repos of Phi-3, DeepSeek, GLM, ... still ship modeling files)."""
    if not isinstance(config, dict):
        raise ConvertError("config.json does not hold a JSON object")
    model_type = config.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise ConvertError("config.json has no model_type (a string): cannot tell the architecture")
    for key in ("quantization_config", "quantization", "rope_parameters", "rope_scaling", "text_config"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ConvertError(f"config.json: {key} = {config[key]!r} is not a JSON object; fix the config")
    code = custom_code(config, files)
    if code and not native(model_type):
        raise ConvertError(f"this checkpoint asks for its own code ({code}) and {model_type!r} has no native "
                           "implementation in transformers and mlx-convert; mlx-convert never runs checkpoint code: "
                           "convert a checkpoint of a transformers architecture instead")
    try:
        arch = mlx_arch.architecture(config)  # a multimodal container's: its text model's
    except mlx_arch.UnsupportedArchitecture as e:
        raise ConvertError(str(e)) from None
    quant = config.get("quantization_config") if "quantization" not in config else None  # transformers' own
    # A transformers-quantized source is refused unless its family reads that format as it is stored (it lists the
    # `quant_method` in its Model's `source_formats`, e.g. MXFP4 experts); `--dequantize` then turns those
    # layers into floats, as for an MLX-quantized source.
    # FP8 block-scaled weights are dequantized on load, whatever the family (mlx_arch/core/fp8.py).
    readable = bool(quant) and (quant.get("quant_method") in getattr(arch.Model, "source_formats", ())
                                or dequantized_on_load(config))
    if quant and not readable:
        method = quant.get("quant_method", "unknown")
        raise ConvertError(f"the source is already quantized ({method}); convert its unquantized original instead")
    if plan.dequantize and "quantization" not in config and not readable:
        raise ConvertError("--dequantize needs an MLX-quantized source (config.json has no 'quantization')")
    if plan.quantize and "quantization" in config:
        raise ConvertError("the source is already MLX-quantized: --dequantize it first, or convert the original")
    return code


def dequantized_on_load(config: dict) -> bool:
    """Whether the loader reads this transformers-quantized source as floats (FP8 block-scaled); a one-line error
    for an FP8 variant it cannot read."""
    from mlx_arch.core import fp8

    if not fp8.is_source(config):
        return False
    try:
        fp8.block_size(config["quantization_config"])
    except ValueError as e:
        raise ConvertError(f"config.json: {e}; convert the unquantized original instead") from None
    return True


def preflight(plan: ConvertPlan) -> Source:
    local = Path(plan.hf_path)
    if local.is_dir():
        return _local_source(local, plan)
    if local.exists() or plan.hf_path.startswith((".", "/")) or plan.hf_path.count("/") > 1:
        raise ConvertError(f"{plan.hf_path} is neither a folder nor a Hub repo id (org/name)")
    return _hub_source(plan)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path.name} is missing in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path} is not valid JSON ({e})") from None


def _local_source(folder: Path, plan: ConvertPlan) -> Source:
    paths = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    files = list(paths)
    config = _read_json(folder / "config.json")
    code = check_source(config, files, plan)
    weights = choose_weight_files(files, lambda name: _read_json(folder / name))
    sizes = {f: paths[f].stat().st_size for f in weights if f in paths}
    return Source(config, weights, folder=folder, files=files, ignored_code=code, sizes=sizes)


def _hub_source(plan: ConvertPlan) -> Source:
    from huggingface_hub import HfApi, hf_hub_download

    if hub_offline():
        return _cached_source(plan)
    endpoint = hub_endpoint(plan)
    with hub_errors(plan.hf_path, endpoint):
        # huggingface_hub retries downloads and metadata requests itself (5xx, 429, timeouts, dropped connections)
        info = HfApi(endpoint=endpoint, token=plan.token).model_info(plan.hf_path, revision=plan.revision,
                                                                     files_metadata=True)
        files = [s.rfilename for s in info.siblings or []]
        sizes = {s.rfilename: s.size for s in info.siblings or [] if s.size is not None}
        if "config.json" not in files:
            raise ConvertError(f"{plan.hf_path} has no config.json: not a transformers checkpoint")

        def download(name):
            return _read_json(Path(hf_hub_download(plan.hf_path, name, revision=info.sha, endpoint=endpoint,
                                                   token=plan.token)))

        config = download("config.json")
        code = check_source(config, files, plan)
        weights = choose_weight_files(files, download)
    return Source(config, weights, repo_id=plan.hf_path, commit=info.sha, files=files, ignored_code=code,
                  sizes=sizes)


def _cached_source(plan: ConvertPlan) -> Source:
    """HF_HUB_OFFLINE: the snapshot a previous download left in the cache, used like a local folder."""
    from huggingface_hub import snapshot_download

    with hub_errors(plan.hf_path, hub_endpoint(plan)):
        # Only config.json must be there; what else a previous run fetched decides which weights are read.
        folder = Path(snapshot_download(plan.hf_path, revision=plan.revision, local_files_only=True,
                                        allow_patterns=["config.json"], token=plan.token))
    source = _local_source(folder, plan)
    source.repo_id, source.commit = plan.hf_path, folder.name  # snapshot folders are named by commit
    return source


def fetch(plan: ConvertPlan, source: Source) -> Path:
    """Download the weights and side files (a local folder is used in place)."""
    if source.folder is not None:
        return source.folder
    from huggingface_hub import snapshot_download

    wanted = [f for f in SIDE_FILES + list(INDEXES) + source.weight_files if f in source.files]
    wanted += [f for f in source.files if is_named_template(f)]
    endpoint = hub_endpoint(plan)
    with hub_errors(plan.hf_path, endpoint):
        # Asked by name, so that the cache records the branch or tag for later HF_HUB_OFFLINE runs; it must still
        # be the commit pre-flight checked.
        path = Path(snapshot_download(source.repo_id, revision=plan.revision, allow_patterns=wanted,
                                      endpoint=endpoint, token=plan.token))
    if path.name != source.commit:
        raise ConvertError(f"{source.repo_id} changed on the Hub during the conversion (now at {path.name}): run "
                           "it again, or pin --revision to a commit")
    source.folder = path
    return source.folder


def chain(error: BaseException) -> list:
    """The error and the errors it was raised from, outermost first."""
    out = [error]
    while out[-1].__cause__ or out[-1].__context__:
        out.append(out[-1].__cause__ or out[-1].__context__)
    return out


def server_error(error: BaseException):
    """The HTTP status of a transient Hub failure (5xx, 429) behind `error`, or None."""
    for e in chain(error):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None and transient(e):
            return status
    return None


class hub_errors:
    """Turn huggingface_hub and network errors into one-line ConvertErrors (never echoing a token)."""

    def __init__(self, repo_id, endpoint):
        self.repo_id, self.endpoint = repo_id, endpoint or "https://huggingface.co"

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, ConvertError):
            return False
        from huggingface_hub import errors

        if isinstance(error, errors.RevisionNotFoundError):
            raise ConvertError(f"{self.repo_id}: revision not found; check --revision") from None
        if isinstance(error, errors.GatedRepoError):  # a subclass of RepositoryNotFoundError
            raise ConvertError(f"{self.repo_id} is gated: accept its conditions at {self.endpoint}/{self.repo_id} "
                               "with your account, then log in with `hf auth login` or set HF_TOKEN") from None
        if isinstance(error, errors.RepositoryNotFoundError):
            raise ConvertError(f"{self.repo_id} not found on {self.endpoint} (if it is private or gated, log in "
                               "with `hf auth login` or set HF_TOKEN)") from None
        status = server_error(error)
        if status:  # huggingface_hub retried with backoff, then (for downloads) looked in the cache in vain
            raise ConvertError(f"{self.endpoint} kept failing (HTTP {status}) while downloading {self.repo_id}, "
                               "after retries with backoff; try again later") from None
        if isinstance(error, errors.LocalEntryNotFoundError) and not hub_offline():
            raise ConvertError(f"cannot reach {self.endpoint} ({type(chain(error)[-1]).__name__}); check the "
                               "network or HF_ENDPOINT, or pass a local folder") from None
        if isinstance(error, errors.LocalEntryNotFoundError):
            raise ConvertError(f"HF_HUB_OFFLINE is set and {self.repo_id} is not in the local cache: unset it or "
                               "pass a local folder") from None
        if isinstance(error, errors.EntryNotFoundError):
            raise ConvertError(f"{self.repo_id}: a file listed by the Hub is missing ({error})") from None
        if isinstance(error, errors.OfflineModeIsEnabled) or "offline" in type(error).__name__.lower():
            raise ConvertError(f"HF_HUB_OFFLINE is set and {self.repo_id} is not in the local cache: unset it or "
                               "pass a local folder") from None
        if isinstance(error, (OSError, ConnectionError)) or "Connect" in type(error).__name__:
            raise ConvertError(f"cannot reach {self.endpoint} ({type(error).__name__}); check the network or "
                               "HF_ENDPOINT, or pass a local folder") from None
        return False
