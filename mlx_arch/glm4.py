"""GLM-4 (GLM-4-0414), mirroring transformers/models/glm4/modeling_glm4.py: GLM's attention (q/k/v biases with
`attention_bias`, no o_proj bias, interleaved "traditional" RoPE on the first `partial_rotary_factor` of each head,
0.5 by default), phi3's fused `gate_up_proj` MLP kept fused as mlx-lm keeps it, and "sandwich" blocks: RMSNorms
before and after each sublayer (`input_layernorm` / `post_self_attn_layernorm` around attention,
`post_attention_layernorm` / `post_mlp_layernorm` around the MLP)."""

from dataclasses import dataclass
from typing import Callable, Optional

import mlx.nn as nn

from . import llama
from .core.kinds import FULL, KindedLayer, LayerKind
from .core.layers import Attention, FusedGateUpMLP


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 151552
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_key_value_heads: Optional[int] = 2
    head_dim: Optional[int] = 128
    max_position_embeddings: Optional[int] = 131072
    rms_norm_eps: float = 0.00000015625
    partial_rotary_factor: float = 0.5  # Glm4Config's default "for BC"
    attention_bias: bool = True
    windowed = False


class Glm4DecoderLayer(KindedLayer, nn.Module):
    """h = x + post_self_attn(attn(input(x))); out = h + post_mlp(mlp(post_attention(h)))."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, norm: Callable[[], nn.Module], kind: LayerKind = FULL):
        super().__init__()
        self.self_attn, self.mlp = attn, mlp
        self.input_layernorm, self.post_self_attn_layernorm = norm(), norm()
        self.post_attention_layernorm, self.post_mlp_layernorm = norm(), norm()
        self.kind = kind

    def __call__(self, x, mask=None, cache=None):
        h = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(h)))


class Model(llama.Model):
    rope_traditional = True

    def attention(self, index: int, kind: LayerKind) -> Attention:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                         qkv_bias=a.attention_bias, o_bias=False)

    def mlp(self, index: int) -> nn.Module:
        return FusedGateUpMLP(self.args.hidden_size, self.args.intermediate_size, self.args.hidden_act)

    def layer(self, index: int, kind: LayerKind):
        return Glm4DecoderLayer(self.attention(index, kind), self.mlp(index), self.norm, kind)
