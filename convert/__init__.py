"""mlx-convert: Hugging Face checkpoints to validated MLX models."""

from . import blas

blas.load()  # before anything imports mlx.core: a fast BLAS for the gate on Linux CPUs

from .api import ConvertResult, convert
from .errors import ConvertError
from .plan import ConvertPlan

__all__ = ["convert", "ConvertPlan", "ConvertResult", "ConvertError"]
