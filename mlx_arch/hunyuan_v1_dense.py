"""Hunyuan dense v1, mirroring transformers/models/hunyuan_v1_dense/modeling_hunyuan_v1_dense.py: llama whose
queries and keys are RMS-normed per head *after* RoPE (`query_layernorm` / `key_layernorm`), an MLP without biases,
and "NTK-alpha" RoPE: a `dynamic` rope_scaling with an `alpha` fixes the base at theta * alpha**(d / (d - 2)),
independent of the sequence length."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from . import llama
from .core.base import rope_config, rope_scaling
from .core.layers import Attention


@dataclass
class ModelArgs(llama.ModelArgs):
    rms_norm_eps: float = 1e-5
    max_position_embeddings: Optional[int] = 2048
    windowed = False

    def __post_init__(self):
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type") == "dynamic" and scaling.get("alpha"):
            if not self.head_dim:
                # transformers computes the alpha base from config.head_dim and fails without it.
                raise ValueError("hunyuan_v1_dense NTK-alpha RoPE needs head_dim in the config")
            self.rope_theta = self.rope_theta * scaling["alpha"] ** (self.head_dim / (self.head_dim - 2))
            self.rope_scaling = None
        super().__post_init__()
        self.mlp_bias = False


class PostRopeNormAttention(Attention):
    """Attention that rotates queries and keys first and RMS-normalises them afterwards."""

    def __init__(self, args: ModelArgs, rope):
        super().__init__(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim, None,
                         qkv_bias=args.attention_bias, o_bias=args.attention_bias)
        self.rotary = rope
        self.query_layernorm = nn.RMSNorm(args.head_dim, eps=args.rms_norm_eps)
        self.key_layernorm = nn.RMSNorm(args.head_dim, eps=args.rms_norm_eps)

    def attend(self, q, k, v, mask, cache):
        offset = cache.offset if cache is not None else 0
        q = self.query_layernorm(self.rotary(q, offset=offset))
        k = self.key_layernorm(self.rotary(k, offset=offset))
        return super().attend(q, k, v, mask, cache)  # rope is None there: no second rotation


class Model(llama.Model):
    def export_config(self, config: dict) -> dict:
        # mlx-lm applies NTK-alpha itself from a transformers-4 `rope_scaling` that names its `type`.
        scaling = rope_scaling(rope_config(config))
        return {**config, "rope_scaling": {**scaling, "type": scaling["rope_type"]}} if scaling else config

    def attention(self, index: int, kind) -> Attention:
        return PostRopeNormAttention(self.args, self.rope)
