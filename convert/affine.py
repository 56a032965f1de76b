"""MLX's affine quantization format computed in torch, byte for byte: rounding (what `mx.quantize` writes) and
dequantization (what `mx.dequantize` gives).

MLX's CPU kernels for both run one scalar loop on one thread: on the x86 CPUs Linux release engineers convert on,
rounding was two thirds of a 4-bit conversion's time, and dequantizing a 1.1B model took 6 s, twice per gate. The
same arithmetic as torch's vectorised operations, a block of rows at a time (it stays in cache), on a worker thread
per core, gives identical bytes faster (measured on one thread: 4-bit rounding 28 ms against 40 ms for a 5632x2048
weight; the 1.1B model dequantized in 1.0 s on two threads against 6.3 s):

- rounding, per group: the range [min, max] split into 2**bits - 1 steps, its edge of larger magnitude kept exact
  (scale = edge / round(edge / step), bias = edge), codes rint((w - bias) / scale) clamped, all in float32 with the
  same IEEE operations in the same order; scales and biases then rounded to the weight's dtype;
- dequantization: code * scale rounded to the scales' dtype, then + bias rounded again (one rounding per
  operation, as MLX computes it), made float32.

Both are tested against MLX for every width, group size and float dtype. A tensor holding NaN or infinity (or whose
range overflows float32) is left to MLX (`round_affine` gives None), whose kernel skips NaN in the range where
torch would propagate it. `Rounding` is one layer's job as save runs it (`save.Lookahead`); save uses it only where
torch is imported anyway (the gate and calibration need it: importing it costs a second and 200 MB).
"""

import contextlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import mlx.core as mx
import numpy as np

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = ("bfloat16", "float16", "float32")
BLOCK = 1 << 18  # float32 elements rounded at a time (1 MiB: in cache, and few enough operations per block)


ROUNDED_BITS = (2, 4, 8)  # 3, 5 and 6 bits: torch's packing of codes across bytes is slower than MLX's kernel


def applies(weight, params: dict) -> bool:
    """Whether save rounds `weight` (an MLX array) with `params` in torch (`round_affine` computes any of BITS)."""
    return (params.get("mode", "affine") == "affine" and params["bits"] in ROUNDED_BITS
            and params["group_size"] in GROUP_SIZES and weight.ndim == 2
            and str(weight.dtype).rpartition(".")[2] in DTYPES and weight.shape[-1] % params["group_size"] == 0)


