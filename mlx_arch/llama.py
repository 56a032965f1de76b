"""Llama, mirroring transformers/models/llama/modeling_llama.py, and the parent of every llama-shaped family.

Also covers per-layer sliding-window attention (`layer_types` + `sliding_window`), which transformers' llama does
not have but which Llama-shaped checkpoints of other families (and mlx-lm's llama) use.

Families that differ from llama in a part override one hook: `norm()`, `rope()`, `attention(index, kind)`,
`mlp(index)` or `layer(index, kind)`.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.kinds import LayerKind
from .core.layers import MLP, Attention, CausalLM, DecoderLayer, default_head_dim


@dataclass
class ModelArgs(BaseModelArgs):
    """LlamaConfig's fields and defaults; subclasses change defaults and add their own fields."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: Optional[int] = 2048
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    layer_types: Optional[list] = None
    # False for families whose transformers model has no sliding window: a stray `sliding_window` key is ignored.
    windowed = True

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = default_head_dim(self)
        if not self.windowed:
            self.sliding_window = None


class Model(CausalLM):
    def norm(self) -> nn.Module:
        return nn.RMSNorm(self.args.hidden_size, eps=self.args.rms_norm_eps)

    def attention(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                         qkv_bias=a.attention_bias, o_bias=a.attention_bias)

    def mlp(self, index: int) -> nn.Module:
        a = self.args
        return MLP(a.hidden_size, a.intermediate_size, a.hidden_act, a.mlp_bias)

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        return DecoderLayer(self.attention(index, kind), self.mlp(index), self.norm, kind)
