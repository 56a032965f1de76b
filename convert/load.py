"""Reading weights lazily: safetensors through `mx.load` (nothing is read until a shard is saved); `.bin` only
through torch's weights-only unpickler, streamed tensor by tensor into a scratch safetensors file that is then read
as lazily, so that a `.bin` source does not have to fit in memory either. Files are checked for truncation before
they are trusted."""

import functools
from pathlib import Path
from typing import Optional

import mlx.core as mx

from . import safetensors_file
from .errors import ConvertError

TORCH_TO_SAFETENSORS = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
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
    weights = {}
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
    return weights
