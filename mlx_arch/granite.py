"""Granite (IBM Granite 3.x dense), mirroring transformers/models/granite/modeling_granite.py: llama with the
embeddings multiplied by `embedding_multiplier`, each sublayer's output by `residual_multiplier` before the residual
add, `attention_multiplier` as the attention scale (instead of head_dim**-0.5) and the logits divided by
`logits_scaling`."""

from dataclasses import dataclass
from typing import Optional

from . import llama
from .core.kinds import LayerKind
from .core.layers import Attention, DecoderLayer


@dataclass
class ModelArgs(llama.ModelArgs):
    head_dim: Optional[int] = None  # not a GraniteConfig field; llama's attention reads it when a config has one
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    windowed = False


class ScaledResidualLayer(DecoderLayer):
    """Pre-norm block whose sublayer outputs are multiplied by `residual_multiplier` before each residual add."""

    def __init__(self, *args, residual_multiplier: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.residual_multiplier = residual_multiplier

    def __call__(self, x, mask=None, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache) * self.residual_multiplier
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_multiplier


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.embed_scale = args.embedding_multiplier

    def attention(self, index: int, kind: LayerKind) -> Attention:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                         qkv_bias=a.attention_bias, o_bias=a.attention_bias, scale=a.attention_multiplier)

    def layer(self, index: int, kind: LayerKind):
        return ScaledResidualLayer(self.attention(index, kind), self.mlp(index), self.norm, kind,
                                   residual_multiplier=self.args.residual_multiplier)

    def head(self, h):
        return super().head(h) / self.args.logits_scaling
