"""The safetensors file format, for the two places that stream it: checking a source file before trusting it, and
writing a file one tensor at a time (output shards, and `.bin` sources turned into lazily readable files)."""

import json
import struct
from pathlib import Path
from typing import Callable

from .errors import ConvertError


def check(path: Path):
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


def write(path: Path, entries: list, fmt: str) -> int:
    """Write (name, dtype code, shape, nbytes, data) entries, where `data()` returns the tensor's bytes; each is
    called and released in turn, so the peak is one tensor. The list is emptied. Returns the data bytes written."""
    header, offset = {}, 0
    for name, dtype, shape, nbytes, _ in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": fmt}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        while entries:
            data: Callable = entries.pop(0)[4]
            f.write(data())
            del data
    return offset
