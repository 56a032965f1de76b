"""Falcon, mirroring transformers/models/falcon/modeling_falcon.py, in all three layouts of its fused
`query_key_value`: the new decoder architecture (GQA with `num_kv_heads`, [q_1..q_g | k | v] per KV head, separate
`ln_attn`/`ln_mlp` or one shared norm), multi-query (falcon-7b: one KV head) and per-head q/k/v. Blocks are parallel
(`parallel_attn`) or sequential; positions are rotary or ALiBi (`alibi`, falcon-rw). mlx-lm has no falcon, so the
weights keep transformers' names.
"""

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .core.base import BaseModelArgs, create_causal_mask
from .core.kinds import LayerKind
from .core.layers import CausalLM, DenseMLP, FusedQKVAttention, NamedBackbone, ResidualBlock, make_rope


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 65024
    hidden_size: int = 4544
    n_embed: Optional[int] = None  # transformers-4 name of hidden_size
    num_hidden_layers: int = 32
    num_attention_heads: int = 71
    num_ln_in_parallel_attn: Optional[int] = None
    layer_norm_epsilon: float = 1e-5
    num_kv_heads: Optional[int] = None
    alibi: bool = False
    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    bias: bool = False
    max_position_embeddings: int = 2048
    ffn_hidden_size: Optional[int] = None
    activation: str = "gelu"
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None

    def __post_init__(self):
        if self.n_embed is not None:
            self.hidden_size = self.n_embed
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_ln_in_parallel_attn is None and self.new_decoder_architecture:
            self.num_ln_in_parallel_attn = 2
        # Combinations whose transformers layers reference norms they never built.
        if self.new_decoder_architecture and not self.parallel_attn:
            raise ValueError("falcon: new_decoder_architecture requires parallel_attn (transformers cannot run it)")
        if self.num_ln_in_parallel_attn == 2 and not self.new_decoder_architecture:
            raise ValueError("falcon: num_ln_in_parallel_attn=2 requires new_decoder_architecture")


def alibi_slopes(n_heads: int) -> mx.array:
    """Per-head ALiBi slopes (geometric, with interleaved extra slopes when n_heads is not a power of two)."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = mx.array(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=mx.float32)
    slopes = mx.power(base, mx.arange(1, closest + 1, dtype=mx.float32))
    if closest != n_heads:
        extra = mx.array(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=mx.float32)
        remaining = min(closest, n_heads - closest)
        slopes = mx.concatenate([slopes, mx.power(extra, mx.arange(1, 1 + 2 * remaining, 2, dtype=mx.float32))])
    return slopes


class Model(CausalLM):
    backbone_name = "transformer"

    @property
    def head_dim(self) -> int:
        return self.args.hidden_size // self.args.num_attention_heads

    def norm(self) -> nn.Module:
        return nn.LayerNorm(self.args.hidden_size, eps=self.args.layer_norm_epsilon)

    @cached_property
    def rope(self):
        a = self.args
        return None if a.alibi else make_rope(self.head_dim, a.rope_theta, a.rope_scaling, 1.0,
                                              a.max_position_embeddings)

    @cached_property
    def slopes(self):
        return alibi_slopes(self.args.num_attention_heads) if self.args.alibi else None

    def attention(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        if a.new_decoder_architecture:
            n_kv, layout = a.num_kv_heads, "groups"
        else:
            n_kv, layout = (1, "blocks") if a.multi_query else (a.num_attention_heads, "heads")
        return FusedQKVAttention(a.hidden_size, a.num_attention_heads, n_kv, self.head_dim, self.rope, layout=layout,
                                 bias=a.bias, names=("query_key_value", "dense"))

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        if not a.parallel_attn:
            norms = ("input_layernorm", "post_attention_layernorm")
        else:
            norms = ("ln_attn", "ln_mlp") if a.num_ln_in_parallel_attn == 2 else ("input_layernorm",)
        mlp = DenseMLP(a.hidden_size, a.ffn_hidden_size, a.activation, bias=a.bias,
                       names=("dense_h_to_4h", "dense_4h_to_h"))
        return ResidualBlock(self.attention(index, kind), mlp, self.norm, norms=norms, parallel=a.parallel_attn,
                             names=("self_attention", "mlp"), kind=kind)

    def backbone(self, layers: list) -> nn.Module:
        return NamedBackbone(self.args.vocab_size, self.args.hidden_size, layers, self.norm(),
                             names=("word_embeddings", "h", "ln_f"))

    def masks(self, h, cache=None, offset: int = 0, kinds=None):
        masks = super().masks(h, cache, offset, kinds)
        if self.slopes is None:
            return masks
        # ALiBi: an additive bias slope_h * key_position (rounded to bfloat16, as transformers computes it), scaled
        # like the scores; shift-invariant per query, so absolute key positions serve for cached decoding too.
        L = h.shape[1]
        positions = mx.arange(offset + L).astype(mx.bfloat16)
        bias = (self.slopes.astype(mx.bfloat16)[:, None] * positions[None]).astype(mx.float32)
        bias = (bias / math.sqrt(self.head_dim))[:, None, :].astype(h.dtype)
        allowed = masks[0]
        if isinstance(allowed, str):
            allowed = create_causal_mask(L, offset)
        elif allowed is None:
            allowed = mx.array(True)
        return [mx.where(allowed, bias, mx.finfo(h.dtype).min)] * len(masks)
