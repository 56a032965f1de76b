"""The typed, frozen description of one conversion: every option validated before any work starts."""

import dataclasses
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
# How codes, scales and biases are chosen (every method writes the same MLX affine format): see convert/calibrate.py.
Q_METHODS = ("rtn", "search", "gptq")
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
    q_method: Optional[str] = None  # None: the default (`method`)
    calibration_file: Optional[Path] = None  # None: the built-in calibration text
    target_bpw: Optional[float] = None  # mixed precision by measured sensitivity within this budget (allocate.py)
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
        if (self.quant_recipe or self.q_mode in FP_MODES or self.target_bpw) and not self.quantize:
            object.__setattr__(self, "quantize", True)  # a recipe, block format or budget is a request to quantize
        if self.quantize:
            bits, group = self._quant_defaults()
            object.__setattr__(self, "q_bits", bits)
            object.__setattr__(self, "q_group_size", group)
        if self.calibration_file is not None:
            object.__setattr__(self, "calibration_file", Path(self.calibration_file))
        self._check()
        object.__setattr__(self, "mlx_path", Path(self.mlx_path or self.default_output()))

    def default_output(self) -> Path:
        """`./<Model>-mlx`, or with the variant: `<Model>-mlx-4bit`, `-mlx-mxfp4`, `-mlx-mixed_4_6`, `-mlx-bf16`."""
        source = Path(self.hf_path)
        name = (source.resolve() if source.is_dir() else source).name or "model"
        variant = self.variant_name
        return Path(f"{name}-mlx-{variant}" if variant else f"{name}-mlx")

    @property
    def variant_name(self) -> Optional[str]:
        """`4bit`, `mxfp4`, `mixed_4_6`, `dequantized`, `bf16`, ...; None for a float output of the source's dtype."""
        if self.quant_recipe:
            return self.quant_recipe
        if self.target_bpw:
            return f"{self.target_bpw:g}bpw"
        if self.quantize:
            return f"{self.q_bits}bit" if self.q_mode == "affine" else self.q_mode
        if self.dequantize:
            return "dequantized"
        return SHORT_DTYPES.get(self.dtype)

    def _quant_defaults(self):
        if self.target_bpw is not None:
            return self._budget_defaults()
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

    def _budget_defaults(self):
        """--target-bpw: the bits entry is the widest uniform width within the budget (the allocation's base)."""
        if self.quant_recipe or self.q_mode != "affine":
            raise ConvertError("--target-bpw chooses affine widths per layer: drop --quant-recipe / --q-mode")
        try:
            target = float(self.target_bpw)
        except (TypeError, ValueError):
            raise ConvertError(f"--target-bpw {self.target_bpw} is not a number of bits per weight") from None
        group = self.q_group_size or 64
        if not AFFINE_BITS[0] < target < 9:
            raise ConvertError(f"--target-bpw {target:g} is outside what affine widths give ({AFFINE_BITS[0]} to 8 "
                               "bits per weight plus scales and biases)")
        object.__setattr__(self, "target_bpw", target)
        fits = [b for b in AFFINE_BITS if b + 32 / group <= target]
        base = fits[-1] if fits else AFFINE_BITS[0]
        if self.q_bits not in (None, base):
            raise ConvertError(f"--target-bpw sets each layer's bits: drop --q-bits {self.q_bits}")
        return base, group

    @property
    def method(self) -> str:
        """The quantization method: --q-method, else gptq for affine quantization below 8 bits (measured on
        SmolLM2-135M, group 64, held-out text: KL to the float model 27% of round-to-nearest's at 4 bits, 31% at 3;
        search 36% and 42%; scripts/bench_quality.py),
        round to nearest at 8 bits, where its error is already negligible, and for the block floating-point formats,
        which only it can write. (`quantize` also keeps round to nearest by default for sources without a tokenizer
        and models with quantized layers that calibration does not handle.)"""
        if self.q_method:
            return self.q_method
        return "gptq" if self.quantize and self.q_mode == "affine" and self.q_bits < 8 else "rtn"

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
            if self.q_method is not None or self.calibration_file is not None:
                raise ConvertError("--q-method and --calibration-file apply only when quantizing: add --quantize (-q)")
            return
        self._check_method()
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

    def _check_method(self):
        if self.q_method is not None and self.q_method not in Q_METHODS:
            raise ConvertError(f"--q-method {self.q_method} is unknown; use one of {', '.join(Q_METHODS)}")
        if self.method != "rtn" and self.q_mode != "affine":
            raise ConvertError(f"--q-method {self.q_method} applies to --q-mode affine only; {self.q_mode} is rounded "
                               "to nearest (--q-method rtn)")
        if self.calibration_file is not None:
            if self.method == "rtn":
                raise ConvertError("--calibration-file needs a calibrated method: --q-method gptq or search")
            if not Path(self.calibration_file).is_file():
                raise ConvertError(f"--calibration-file {self.calibration_file} is not a readable file")

    def describe_method(self, method: str) -> str:
        """`method` and its calibration data as the model card states them."""
        if method == "rtn":
            return "rtn (round to nearest: each group's scale and bias from its minimum and maximum)"
        what = {"gptq": "gptq (error-feedback rounding with Hessians of the calibration activations, layer by layer)",
                "search": "search (per-group clipping chosen to minimise the activation-weighted error)"}[method]
        data = (f"the user's file `{Path(self.calibration_file).name}`" if self.calibration_file else
                "mlx-convert's built-in calibration text v1 (prose, code and chat in 8 languages, Apache-2.0)")
        return f"{what}, calibrated on {data}"

    @property
    def recipe_name(self) -> str:
        if self.quantize and self.target_bpw:
            return f"affine mixed precision within {self.target_bpw:g} bits per weight, group size {self.q_group_size}"
        if self.quantize:
            return self.quant_recipe or f"{self.q_mode} {self.q_bits}-bit, group size {self.q_group_size}"
        return "dequantized" if self.dequantize else "float"


