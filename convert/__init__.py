"""mlx-convert: Hugging Face checkpoints to validated MLX models."""

from .api import ConvertResult, convert
from .errors import ConvertError
from .plan import ConvertPlan

__all__ = ["convert", "ConvertPlan", "ConvertResult", "ConvertError"]
