"""The typed, frozen description of one conversion: every option validated before any work starts."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import ConvertError

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
# Floating-point block formats fix their bits and group size.
FP_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
DTYPES = ("float16", "bfloat16", "float32")
# Mixed recipes: (bits for most layers, bits for sensitive layers).
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6), "mixed_4_8": (4, 8)}
GB = 1 << 30
SHORT_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class ConvertPlan:
    hf_path: str
    mlx_path: Optional[Path] = None  # None: `default_output()`
    revision: Optional[str] = None
    quantize: bool = False
    q_bits: Optional[int] = None
    q_group_size: Optional[int] = None
    q_mode: str = "affine"
    quant_recipe: Optional[str] = None
    dtype: Optional[str] = None
    dequantize: bool = False
    upload_repo: Optional[str] = None
    private: bool = False
    skip_validation: bool = False
    dry_run: bool = False
    max_shard_size: int = 5 * GB
    overwrite: bool = False
    endpoint: Optional[str] = None
    token: Optional[str] = field(default=None, repr=False)  # never printed

    def __post_init__(self):
        if (self.quant_recipe or self.q_mode in FP_MODES) and not self.quantize:
            object.__setattr__(self, "quantize", True)  # a recipe or a block format is a request to quantize
        if self.quantize:
            bits, group = self._quant_defaults()
            object.__setattr__(self, "q_bits", bits)
            object.__setattr__(self, "q_group_size", group)
        self._check()
        object.__setattr__(self, "mlx_path", Path(self.mlx_path or self.default_output()))

    def default_output(self) -> Path:
        """`./<Model>-mlx`, or with the variant: `<Model>-mlx-4bit`, `-mlx-mxfp4`, `-mlx-mixed_4_6`, `-mlx-bf16`."""
        source = Path(self.hf_path)
        name = (source.resolve() if source.is_dir() else source).name or "model"
        if self.quant_recipe:
            variant = self.quant_recipe
        elif self.quantize:
            variant = f"{self.q_bits}bit" if self.q_mode == "affine" else self.q_mode
        elif self.dequantize:
            variant = "dequantized"
        else:
            variant = SHORT_DTYPES.get(self.dtype)
        return Path(f"{name}-mlx-{variant}" if variant else f"{name}-mlx")

    def _quant_defaults(self):
        if self.q_mode in FP_MODES:
            bits, group = FP_MODES[self.q_mode]
            if self.q_bits not in (None, bits) or self.q_group_size not in (None, group):
                raise ConvertError(f"--q-mode {self.q_mode} fixes {bits} bits and group size {group}")
            return bits, group
        if self.quant_recipe in RECIPES:
            low, high = RECIPES[self.quant_recipe]
            if self.q_bits not in (None, low):
                raise ConvertError(f"--quant-recipe {self.quant_recipe} sets the bits ({low} and {high}): drop "
                                   f"--q-bits {self.q_bits}")
            return low, self.q_group_size or 64
        return self.q_bits or 4, self.q_group_size or 64

    def _check(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConvertError(f"--dtype {self.dtype} is not one of {', '.join(DTYPES)}")
        if self.quantize and self.dequantize:
            raise ConvertError("--quantize and --dequantize exclude each other: choose one")
        if self.max_shard_size <= 0:
            raise ConvertError("--max-shard-size must be positive")
        if not self.quantize:
            if self.q_bits is not None or self.q_group_size is not None:
                raise ConvertError("--q-bits and --q-group-size apply only when quantizing: add --quantize (-q)")
            return
        if self.q_mode in FP_MODES:
            if self.quant_recipe:
                raise ConvertError("mixed recipes apply to --q-mode affine only")
            return
        if self.q_mode != "affine":
            raise ConvertError(f"--q-mode {self.q_mode} is unknown; use affine, {', '.join(FP_MODES)}")
        if self.q_bits not in AFFINE_BITS:
            raise ConvertError(f"--q-bits {self.q_bits} is not supported; use one of {AFFINE_BITS}")
        if self.q_group_size not in GROUP_SIZES:
            raise ConvertError(f"--q-group-size {self.q_group_size} is not supported; use one of {GROUP_SIZES}")
        if self.quant_recipe and self.quant_recipe not in RECIPES:
            raise ConvertError(f"--quant-recipe {self.quant_recipe} is unknown; use one of {', '.join(RECIPES)}")

    @property
    def recipe_name(self) -> str:
        if self.quantize:
            return self.quant_recipe or f"{self.q_mode} {self.q_bits}-bit, group size {self.q_group_size}"
        return "dequantized" if self.dequantize else "float"
