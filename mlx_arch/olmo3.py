"""OLMo 3, mirroring transformers/models/olmo3/modeling_olmo3.py: OLMo 2 (RMS norms over the whole q and k
projections, post-norm blocks) with sliding-window attention on the layers `layer_types` marks (three of every four
by default), each attention kind with its own RoPE (`rope_parameters["sliding_attention"]` / `["full_attention"]`).

Transformers-4 style configs (`rope_theta`, `rope_scaling`) give the full-attention layers both; the sliding layers
keep the default base 500000 and no scaling, as Olmo3Config builds it (mlx-lm gives them `rope_theta`: the same
for every released config)."""

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from . import olmo2
from .core.base import sliding_rope
from .core.kinds import LayerKind
from .core.layers import make_rope

DEFAULT_THETA = 500_000.0


@dataclass
class ModelArgs(olmo2.ModelArgs):
    rope_theta: float = DEFAULT_THETA
    sliding_window: Optional[int] = 4096
    local_rope_theta: float = DEFAULT_THETA
    local_rope_scaling: Optional[dict] = None
    windowed = True

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        args = super().from_dict(config)
        args.local_rope_theta, args.local_rope_scaling = sliding_rope(config, DEFAULT_THETA)
        return args

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types is None:
            self.layer_types = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention"
                                for i in range(self.num_hidden_layers)]


class Model(olmo2.Model):
    @cached_property
    def local_rope(self):
        a = self.args
        return make_rope(a.head_dim, a.local_rope_theta, a.local_rope_scaling, 1.0, a.max_position_embeddings)

    def attention(self, index: int, kind: LayerKind):
        return olmo2.FullProjectionNormAttention(self.args, self.local_rope if kind.name == "sliding" else self.rope)