def round_affine(w, bits: int, group_size: int, out: Optional[tuple] = None) -> Optional[tuple]:
    """(packed codes as uint32 (rows, cols * bits / 32), scales, biases (rows, cols / group_size) in w's dtype), as
    numpy arrays (the float16/bfloat16 ones as uint16 bit patterns), of the torch tensor `w` (rows, cols); None when
    a group is not finite. `out`: torch tensors (packed codes as uint8, scales, biases) to fill instead."""
    import torch

    rows, cols = w.shape
    groups = cols // group_size
    step = max(1, min(rows, BLOCK // cols))
    block = torch.empty(step * cols, dtype=torch.float32)
    codes = torch.empty(step * cols, dtype=torch.uint8)
    packed, scales, biases = out or (torch.empty(rows, cols * bits // 8, dtype=torch.uint8),
                                     torch.empty(rows, groups, dtype=w.dtype), torch.empty(rows, groups, dtype=w.dtype))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        x = block[: n * cols].view(n, groups, group_size).copy_(w[start : start + n].view(n, groups, group_size))
        params = group_params(x, bits)
        if params is None:
            return None
        scale, bias = params
        x.sub_(bias[..., None]).div_(scale[..., None]).round_().clamp_(0, 2**bits - 1)
        c = codes[: n * cols].view(n, cols).copy_(x.view(n, cols))
        pack_into(packed[start : start + n], c, bits)
        scales[start : start + n].copy_(scale)
        biases[start : start + n].copy_(bias)
    return packed.numpy().view(np.uint32), as_numpy(scales), as_numpy(biases)


def as_numpy(t) -> np.ndarray:
    """A torch float tensor as numpy, float16 and bfloat16 as their uint16 bit patterns (numpy has no bfloat16)."""
    import torch

    return t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy().view(np.uint16)


def group_params(x, bits: int):
    """(scale, bias) per group of the float32 block `x` (..., group) as MLX's kernel computes them (in float32,
    the scale signed so that the edge of larger magnitude is exactly a code); None when a group is not finite."""
    import torch

    hi, lo = x.amax(-1), x.amin(-1)
    if not (torch.isfinite(hi).all() and torch.isfinite(lo).all()):
        return None
    low_edge = lo.abs() > hi.abs()
    step = (hi - lo).div_(2**bits - 1).clamp_min_(1e-7)
    if not torch.isfinite(step).all():
        return None
    scale = torch.where(low_edge, step, -step)
    edge = torch.where(low_edge, lo, hi)
    q0 = (edge / scale).round_()
    exact = q0 != 0
    return torch.where(exact, edge / q0, scale), torch.where(exact, edge, 0.0)


def pack_into(out, codes, bits: int):
    """MLX's packed layout of the uint8 codes (rows, cols) into the uint8 rows `out` (each row one little-endian bit
    stream): 2, 4 and 8 bits by shifting neighbouring bytes of an integer view together, 3, 5 and 6 bits through
    integers holding a whole number of bytes."""
    import torch

    if bits == 8:
        out.copy_(codes)
    elif bits == 4:
        pairs = codes.view(torch.int16)  # byte 2k + 1 lands on bits 4-7 of byte 2k
        out.copy_(torch.bitwise_or(pairs, pairs >> 4).view(out.shape))
    elif bits == 2:
        quads = codes.view(torch.int32)
        quads = quads | (quads >> 6)  # byte 1 onto bits 2-3 of byte 0, byte 3 onto bits 2-3 of byte 2
        out.copy_((quads | (quads >> 12)).view(out.shape))  # byte 2's four bits onto bits 4-7 of byte 0
    else:
        rows, cols = codes.shape
        per, width, kind = byte_groups(bits)
        parts = codes.view(rows, cols // per, per).to(kind)
        stream = parts[..., 0].clone()
        for j in range(1, per):
            stream |= parts[..., j] << (j * bits)
        octets = out.view(rows, cols // per, width)
        for k in range(width):
            octets[..., k].copy_(stream >> (8 * k))  # the cast to uint8 keeps the low byte


def byte_groups(bits: int) -> tuple:
    """(codes, bytes, torch integer type holding them) of the smallest run of 3-, 5- or 6-bit codes that fills whole
    bytes: 8 codes in 3 or 5 bytes, 4 six-bit codes in 3 (24-bit runs fit int32, 40-bit ones need int64)."""
    import torch

    per = 4 if bits == 6 else 8
    width = per * bits // 8
    return per, width, torch.int32 if width <= 3 else torch.int64


def dequantize(packed, scales, biases, bits: int, group_size: int, out=None):
    """float32 torch tensor (rows, cols) of MLX's affine dequantization of `packed` (uint8 torch bytes, rows x
    cols * bits / 8) with `scales` and `biases` (torch, rows x cols / group_size, in the stored dtype), into `out`
    when given (memory already touched is several times faster to fill than fresh pages): row blocks on the worker
    threads."""
    import torch

    rows = packed.shape[0]
    if out is None:
        out = torch.empty(rows, packed.shape[1] * 8 // bits, dtype=torch.float32)
    step = -(-rows // workers())
    with single_threaded():
        jobs = [_pool().submit(_dequantize_rows, out[i : i + step], packed[i : i + step], scales[i : i + step],
                               biases[i : i + step], bits, group_size) for i in range(0, rows, step)]
        for job in jobs:
            job.result()
    return out


def _dequantize_rows(out, packed, scales, biases, bits: int, group_size: int):
    rows, cols = out.shape
    groups = cols // group_size
    step = max(1, min(rows, BLOCK // cols))
    dtype, scales, biases = scales.dtype, scales.float(), biases.float()
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = out[start:stop]
        unpack_into(block, packed[start:stop], bits)
        x = block.view(stop - start, groups, group_size)
        stored_round(x.mul_(scales[start:stop, :, None]), dtype)
        stored_round(x.add_(biases[start:stop, :, None]), dtype)


def unpack_into(out, packed, bits: int):
    """The codes of the uint8 rows `packed` (each row one little-endian bit stream) into the float32 rows `out`."""
    import torch

    rows, cols = out.shape
    mask = (1 << bits) - 1
    if bits == 8:
        out.copy_(packed)
    elif 8 % bits == 0:
        per = 8 // bits
        slots = out.view(rows, cols // per, per)
        for j in range(per):
            slots[..., j].copy_((packed >> (j * bits)) & mask)
    else:
        per, width, kind = byte_groups(bits)
        octets = packed.view(rows, cols // per, width).to(kind)
        stream = octets[..., 0].clone()
        for k in range(1, width):
            stream |= octets[..., k] << (8 * k)
        slots = out.view(rows, cols // per, per)
        for j in range(per):
            slots[..., j].copy_((stream >> (j * bits)) & mask)


def stored_round(x, dtype):
    """The float32 tensor `x` rounded in place to what `dtype` stores (torch's casts round to nearest even, as MLX's
    do), still float32."""
    import torch

    if dtype in (torch.bfloat16, torch.float16):
        x.copy_(x.to(dtype))
    return x


def quantized_layer(module) -> bool:
    """Whether `dequantized_layer` computes the weight of this quantized MLX module (a linear or embedding layer in
    the affine format, with biases)."""
    return (getattr(module, "mode", "affine") == "affine" and getattr(module, "bits", None) in BITS
            and module.get("biases") is not None and module.weight.ndim == 2
            and getattr(module, "group_size", None) in GROUP_SIZES)


def dequantized_layer(module, out=None):
    """The float32 torch weight of a `quantized_layer` module (its arrays are read here)."""
    return dequantize(torch_view(module.weight), torch_view(module.scales), torch_view(module.biases), module.bits,
                      module.group_size, out)


def torch_view(array):
    """An evaluated MLX array's buffer as a torch tensor, without a copy: integer arrays as bytes, bfloat16 and
    float16 in their dtype (numpy has no bfloat16: the bits go through as uint16)."""
    import torch

    if array.dtype in (mx.bfloat16, mx.float16):
        kind = torch.bfloat16 if array.dtype == mx.bfloat16 else torch.float16
        return torch.from_numpy(np.asarray(array.view(mx.uint16))).view(kind)
    values = np.asarray(array)
    return torch.from_numpy(values.view(np.uint8) if values.dtype.kind in "iu" else values)


class Rounding:
    """One quantized layer as save computes it: `start()` reads the source weight (MLX, on the calling thread) and
    rounds its row blocks on the worker threads; `part(k)` gives the weight, scales or biases as numpy bytes. Falls
    back to MLX's own lazy quantization (`likes`, same bytes) while torch is still being imported, or for a source
    that is not finite."""

    def __init__(self, source, bits: int, group_size: int, likes: tuple):
        self.source, self.bits, self.group_size, self.likes = source, bits, group_size, list(likes)
        self.futures, self.parts, self.out, self.used_torch = None, None, None, False

    def start(self):
        if self.futures is not None or self.parts is not None:
            return
        if not torch_ready():
            self.futures, self.source = [], None
            mx.async_eval(self.likes)
            return
        import torch

        source = mx.contiguous(self.source)
        mx.eval(source)
        w = torch_view(source)
        self.source = None  # the bytes live in `w` until the workers are done
        lower_threads()  # until the shard is written (`threads_restored`)
        rows, cols = w.shape
        self.out = (torch.empty(rows, cols * self.bits // 8, dtype=torch.uint8),
                    torch.empty(rows, cols // self.group_size, dtype=w.dtype),
                    torch.empty(rows, cols // self.group_size, dtype=w.dtype))
        step = -(-rows // workers())  # each worker fills its rows of `out`
        self.futures = [_pool().submit(round_affine, w[i : i + step], self.bits, self.group_size,
                                       tuple(t[i : i + step] for t in self.out)) for i in range(0, rows, step)]
        self.used_torch = True

    def part(self, k: int) -> np.ndarray:
        """The weight (k = 0), scales (1) or biases (2), as numpy (float16/bfloat16 as uint16 bit patterns)."""
        if self.parts is None:
            self.start()
            blocks = [f.result() for f in self.futures]
            self.futures = None
            if blocks and all(b is not None for b in blocks):
                packed, scales, biases = self.out
                self.parts = [packed.numpy().view(np.uint32), as_numpy(scales), as_numpy(biases)]
            else:  # torch was not ready, or the source is not finite: MLX's kernel
                mx.eval(self.likes)
                self.parts = [np.asarray(a if a.dtype in (mx.uint32, mx.float32) else a.view(mx.uint16))
                              for a in self.likes]
                self.used_torch = False
            self.likes = self.out = None
        return self.parts[k]


class Deferred:
    """Stands for one of a `Rounding` layer's arrays in the weights dict save writes: the shape, dtype and size of
    MLX's lazy array it replaces, the bytes from the job."""

    def __init__(self, job: Rounding, index: int, like):
        self.job, self.index = job, index
        self.shape, self.dtype, self.nbytes = like.shape, like.dtype, like.nbytes


def workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


_POOL: list = []


def _pool() -> ThreadPoolExecutor:
    """Worker threads for the row blocks (torch releases the GIL while it computes)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(workers(), thread_name_prefix="mlx-convert-rounding"))
    return _POOL[0]


_IMPORT: list = []  # the thread importing torch (`preload`)
_THREADS: list = []  # torch's intra-op thread count before `lower_threads`


def preload():
    """Import torch on a thread (a second of CPU, 200 MB of libraries): for a run that imports it later anyway (the
    gate), so that save rounds in torch; the first layers are rounded by MLX meanwhile."""
    if not _IMPORT and "torch" not in sys.modules:
        thread = threading.Thread(target=lambda: __import__("torch"), name="mlx-convert-import-torch", daemon=True)
        _IMPORT.append(thread)
        thread.start()


def torch_ready() -> bool:
    """Whether torch is imported (and not still being imported by `preload`)."""
    return "torch" in sys.modules and not (_IMPORT and _IMPORT[0].is_alive())


def lower_threads() -> bool:
    """Each worker computes on its own thread: torch's intra-op threads (OpenMP) would spin against them. True when
    this call lowered them (`restore_threads` undoes it)."""
    import torch

    if _THREADS:
        return False
    _THREADS.append(torch.get_num_threads())
    torch.set_num_threads(1)
    return True


def restore_threads():
    if _THREADS:
        import torch

        torch.set_num_threads(_THREADS.pop())


@contextlib.contextmanager
def single_threaded():
    lowered = lower_threads()
    try:
        yield
    finally:
        if lowered:
            restore_threads()


@contextlib.contextmanager
def threads_restored():
    """Around a shard: torch's thread count, lowered by its `Rounding` jobs, is restored once they are written."""
    try:
        yield
    finally:
        restore_threads()
