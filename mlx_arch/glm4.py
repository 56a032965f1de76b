"""GLM-4 (GLM-4-0414), mirroring transformers/models/glm4/modeling_glm4.py: GLM's attention (q/k/v biases with
`attention_bias`, no o_proj bias, interleaved "traditional" RoPE on the first `partial_rotary_factor` of each head,
0.5 by default), phi3's fused `gate_up_proj` MLP kept fused as mlx-lm keeps it, and "sandwich" blocks: RMSNorms
before and after each sublayer (`input_layernorm` / `post_self_attn_layernorm` around attention,
`post_attention_layernorm` / `post_mlp_layernorm` around the MLP)."""

from dataclasses import dataclass
from typing import Callable, Optional

import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.layers import Attention, Backbone, CausalLM, FusedGateUpMLP, make_rope, rms_norm


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: Optional[int] = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 0.00000015625
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    partial_rotary_factor: float = 0.5  # Glm4Config's default "for BC"
    attention_bias: bool = True

    def __post_init__(self):
        if self.head_dim is None:  # GLM's rotary embedding falls back to this
            self.head_dim = self.hidden_size // self.num_attention_heads


class Glm4DecoderLayer(nn.Module):
    """h = x + post_self_attn(attn(input(x))); out = h + post_mlp(mlp(post_attention(h)))."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, norm: Callable[[], nn.Module]):
        super().__init__()
        self.self_attn, self.mlp = attn, mlp
        self.input_layernorm, self.post_self_attn_layernorm = norm(), norm()
        self.post_attention_layernorm, self.post_mlp_layernorm = norm(), norm()
        self.window = None

    def __call__(self, x, mask=None, cache=None):
        h = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(h)))


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        rope = make_rope(args.head_dim, args.rope_theta, args.rope_scaling, args.partial_rotary_factor,
                         args.max_position_embeddings, traditional=True)
        norm = rms_norm(args.hidden_size, args.rms_norm_eps)
        layers = [
            Glm4DecoderLayer(Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads,
                                       args.head_dim, rope, qkv_bias=args.attention_bias, o_bias=False),
                             FusedGateUpMLP(args.hidden_size, args.intermediate_size, args.hidden_act), norm)
            for _ in range(args.num_hidden_layers)
        ]
        self.model = Backbone(args.vocab_size, args.hidden_size, layers, norm())
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
