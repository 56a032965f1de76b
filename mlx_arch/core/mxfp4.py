"""MXFP4 checkpoints (OCP microscaling FP4, as transformers' gpt-oss releases store their experts) read into MLX's
own `mxfp4` format without requantizing.

Such a checkpoint (config `quantization_config: {"quant_method": "mxfp4", ...}`) stores a weight W (..., out, in) as
  `{name}_blocks` uint8 (..., out, in / 32, 16): FP4 E2M1 codes, two per byte, the even element in the low nibble;
  `{name}_scales` uint8 (..., out, in / 32): E8M0 exponents e, one per 32 inputs, scaling their group by 2**(e - 127).
(transformers' `integrations/mxfp4.py` dequantizes exactly so, then transposes to its (in, out) parameter.)

`mx.quantize(w, group_size=32, bits=4, mode="mxfp4")` keeps the same codes in the same order (eight per uint32, the
first in the lowest nibble: byte for byte the checkpoint's order on little-endian machines) and the same exponents
as uint8 scales (..., out, in / 32). The checkpoint's bytes therefore *are* MLX's weights: a reshape and a view, no
arithmetic, and `mx.dequantize` of them equals transformers' dequantization bit for bit (tests/test_gpt_oss.py).
Requantizing the dequantized values instead would give the same values but not always the same bytes (a stored -0
code comes back as +0), so we never do.

A family that reads such checkpoints lists the format in its Model's `source_formats` (pre-flight accepts only
those) and declares `PackBlocks` + `Move` (scales) rules for the packed tensors; loading then quantizes the layers
that hold `scales` with `mlx_settings(quantization_config)`, as for an MLX-quantized folder.
"""

from typing import Optional

import mlx.core as mx

from .weights import Op, fill, template

MXFP4 = {"group_size": 32, "bits": 4, "mode": "mxfp4"}

# transformers quantization formats whose packed tensors MLX keeps as they are, with the MLX settings reading them.
TRANSFORMERS_FORMATS = {"mxfp4": MXFP4}

BLOCK_BYTES = MXFP4["group_size"] // 2  # 32 four-bit codes per group


def source_format(config: Optional[dict]) -> Optional[str]:
    """The transformers quantization format a checkpoint config declares (`quant_method`), or None: an MLX folder's
    `quantization_config` (our own output, mlx-lm's) has no `quant_method`."""
    config = config or {}
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or "quantization" in config:
        return None
    return quant.get("quant_method")


def mlx_settings(quantization_config: dict) -> dict:
    """The MLX quantization settings that read a transformers-quantized checkpoint's packed layers as they are."""
    method = quantization_config.get("quant_method")
    if method not in TRANSFORMERS_FORMATS:
        raise ValueError(f"quantization format {method!r} cannot be read as MLX weights; readable: "
                         f"{', '.join(TRANSFORMERS_FORMATS)}")
    return dict(TRANSFORMERS_FORMATS[method])


def pack(blocks: mx.array, key: str = "blocks") -> mx.array:
    """Checkpoint blocks (..., G, 16) uint8 -> MLX mxfp4 weight (..., G * 4) uint32: the same bytes."""
    if blocks.dtype != mx.uint8 or blocks.ndim < 2 or blocks.shape[-1] != BLOCK_BYTES:
        raise ValueError(f"{key}: expected MXFP4 blocks (..., groups, {BLOCK_BYTES}) of uint8, got {blocks.dtype} "
                         f"{tuple(blocks.shape)}")
    return blocks.reshape(*blocks.shape[:-2], -1).view(mx.uint32)


def unpack(weight: mx.array, key: str = "weight") -> mx.array:
    """MLX mxfp4 weight (..., G * 4) uint32 -> checkpoint blocks (..., G, 16) uint8 (the inverse of `pack`)."""
    if weight.dtype != mx.uint32:
        raise ValueError(f"{key}: expected a packed mxfp4 weight of uint32, got {weight.dtype}")
    return weight.view(mx.uint8).reshape(*weight.shape[:-1], -1, BLOCK_BYTES)


class PackBlocks(Op):
    """`{...}_blocks` -> an MLX mxfp4 `weight` under a key template (placeholders carried over), bytes unchanged.
    The scales need only a `Move`: MLX keeps them as the checkpoint does. Exactly inverted by `UnpackBlocks`."""

    convert = staticmethod(pack)

    def __init__(self, source: str, target: str):
        self.source, self.target = source, target
        self.regex = template(source)

    def apply(self, w):
        out = {}
        for k, v in w.items():
            m = self.regex.match(k)
            new, value = (fill(self.target, **m.groupdict()), self.convert(v, k)) if m else (k, v)
            if new in out:
                raise ValueError(f"two checkpoint keys map to {new!r}")
            out[new] = value
        return out

    def inverse(self):
        return UnpackBlocks(self.target, self.source)


class UnpackBlocks(PackBlocks):
    """An MLX mxfp4 `weight` back to the checkpoint's `_blocks` layout (the inverse of `PackBlocks`)."""

    convert = staticmethod(unpack)

    def inverse(self):
        return PackBlocks(self.target, self.source)
