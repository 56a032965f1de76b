"""MiniMax-M2, mirroring transformers/models/minimax_m2/modeling_minimax_m2.py: llama without biases whose attention
RMS-normalises the whole query and key projections (OLMo 2's `q_norm` / `k_norm`), with partial RoPE (the
`partial_rotary_factor` of `rope_parameters`, or the released checkpoints' `rotary_dim` / head_dim), no sliding
window, and Mixtral's MoE layout (`block_sparse_moe`, experts `w1`/`w3`/`w2` stacked here) routed DeepSeek-V3 style:
sigmoid scores, the top `num_experts_per_tok` chosen by score + `e_score_correction_bias`, weighted by their
scores renormalised. (`router_jitter_noise` only acts in training.)

mlx-lm (its `minimax`) requires `rotary_dim` and `shared_intermediate_size`, which transformers 5 does not write:
the export adds them."""

from dataclasses import dataclass
from functools import partial
from typing import Optional

from . import llama, olmo2
from .core.kinds import LayerKind
from .core.layers import ResidualBlock
from .core.moe import RoutedModel, SparseMoE, sigmoid_topk, stack_experts


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 200064
    hidden_size: int = 3072
    intermediate_size: int = 1536
    num_hidden_layers: int = 62
    num_attention_heads: int = 48
    num_key_value_heads: Optional[int] = 8
    head_dim: Optional[int] = 128
    max_position_embeddings: Optional[int] = 196608
    rope_theta: float = 5000000.0  # MiniMaxM2Config.default_theta
    partial_rotary_factor: Optional[float] = None
    rotary_dim: Optional[int] = None
    num_local_experts: int = 256
    num_experts_per_tok: int = 8
    windowed = False

    def __post_init__(self):
        super().__post_init__()
        if self.partial_rotary_factor is None:
            self.partial_rotary_factor = self.rotary_dim / self.head_dim if self.rotary_dim else 1.0
        self.attention_bias = self.mlp_bias = False


class Model(RoutedModel, llama.Model):
    def attention(self, index: int, kind: LayerKind) -> olmo2.FullProjectionNormAttention:
        return olmo2.FullProjectionNormAttention(self.args, self.rope)

    def mlp(self, index: int) -> SparseMoE:
        a = self.args
        route = partial(sigmoid_topk, k=a.num_experts_per_tok, normalize=True)
        return SparseMoE(a.hidden_size, a.intermediate_size, a.num_local_experts, route, a.hidden_act,
                         correction_bias="e_score_correction_bias")

    def layer(self, index: int, kind: LayerKind) -> ResidualBlock:
        return ResidualBlock(self.attention(index, kind), self.mlp(index), self.norm,
                             names=("self_attn", "block_sparse_moe"), kind=kind)

    def export_config(self, config: dict) -> dict:
        a = self.args
        return {"shared_intermediate_size": 0, **config, "rotary_dim": int(a.head_dim * a.partial_rotary_factor)}

    def weight_rules(self) -> list:
        names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
        return super().weight_rules() + stack_experts("model.layers.{i}.block_sparse_moe", self.args.num_local_experts,
                                                      names)
