"""Reading weights: safetensors lazily through `mx.load` (nothing is read until a shard is saved), `.bin` only
through torch's weights-only unpickler. Files are checked for truncation before they are trusted."""

import json
import struct
from pathlib import Path

import mlx.core as mx

from .errors import ConvertError


def check_safetensors(path: Path):
    """Header parses and the data section is as long as the header says (catches truncated downloads)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path.name} is not a valid safetensors file ({e}); re-download it") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise ConvertError(f"{path.name} is truncated or corrupt ({size} bytes, header expects "
                           f"{8 + length + end}); re-download it")


def _torch_to_mx(tensor) -> mx.array:
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: move the raw bits
        return mx.array(tensor.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(tensor.numpy())


def load_bin(path: Path) -> dict:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ConvertError(f"refusing {path.name}: it holds Python objects other than tensors, and mlx-convert "
                           f"never unpickles arbitrary code ({str(e).splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ConvertError(f"{path.name} is not a readable PyTorch checkpoint ({str(e).splitlines()[0][:120]})") from None
    return {k: _torch_to_mx(v) for k, v in state.items() if hasattr(v, "numpy")}


def load_weights(folder: Path, files: list, progress=None) -> dict:
    """{name: lazy array} across every weight file; `progress` wraps the file list (e.g. tqdm)."""
    weights = {}
    for name in progress(files) if progress else files:
        path = Path(folder) / name
        if not path.is_file():
            raise ConvertError(f"{name} is listed by the index but missing in {folder}")
        if path.suffix == ".safetensors":
            check_safetensors(path)
            try:
                part = mx.load(str(path))
            except (RuntimeError, ValueError) as e:
                raise ConvertError(f"{name} cannot be read ({e}); re-download it") from None
        else:
            part = load_bin(path)
        duplicate = set(part) & set(weights)
        if duplicate:
            raise ConvertError(f"{name} repeats tensors found in another file, e.g. {sorted(duplicate)[0]}")
        weights.update(part)
    return weights
