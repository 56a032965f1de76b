"""AFMoE (Arcee's Trinity models), mirroring transformers/models/afmoe/modeling_afmoe.py: blocks that norm both the
input and the output of each sublayer (`input_layernorm` / `post_attention_layernorm` around attention,
`pre_mlp_layernorm` / `post_mlp_layernorm` around the MLP); attention with RMS q/k norms per head and an output gate,
o_proj(attn * sigmoid(gate_proj(x))), whose sliding layers (from `layer_types`, by default all but every
`global_attn_every_n_layers`-th) attend over `sliding_window` tokens and rotate while the global layers use no
positional encoding; embeddings times sqrt(hidden_size) when `mup_enabled`; dense `intermediate_size` MLPs on the
first `num_dense_layers` layers and a MoE block on the others: sigmoid scores over `num_experts`, the top
`num_experts_per_tok` chosen by score + `expert_bias`, weighted by their scores renormalised, times `route_scale`,
plus an ungated shared MLP of moe_intermediate_size * `num_shared_experts`.

Module names are the checkpoint's and mlx-lm's (`mlp.router.gate`, `mlp.expert_bias`, experts stacked under
`mlp.experts`). transformers keeps `expert_bias` in float32: so do we. mlx-lm's afmoe has no attention biases
(`attention_bias`), does not renormalise a single chosen expert and computes SiLU MLPs whatever `hidden_act` says."""

from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .core.kinds import FULL, KindedLayer, LayerKind
from .core.layers import MLP, Attention
from .core.moe import NestedGate, RoutedModel, SparseMoE, sigmoid_topk, stack_experts


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "afmoe"
    vocab_size: int = 200192
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_attention_heads: int = 16
    head_dim: Optional[int] = 128
    max_position_embeddings: Optional[int] = 16384
    rms_norm_eps: float = 1e-5
    moe_intermediate_size: int = 1408
    num_dense_layers: int = 1
    num_experts: int = 64
    num_experts_per_tok: int = 6
    num_shared_experts: int = 2
    route_scale: float = 1.0
    global_attn_every_n_layers: int = 4
    sliding_window: Optional[int] = 1024
    mup_enabled: bool = False

    def __post_init__(self):
        if self.layer_types is None:  # AfmoeConfig's rule
            self.layer_types = ["full_attention" if (i + 1) % self.global_attn_every_n_layers == 0
                                else "sliding_attention" for i in range(self.num_hidden_layers)]
        super().__post_init__()


class GatedOutputAttention(Attention):
    """Attention whose output is gated per channel by sigmoid(gate_proj(x)) before o_proj."""

    def __init__(self, hidden_size: int, n_heads: int, *args, **kwargs):
        super().__init__(hidden_size, n_heads, *args, **kwargs)
        self.gate_proj = nn.Linear(hidden_size, n_heads * self.head_dim, bias=False)

    def __call__(self, x, mask=None, cache=None):
        return self.o_proj(self.attend(*self.project(x), mask, cache) * mx.sigmoid(self.gate_proj(x)))


class SandwichLayer(KindedLayer, nn.Module):
    """h = x + post_attention_layernorm(attn(input_layernorm(x))); h + post_mlp_layernorm(mlp(pre_mlp_layernorm(h)))."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, norm, kind: LayerKind = FULL):
        super().__init__()
        self.self_attn, self.mlp, self.kind = attn, mlp, kind
        for name in ("input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm"):
            self[name] = norm()

    def __call__(self, x, mask=None, cache=None):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.post_mlp_layernorm(self.mlp(self.pre_mlp_layernorm(h)))


class Model(RoutedModel, llama.Model):
    @property
    def embed_scale(self) -> float:
        return self.args.hidden_size**0.5 if self.args.mup_enabled else 1.0

    def attention(self, index: int, kind: LayerKind) -> GatedOutputAttention:
        a = self.args
        rotates = a.layer_types[index] == "sliding_attention"  # even without a window
        return GatedOutputAttention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                    self.rope if rotates else None, qkv_bias=a.attention_bias,
                                    o_bias=a.attention_bias, qk_norm=lambda dims: nn.RMSNorm(dims, eps=a.rms_norm_eps))

    def mlp(self, index: int) -> nn.Module:
        a = self.args
        if index < a.num_dense_layers:
            return super().mlp(index)
        route = partial(sigmoid_topk, k=a.num_experts_per_tok, scaling=a.route_scale, normalize=True)
        return SparseMoE(a.hidden_size, a.moe_intermediate_size, a.num_experts, route, a.hidden_act,
                         shared=MLP(a.hidden_size, a.moe_intermediate_size * a.num_shared_experts, a.hidden_act),
                         shared_name="shared_experts", gate=NestedGate(a.hidden_size, a.num_experts, "gate"),
                         gate_name="router", switch_name="experts", correction_bias="expert_bias")

    def layer(self, index: int, kind: LayerKind) -> SandwichLayer:
        return SandwichLayer(self.attention(index, kind), self.mlp(index), self.norm, kind)

    def weight_rules(self) -> list:
        return super().weight_rules() + stack_experts("model.layers.{i}.mlp", self.args.num_experts,
                                                      switch="experts")

    def cast_predicate(self, path: str) -> bool:
        return super().cast_predicate(path) and not path.endswith(".expert_bias")

    def export_config(self, config: dict) -> dict:
        # mlx-lm's defaults differ from AfmoeConfig's (route_norm aside, which transformers always does): state them.
        a = self.args
        return {**config, "head_dim": a.head_dim, "layer_types": a.layer_types, "num_dense_layers": a.num_dense_layers,
                "route_scale": a.route_scale, "route_norm": True, "mup_enabled": a.mup_enabled,
                "rope_scaling": a.rope_scaling}
