"""GPT-NeoX (Pythia, ...), mirroring transformers/models/gpt_neox/modeling_gpt_neox.py: partial rotary
(`rotary_pct`, default 0.25), parallel residual (`use_parallel_residual`), a fused `query_key_value` whose output is
interleaved per head ([q | k | v] for each head, kept fused as in mlx-lm), LayerNorm and a non-gated MLP.

mlx-lm keeps the layers as `model.h` and the untied output layer inside the backbone as `model.embed_out`.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.kinds import LayerKind
from .core.layers import CausalLM, DenseMLP, FusedQKVAttention, NamedBackbone, ResidualBlock
from .core.weights import Drop, Rename

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
    def place_head(self, head):
        if head is not None:  # mlx-lm's layout: the untied head inside the backbone
            self.model.embed_out = head

    @property
    def lm_head(self):
        return self.model.get("embed_out")  # None when tied

    def norm(self) -> nn.Module:
        return nn.LayerNorm(self.args.hidden_size, eps=self.args.layer_norm_eps)

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        dims, heads = a.hidden_size, a.num_attention_heads
        attn = FusedQKVAttention(dims, heads, heads, dims // heads, self.rope, layout="heads", bias=a.attention_bias,
                                 names=("query_key_value", "dense"))
        mlp = DenseMLP(dims, a.intermediate_size, a.hidden_act, names=("dense_h_to_4h", "dense_4h_to_h"))
        return ResidualBlock(attn, mlp, self.norm, parallel=a.use_parallel_residual, names=("attention", "mlp"),
                             kind=kind)

    def backbone(self, layers: list) -> nn.Module:
        return NamedBackbone(self.args.vocab_size, self.args.hidden_size, layers, self.norm(),
                             names=("embed_in", "h", "final_layer_norm"))

    def export_config(self, config: dict) -> dict:
        # mlx-lm reads only the transformers-4 names of the RoPE settings.
        return {**config, "rotary_emb_base": self.args.rope_theta, "rotary_pct": self.args.partial_rotary_factor}

    def weight_rules(self):
        # Drops first, under the checkpoint's names; then renames into mlx-lm's layout.
        drops = [Drop("{*}attention.bias", "{*}attention.masked_bias", why="causal-mask buffers of old checkpoints")]
        if self.args.tie_word_embeddings:
            drops.append(Drop("embed_out.weight", why="tied to the embeddings"))
        return super().weight_rules() + drops + [Rename({
            "gpt_neox.layers.": "model.h.",
            "gpt_neox.embed_in.": "model.embed_in.",
            "gpt_neox.final_layer_norm.": "model.final_layer_norm.",
            "embed_out.": "model.embed_out.",
        })]
