"""mlx-convert: Hugging Face checkpoints to validated MLX models."""

from . import blas, heap

blas.load()  # before anything imports mlx.core: a fast BLAS for the gate on Linux CPUs
heap.bound()  # large freed blocks go back to the system: memory bounded by a layer

from .api import ConvertResult, convert
from .errors import ConvertError
from .plan import ConvertPlan

__all__ = ["convert", "ConvertPlan", "ConvertResult", "ConvertError"]
