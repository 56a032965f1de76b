"""Arcee (AFM), mirroring transformers/models/arcee/modeling_arcee.py: llama with Nemotron's non-gated MLP
(`up_proj` -> ReLU² by default -> `down_proj`) and no sliding window."""

from dataclasses import dataclass
from typing import Optional

from . import llama, nemotron


@dataclass
class ModelArgs(llama.ModelArgs):
    hidden_size: int = 2560
    intermediate_size: int = 18432
    hidden_act: str = "relu2"
    max_position_embeddings: Optional[int] = 4096
    rms_norm_eps: float = 1e-5
    windowed = False


class Model(llama.Model):
    mlp = nemotron.Model.mlp
