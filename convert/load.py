"""Reading weights lazily: safetensors through `mx.load` (nothing is read until a shard is saved); `.bin` only
through torch's weights-only unpickler, streamed tensor by tensor into a scratch safetensors file that is then read
as lazily, so that a `.bin` source does not have to fit in memory either. Files are checked for truncation before
they are trusted."""

import functools
import json
from pathlib import Path
from typing import Optional

import mlx.core as mx

from . import safetensors_file
from .errors import ConvertError

TORCH_TO_SAFETENSORS = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "float8_e4m3fn": "F8_E4M3",
}


def open_bin(path: Path) -> dict:
    """The state dict of a `.bin` file, memory-mapped, through the weights-only unpickler."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ConvertError(f"refusing {path.name}: it holds Python objects other than tensors, and mlx-convert "
                           f"never unpickles arbitrary code ({str(e).splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ConvertError(f"{path.name} is not a readable PyTorch checkpoint "
                           f"({str(e).splitlines()[0][:120]})") from None


def _tensor_bytes(tensor):
    import torch

    flat = tensor.contiguous().reshape(-1)  # a copy only for a non-contiguous tensor
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b""


def spill_bin(path: Path, scratch: Path) -> Path:
    """Rewrite a `.bin` file as safetensors in `scratch`, one tensor at a time from the memory-mapped original."""
    entries = []
    for name, tensor in open_bin(path).items():
        if not hasattr(tensor, "numpy"):
            continue
        dtype = TORCH_TO_SAFETENSORS.get(str(tensor.dtype).replace("torch.", ""))
        if dtype is None:
            raise ConvertError(f"{path.name}: tensor {name} has dtype {tensor.dtype}, which mlx-convert cannot read")
        nbytes = tensor.numel() * tensor.element_size()
        entries.append((name, dtype, tuple(tensor.shape), nbytes, functools.partial(_tensor_bytes, tensor)))
    out = Path(scratch) / f"{path.name}.safetensors"
    safetensors_file.write(out, entries, "pt")
    return out


def load_weights(folder: Path, files: list, progress=None, scratch: Optional[Path] = None) -> dict:
    """{name: lazy array} across every weight file; `progress` wraps the file list (e.g. tqdm). `.bin` files are
    first rewritten into `scratch`, which must then live until the arrays are evaluated."""
    weights, stored = {}, {}
    for name in progress(files) if progress else files:
        path = Path(folder) / name
        if not path.is_file():
            raise ConvertError(f"{name} is listed by the index but missing in {folder}")
        if path.suffix == ".bin":
            if scratch is None:
                raise ValueError("reading .bin weights needs a scratch folder")
            path = spill_bin(path, scratch)
        else:
            safetensors_file.check(path)
        try:
            part = mx.load(str(path))
        except (RuntimeError, ValueError) as e:
            raise ConvertError(f"{name} cannot be read ({e}); re-download it") from None
        duplicate = set(part) & set(weights)
        if duplicate:
            raise ConvertError(f"{name} repeats tensors found in another file, e.g. {sorted(duplicate)[0]}")
        weights.update(part)
        stored.update(safetensors_file.dtypes(path))
    return fp8_dequantized(folder, weights, stored)


def fp8_dequantized(folder: Path, weights: dict, stored: dict) -> dict:
    """The weights of an FP8 block-scaled checkpoint (config `quant_method: fp8`) as floats, each computed from its
    codes and block scales when it is evaluated (mlx_arch/core/fp8.py); other checkpoints' weights unchanged.
    `stored`: {name: safetensors dtype} of every tensor."""
    from mlx_arch.core import fp8

    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if not fp8.is_source(config):
        return weights
    codes = {name for name, dtype in stored.items() if dtype == fp8.STORED}
    try:
        return fp8.DequantizeFP8(fp8.block_size(config["quantization_config"]), codes).apply(weights)
    except ValueError as e:
        raise ConvertError(f"FP8 checkpoint: {e}; re-download it or convert its unquantized original") from None
