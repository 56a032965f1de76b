"""mlx-convert: Hugging Face checkpoints to validated MLX models."""

import os
import sys

from . import blas, heap

if os.path.basename(sys.argv[0]) == "mlx-convert":
    heap.rerun_with_huge_pages()  # the command only: glibc's huge-page tunable must be set before the process starts
blas.load()  # before anything imports mlx.core: a fast BLAS for the gate on Linux CPUs
heap.bound()  # large freed blocks go back to the system: memory bounded by a layer

from .api import ConvertResult, convert
from .errors import ConvertError
from .plan import ConvertPlan

__all__ = ["convert", "ConvertPlan", "ConvertResult", "ConvertError"]
