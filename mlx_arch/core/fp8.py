"""FP8 block-scaled checkpoints (DeepSeek-V3, Kimi-K2 and the many `-FP8` releases) read as floats.

Such a checkpoint (config `quantization_config: {"quant_method": "fp8", "weight_block_size": [bm, bn], ...}`) stores
a Linear weight W (..., out, in) as
  `{name}`            float8_e4m3fn codes (safetensors F8_E4M3, which `mx.load` reads as their uint8 bytes);
  `{name}_scale_inv`  float32 (..., ceil(out / bm), ceil(in / bn)): one scale per block, the last block of a row or
                      column ragged when out or in is not a multiple of the block;
so that W[..., r, c] = e4m3(W)[..., r, c] * scale_inv[..., r // bm, c // bn] (a scalar scale_inv, one per tensor,
when `weight_block_size` is null). Modules listed in `modules_to_not_convert` (the head, MoE routers) are stored in
float without a scale: the dtype says which is which. `activation_scale` tensors (static activation scheme) serve
only FP8 matmuls and are dropped, as transformers drops them when it dequantizes.

MLX computes these layers in float or in its own quantized formats, so every FP8 weight is dequantized on load
(`DequantizeFP8`, lazily: a tensor is computed when it is saved), then cast or quantized as asked. The semantics are
those of transformers' FP8Linear (its kernels and `_dequantize_fp8_weight`, blocks from the config, ragged last
blocks); transformers' load-time `Fp8Dequantize` (`from_pretrained` without FP8 kernels) instead derives the block
from the scale grid, which refuses or mis-scales ragged blocks (tests/test_fp8_source.py).
"""

from typing import Optional

import mlx.core as mx

from .weights import Identity, Op

FORMAT = "fp8"
STORED = "F8_E4M3"  # the safetensors dtype of the codes
SCALE = "_scale_inv"  # `X.weight` -> `X.weight_scale_inv`, `X.gate_up_proj` -> `X.gate_up_proj_scale_inv`
DROPPED = "activation_scale"


def is_source(config: Optional[dict]) -> bool:
    """Whether a checkpoint config declares FP8 block-scaled weights (an MLX folder's `quantization_config`, our
    own output's or mlx-lm's, has no `quant_method`)."""
    config = config or {}
    quant = config.get("quantization_config")
    return isinstance(quant, dict) and quant.get("quant_method") == FORMAT and "quantization" not in config


def block_size(quantization_config: dict) -> Optional[tuple]:
    """(rows, columns) of a scale block, None for one scale per tensor; ValueError for what cannot be read."""
    scale_fmt, experts = quantization_config.get("scale_fmt", "float"), quantization_config.get("expert_dtype", "fp8")
    if scale_fmt != "float" or experts != "fp8":
        raise ValueError(f"FP8 quantization_config with scale_fmt {scale_fmt!r} and expert_dtype {experts!r} is not "
                         "readable (only float block scales and FP8 experts, as DeepSeek-V3 stores them)")
    fmt = quantization_config.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"FP8 quantization_config fmt {fmt!r} is not readable (only e4m3)")
    block = quantization_config.get("weight_block_size", (128, 128))
    if block is None:
        return None
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"FP8 quantization_config weight_block_size {block!r} is not two positive integers")
    return tuple(block)


def scale_shape(shape: tuple, block: Optional[tuple]) -> tuple:
    """The shape of the scales of a weight of `shape`: one per block, a ragged last block counting as one."""
    if block is None:
        return ()
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def dequantize(codes: mx.array, scale_inv: mx.array, block: Optional[tuple]) -> mx.array:
    """float32 weight of e4m3 `codes` (uint8) and their block scales (lazy, like its inputs)."""
    w = mx.from_fp8(codes, dtype=mx.float32)
    scale = scale_inv.astype(mx.float32)
    if block is None:
        return w * scale.reshape(())
    *lead, rows, cols = w.shape
    (bm, bn), (nr, nc) = block, scale.shape[-2:]
    ragged = (nr * bm - rows, nc * bn - cols)
    if any(ragged):  # pad to whole blocks (cut off again below)
        w = mx.pad(w, [(0, 0)] * len(lead) + [(0, ragged[0]), (0, ragged[1])])
    # Scale each block by broadcasting: no weight-sized copy of the scales.
    w = (w.reshape(*lead, nr, bm, nc, bn) * scale[..., :, None, :, None]).reshape(*lead, nr * bm, nc * bn)
    return w[..., :rows, :cols] if any(ragged) else w


class DequantizeFP8(Op):
    """Every FP8 weight (the keys `stored` as F8_E4M3) times its block scales; the scales and activation scales are
    consumed. Applied by the loader to any family's FP8 checkpoint, before the family's own rules. ValueError naming
    the tensor for a missing scale, a scale of the wrong shape, or a scale without an FP8 weight."""

    lossy = True  # the FP8 codes are not given back: the inverse is the float weight itself

    def __init__(self, block: Optional[tuple], stored: set):
        self.block, self.stored = block, set(stored)

    def apply(self, w):
        out = {}
        for key, value in w.items():
            if key.endswith(DROPPED):
                continue
            if key.endswith(SCALE):
                if key[: -len(SCALE)] not in self.stored:
                    raise ValueError(f"{key} scales {key[: -len(SCALE)]}, which is not an FP8 tensor of the checkpoint")
                continue
            out[key] = self.dequantized(key, value, w) if key in self.stored else value
        return out

    def dequantized(self, key, codes, w):
        scale = w.get(key + SCALE)
        if scale is None:
            raise ValueError(f"{key} is stored in FP8 but its scales {key + SCALE} are missing")
        expected = scale_shape(tuple(codes.shape), self.block)
        if tuple(scale.shape) != expected and not (self.block is None and scale.size == 1):
            blocks = "one per tensor" if self.block is None else f"{self.block[0]}x{self.block[1]} blocks"
            raise ValueError(f"{key + SCALE} has shape {tuple(scale.shape)}; {key} {tuple(codes.shape)} in {blocks} "
                             f"needs {expected}")
        return dequantize(codes, scale, self.block)

    def dropped(self, key):
        return key.endswith((SCALE, DROPPED))

    def inverse(self):
        return Identity()
