"""OLMoE, mirroring transformers/models/olmoe/modeling_olmoe.py: llama whose attention normalises the whole query
and key projections with RMS norms (OLMo 2's) and then clamps q/k/v to [-clip_qkv, clip_qkv] when set (OLMo's),
with biases on all four projections when `attention_bias`; every layer's MLP is a sparse MoE block (softmax router
over `num_experts`, top `num_experts_per_tok`, renormalised when `norm_topk_prob`; experts of
`intermediate_size`, stored per expert and stacked here). No sliding window."""

from dataclasses import dataclass
from functools import partial
from typing import Optional

from . import llama, olmo, olmo2
from .core.kinds import LayerKind
from .core.moe import RoutedModel, SparseMoE, softmax_topk, stack_experts


@dataclass
class ModelArgs(olmo.ModelArgs):
    hidden_size: int = 2048
    intermediate_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    max_position_embeddings: Optional[int] = 4096
    rms_norm_eps: float = 1e-5
    num_experts: Optional[int] = None
    num_local_experts: Optional[int] = None  # OlmoeConfig's other name for num_experts
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.num_experts is None:
            self.num_experts = self.num_local_experts if self.num_local_experts is not None else 64


class Attention(olmo.ClippedAttention, olmo2.FullProjectionNormAttention):
    """OLMo 2's whole-projection q/k norms, then OLMo's clamping."""


class Model(RoutedModel, llama.Model):
    def attention(self, index: int, kind: LayerKind) -> Attention:
        return Attention(self.args, self.rope, clip=self.args.clip_qkv)

    def mlp(self, index: int) -> SparseMoE:
        a = self.args
        route = partial(softmax_topk, k=a.num_experts_per_tok, normalize=a.norm_topk_prob)
        return SparseMoE(a.hidden_size, a.intermediate_size, a.num_experts, route, a.hidden_act)

    def weight_rules(self) -> list:
        return super().weight_rules() + stack_experts("model.layers.{i}.mlp", self.args.num_experts)
