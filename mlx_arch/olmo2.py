"""OLMo 2, mirroring transformers/models/olmo2/modeling_olmo2.py: OLMo with RMSNorm on the whole query and key
projections (over all heads, before splitting into heads) and norms on each sublayer's output instead of its input
(`post_attention_layernorm`, `post_feedforward_layernorm`); no q/k/v clipping."""

from dataclasses import dataclass

import mlx.nn as nn

from . import llama, olmo
from .core.kinds import LayerKind
from .core.layers import Attention, PostNormDecoderLayer


@dataclass
class ModelArgs(olmo.ModelArgs):
    """OLMo's fields and defaults; OLMo-2 adds learnable RMS norms (and transformers ignores clip_qkv for it)."""

    rms_norm_eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        self.clip_qkv = None


class FullProjectionNormAttention(Attention):
    """Attention with `q_norm` / `k_norm` over the full q and k projections rather than per head."""

    def __init__(self, args: ModelArgs, rope):
        super().__init__(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim, rope,
                         qkv_bias=args.attention_bias, o_bias=args.attention_bias)
        self.q_norm = nn.RMSNorm(args.num_attention_heads * args.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(args.num_key_value_heads * args.head_dim, eps=args.rms_norm_eps)

    def project(self, x):
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x)).reshape(B, L, self.n_heads, -1)
        k = self.k_norm(self.k_proj(x)).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


class Model(llama.Model):
    """Llama's RMS norms (not OLMo's parameter-free ones), in OLMo 2's post-norm blocks."""

    def attention(self, index: int, kind: LayerKind) -> Attention:
        return FullProjectionNormAttention(self.args, self.rope)

    def layer(self, index: int, kind: LayerKind) -> PostNormDecoderLayer:
        return PostNormDecoderLayer(self.attention(index, kind), self.mlp(index), self.norm, pre_norms=False,
                                    kind=kind)
