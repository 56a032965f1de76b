"""Mixtral, mirroring transformers/models/mixtral/modeling_mixtral.py: llama (a sliding window on every layer when
`sliding_window` is set) whose MLP is a sparse MoE block under `block_sparse_moe`: the router `gate` takes a softmax
over all `num_local_experts`, keeps the `num_experts_per_tok` most probable and renormalises them; the experts are
gated MLPs stored per expert as `experts.{e}.w1` (gate), `w3` (up) and `w2` (down), stacked here into
`switch_mlp`. (`router_jitter_noise` only acts in training.)"""

from dataclasses import dataclass
from functools import partial
from typing import Optional

from . import llama
from .core.kinds import LayerKind
from .core.layers import ResidualBlock
from .core.moe import RoutedModel, SparseMoE, softmax_topk, stack_experts


@dataclass
class ModelArgs(llama.ModelArgs):
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_key_value_heads: Optional[int] = 8
    max_position_embeddings: Optional[int] = 4096 * 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    num_local_experts: Optional[int] = None
    num_experts: Optional[int] = None  # MixtralConfig's other name for num_local_experts
    num_experts_per_tok: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.num_local_experts is None:
            self.num_local_experts = self.num_experts if self.num_experts is not None else 8


class Model(RoutedModel, llama.Model):
    def router(self):
        return partial(softmax_topk, k=self.args.num_experts_per_tok, normalize=True)

    def mlp(self, index: int) -> SparseMoE:
        a = self.args
        return SparseMoE(a.hidden_size, a.intermediate_size, a.num_local_experts, self.router(), a.hidden_act)

    def layer(self, index: int, kind: LayerKind) -> ResidualBlock:
        return ResidualBlock(self.attention(index, kind), self.mlp(index), self.norm,
                             names=("self_attn", "block_sparse_moe"), kind=kind)

    def weight_rules(self) -> list:
        names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
        return super().weight_rules() + stack_experts("model.layers.{i}.block_sparse_moe",
                                                      self.args.num_local_experts, names)
