"""StarCoder2, mirroring transformers/models/starcoder2/modeling_starcoder2.py: GQA attention with biases
(`use_bias`), a sliding window on every layer when `sliding_window` is set, LayerNorm and a non-gated
`c_fc`/`c_proj` MLP."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from . import llama
from .core.kinds import LayerKind
from .core.layers import Attention, DenseMLP


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 49152
    hidden_size: int = 3072
    intermediate_size: int = 12288
    num_hidden_layers: int = 30
    num_attention_heads: int = 24
    num_key_value_heads: Optional[int] = 2
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: Optional[int] = 4096
    norm_epsilon: float = 1e-5
    use_bias: bool = True
    tie_word_embeddings: bool = True


class Model(llama.Model):
    def norm(self) -> nn.Module:
        return nn.LayerNorm(self.args.hidden_size, eps=self.args.norm_epsilon)

    def attention(self, index: int, kind: LayerKind) -> Attention:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                         qkv_bias=a.use_bias, o_bias=a.use_bias)

    def mlp(self, index: int) -> nn.Module:
        return DenseMLP(self.args.hidden_size, self.args.intermediate_size, self.args.hidden_act, bias=self.args.use_bias)
