"""Hunyuan MoE v1, mirroring transformers/models/hunyuan_v1_moe/modeling_hunyuan_v1_moe.py: Hunyuan dense v1
(q/k RMS-normed per head after RoPE, NTK-alpha RoPE) whose every MLP is a sparse MoE block: the router `gate.wg`
takes a softmax over `num_experts`, keeps the top `moe_topk` (one count for all layers, or one per layer) and
renormalises them; experts of `intermediate_size` are stored per expert and stacked here; a bias-free shared MLP
`shared_mlp` of `intermediate_size` is added ungated.

mlx-lm has no hunyuan_v1_moe (its `hunyuan` reads the remote-code checkpoints); the names are the checkpoint's, with
the stacked experts under mlx-lm's `switch_mlp`."""

from dataclasses import dataclass
from functools import partial
from typing import Union

from . import hunyuan_v1_dense
from .core.layers import MLP
from .core.moe import NestedGate, RoutedModel, SparseMoE, softmax_topk, stack_experts


@dataclass
class ModelArgs(hunyuan_v1_dense.ModelArgs):
    vocab_size: int = 290943
    num_experts: int = 1
    moe_topk: Union[int, list] = 1

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.num_experts, int):
            raise ValueError("hunyuan_v1_moe with a per-layer num_experts is not supported (transformers builds every "
                             "layer's experts from one count)")

    def top_k(self, index: int) -> int:
        return self.moe_topk if isinstance(self.moe_topk, int) else self.moe_topk[index]


class Model(RoutedModel, hunyuan_v1_dense.Model):
    def mlp(self, index: int) -> SparseMoE:
        a = self.args
        route = partial(softmax_topk, k=a.top_k(index), normalize=True)
        return SparseMoE(a.hidden_size, a.intermediate_size, a.num_experts, route, a.hidden_act,
                         gate=NestedGate(a.hidden_size, a.num_experts, "wg"),
                         shared=MLP(a.hidden_size, a.intermediate_size, a.hidden_act), shared_name="shared_mlp")

    def weight_rules(self) -> list:
        return super().weight_rules() + stack_experts("model.layers.{i}.mlp", self.args.num_experts)
