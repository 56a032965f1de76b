"""The safetensors file format, for the two places that stream it: checking a source file before trusting it, and
writing a file one tensor at a time (output shards, and `.bin` sources turned into lazily readable files)."""

import contextlib
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from .errors import ConvertError


ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "E8M0": 1, "F4": 1, "I16": 2, "U16": 2,
              "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check(path: Path):
    """Header parses, every entry is well formed (dtype, shape, offsets that match its size), and the data section
    is as long as the header says (catches truncated downloads and corrupt headers before MLX reads them)."""
    size = path.stat().st_size
    try:
        length, header = read_header(path)
        end = max((entry_end(k, t) for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path.name} is not a valid safetensors file ({e}); re-download it") from None
    if 8 + length + end != size:
        raise ConvertError(f"{path.name} is truncated or corrupt ({size} bytes, header expects "
                           f"{8 + length + end}); re-download it")


def read_header(path: Path) -> tuple:
    """(header length, header dict) of a safetensors file; ValueError if the header cannot be read."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > path.stat().st_size - 8:
            raise ValueError("header longer than the file")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return length, header


def dtypes(path: Path) -> dict:
    """{tensor name: safetensors dtype code} of a file that passed `check`."""
    return {k: v["dtype"] for k, v in read_header(path)[1].items() if k != "__metadata__"}


def entry_end(name: str, entry) -> int:
    """The end offset of a well-formed tensor entry; ValueError naming the tensor otherwise."""
    if not isinstance(entry, dict):
        raise ValueError(f"entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEM_BYTES:
        raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ValueError(f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    count = 1
    for d in shape:
        count *= d
    expected = count * ITEM_BYTES[dtype] // (2 if dtype == "F4" else 1)
    if offsets[1] - offsets[0] != expected:
        raise ValueError(f"tensor {name!r} holds {offsets[1] - offsets[0]} bytes, its shape needs {expected}")
    return offsets[1]


def write(path: Path, entries: list, fmt: str, digest=None) -> int:
    """Write (name, dtype code, shape, nbytes, data) entries, where `data()` returns the tensor's bytes; each is
    called and released in turn, so the peak is one tensor. The list is emptied. `digest` (a hashlib object, e.g.
    sha256) is fed every byte written. Returns the data bytes written."""
    header, offset = {}, 0
    for name, dtype, shape, nbytes, _ in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": fmt}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    hashing = ThreadPoolExecutor(1, thread_name_prefix="digest") if digest is not None else contextlib.nullcontext()
    with open(path, "wb") as f, hashing as hasher:

        def put(chunk):
            """Write `chunk` while the hasher's thread hashes it (hashlib and file writes release the GIL on large
            buffers); it is let go only when both are done, so no second tensor is ever held."""
            pending = hasher.submit(digest.update, chunk) if hasher is not None else None
            f.write(chunk)
            if pending is not None:
                pending.result()

        put(len(encoded).to_bytes(8, "little"))
        put(encoded)
        while entries:
            data: Callable = entries.pop(0)[4]
            put(data())
            del data
    return offset
