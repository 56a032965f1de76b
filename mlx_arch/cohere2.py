"""Cohere 2 (Command R7B, Command A), mirroring transformers/models/cohere2/modeling_cohere2.py: Cohere's parallel
blocks, interleaved RoPE and scaled logits, with sliding-window attention on the layers `layer_types` marks (three
of every four by default, from `sliding_window_pattern` in older configs); only the sliding layers rotate, the
global layers use no positional encoding (NoPE). head_dim is always hidden_size / heads; no q/k norms."""

from dataclasses import dataclass
from typing import Optional

from . import cohere
from .core.kinds import LayerKind
from .core.layers import Attention, sliding_period


@dataclass
class ModelArgs(cohere.ModelArgs):
    rope_theta: float = 10000.0  # Cohere2Config has no default_theta of its own
    sliding_window: Optional[int] = 4096
    sliding_window_pattern: int = 4
    windowed = True

    def __post_init__(self):
        self.head_dim = None  # Cohere2Config overwrites any stated head_dim
        self.use_qk_norm = False
        super().__post_init__()
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if (i + 1) % self.sliding_window_pattern else "full_attention"
                                for i in range(self.num_hidden_layers)]


class Model(cohere.Model):
    def attention(self, index: int, kind: LayerKind) -> Attention:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                         self.rope if kind.name == "sliding" else None,
                         qkv_bias=a.attention_bias, o_bias=a.attention_bias)

    def export_config(self, config: dict) -> dict:
        # mlx-lm reads an integer pattern, not layer_types, and defaults head_dim to 128
        period = sliding_period(self.args.layer_types[: self.args.num_hidden_layers])
        out = {**config, "head_dim": self.args.head_dim}
        return {**out, "sliding_window_pattern": period} if period else out
