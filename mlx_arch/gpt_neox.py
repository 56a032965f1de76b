"""GPT-NeoX (Pythia, ...), mirroring transformers/models/gpt_neox/modeling_gpt_neox.py: partial rotary
(`rotary_pct`, default 0.25), parallel residual (`use_parallel_residual`), a fused `query_key_value` whose output is
interleaved per head ([q | k | v] for each head, kept fused as in mlx-lm), LayerNorm and a non-gated MLP.

mlx-lm keeps the layers as `model.h` and the untied output layer inside the backbone as `model.embed_out`.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.layers import CausalLM, DenseMLP, FusedQKVAttention, NamedBackbone, ResidualBlock, layer_norm, make_rope
from .core.weights import drop, rename

# transformers-4 names that GPTNeoXConfig still reads (rope_scaling / rope_parameters entries take precedence).
_RENAMED = {"rotary_emb_base": "rope_theta", "rotary_pct": "partial_rotary_factor"}


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 50432
    hidden_size: int = 6144
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    intermediate_size: int = 24576
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    use_parallel_residual: bool = True
    attention_bias: bool = True
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    partial_rotary_factor: float = 0.25

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        config = dict(config)
        for old, new in _RENAMED.items():
            if old in config:
                config[new] = config.pop(old)
        return super().from_dict(config)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        dims, heads = args.hidden_size, args.num_attention_heads
        head_dim = dims // heads
        rope = make_rope(head_dim, args.rope_theta, args.rope_scaling, args.partial_rotary_factor,
                         args.max_position_embeddings)
        norm = layer_norm(dims, args.layer_norm_eps)
        layers = [
            ResidualBlock(
                FusedQKVAttention(dims, heads, heads, head_dim, rope, layout="heads", bias=args.attention_bias,
                                  names=("query_key_value", "dense")),
                DenseMLP(dims, args.intermediate_size, args.hidden_act, names=("dense_h_to_4h", "dense_4h_to_h")),
                norm, parallel=args.use_parallel_residual, names=("attention", "mlp"))
            for _ in range(args.num_hidden_layers)
        ]
        extra = {} if args.tie_word_embeddings else {"embed_out": nn.Linear(dims, args.vocab_size, bias=False)}
        self.model = NamedBackbone(args.vocab_size, dims, layers, norm(), names=("embed_in", "h", "final_layer_norm"),
                                   extra=extra)

    @property
    def lm_head(self):
        return self.model.embed_out

    def export_config(self, config: dict) -> dict:
        # mlx-lm reads only the transformers-4 names of the RoPE settings.
        return {**config, "rotary_emb_base": self.args.rope_theta, "rotary_pct": self.args.partial_rotary_factor}

    def weight_rules(self):
        rules = super().weight_rules() + [
            drop(r"\.attention\.(masked_)?bias$"),  # causal-mask buffers of older checkpoints
            rename(r"^gpt_neox\.layers\.", "model.h."),
            rename(r"^gpt_neox\.", "model."),
            rename(r"^embed_out\.", "model.embed_out."),
        ]
        return rules + [drop(r"^model\.embed_out\.")] if self.args.tie_word_embeddings else rules