# What --variants replaces (each variant says it); the other options apply to every variant where they mean something.
VARIANT_OWNED = ("quantize", "q_bits", "q_mode", "quant_recipe", "dequantize", "target_bpw")


def variant_plans(flags: dict, specs: str) -> list:
    """One plan per entry of `specs` (--variants, e.g. "bf16,8,6,4"): a float dtype (bf16, fp16, fp32), a bit width
    (affine, --q-group-size or 64), a mixed recipe (mixed_4_6) or a block format (mxfp4, nvfp4, mxfp8). Outputs go to
    `<--mlx-path>-<variant>` (default `./<Model>-mlx-<variant>`) and publish to `<--upload-repo>-<variant>`, or to
    --upload-repo with `{variant}` replaced where it holds that placeholder."""
    names = [s.strip() for s in specs.split(",") if s.strip()]
    if not names:
        raise ConvertError("--variants is empty: give a comma-separated list such as bf16,8,6,4")
    if len(set(names)) != len(names):
        raise ConvertError(f"--variants lists a variant twice: {specs}")
    given = [k for k in VARIANT_OWNED if flags.get(k) not in (None, False, "affine")]
    if given:
        flags_given = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConvertError(f"--variants sets each variant's quantization: drop {flags_given}")
    plans = [_variant(flags, name) for name in names]
    outputs = [p.mlx_path.absolute() for p in plans]
    if len(set(outputs)) != len(outputs):
        raise ConvertError("two variants would write the same folder: list each variant once")
    return plans


def _variant(flags: dict, name: str) -> ConvertPlan:
    dtypes = {**{v: k for k, v in SHORT_DTYPES.items()}, **{d: d for d in DTYPES}}
    quantized = dict(quantize=True, dtype=flags.get("dtype"))
    if name in dtypes:
        options = dict(dtype=dtypes[name], q_group_size=None, q_method=None, calibration_file=None)
    elif name.isdigit():
        options = dict(quantized, q_bits=int(name))
        if int(name) >= 8 and not flags.get("q_method"):
            options["calibration_file"] = None  # rounded to nearest by default: nothing to calibrate
    elif name in RECIPES:
        options = dict(quantized, quant_recipe=name)
    elif name in FP_MODES:
        options = dict(quantized, q_mode=name, q_group_size=None, q_method=None, calibration_file=None)
    else:
        raise ConvertError(f"--variants: {name!r} is not a variant; use float dtypes "
                           f"({', '.join(SHORT_DTYPES.values())}), bit widths ({', '.join(map(str, AFFINE_BITS))}), "
                           f"recipes ({', '.join(RECIPES)}) or block formats ({', '.join(FP_MODES)})")
    plan = ConvertPlan(**{**flags, **options, "mlx_path": None, "upload_repo": None})
    base, repo = flags.get("mlx_path"), flags.get("upload_repo")
    target = Path(f"{base}-{plan.variant_name}") if base else plan.default_output()
    if repo:
        repo = repo.replace("{variant}", plan.variant_name) if "{variant}" in repo else f"{repo}-{plan.variant_name}"
    return dataclasses.replace(plan, mlx_path=target, upload_repo=repo)
