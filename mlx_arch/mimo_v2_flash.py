"""MiMo-V2-Flash, mirroring transformers/models/mimo_v2_flash/modeling_mimo_v2_flash.py: llama's pre-norm blocks whose
attention has values of their own head size (`v_head_dim`), scaled by `attention_value_scale` before attending, and
RoPE on the first int(head_dim * partial_rotary_factor) channels with a base and factor per layer type
(`rope_parameters["full_attention" | "sliding_attention"]`). The sliding layers (from `layer_types`, by default all
but the first and every sixth) attend over `sliding_window` tokens with twice `num_key_value_heads` and a learned
sink logit per head (`attention_sink_bias`, transformers' `sinks`); dense `intermediate_size` MLPs where
`mlp_layer_types` says (by default the first layer) and elsewhere DeepSeek-V3 routing without shared experts:
sigmoid scores over `n_routed_experts`, the top `num_experts_per_tok` chosen by score + `gate.e_score_correction_bias`
within the `topk_group` best of `n_group` groups, renormalised when `norm_topk_prob`, times `routed_scaling_factor`.

MiMoV2FlashConfig reads the Hub's `sliding_window_size` as the window less the query (sliding_window = size + 1), and
ignores its other remote-code keys (`hybrid_layer_pattern`, `moe_layer_freq`, top-level `rope_theta`,
`swa_rope_theta`, `partial_rotary_factor`): without `rope_parameters` it uses the released model's RoPE. So do we.
Multi-token-prediction weights (`model.mtp.*`) are dropped, as transformers ignores them.

mlx-lm's mimo_v2_flash reads the Hub's keys (the export writes them) but attends over `sliding_window_size` tokens,
one fewer than transformers, and has one `partial_rotary_factor` for both layer types and no attention biases."""

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import deepseek_v3, llama
from .core.base import rope_scaling, scaled_dot_product_attention
from .core.kinds import LayerKind
from .core.layers import Attention, make_rope
from .core.moe import RoutedModel, SparseMoE, mlp_kinds, stack_experts
from .core.weights import Drop

# MiMoV2FlashConfig's RoPE when the config has no `rope_parameters` (the released model's).
DEFAULT_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.334},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.334}}


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 152576
    intermediate_size: int = 16384
    num_hidden_layers: int = 48
    num_attention_heads: int = 64
    num_key_value_heads: Optional[int] = 4
    head_dim: Optional[int] = 192
    v_head_dim: int = 128
    max_position_embeddings: Optional[int] = 131072
    rms_norm_eps: float = 1e-5
    moe_intermediate_size: int = 2048
    num_experts_per_tok: int = 8
    n_routed_experts: Optional[int] = None
    num_local_experts: Optional[int] = None  # MiMoV2FlashConfig's attribute_map alias of n_routed_experts
    routed_scaling_factor: Optional[float] = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    sliding_window: Optional[int] = 129
    sliding_window_size: Optional[int] = None
    mlp_layer_types: Optional[list] = None
    attention_value_scale: Optional[float] = 0.707
    rope_parameters: Optional[dict] = None

    def __post_init__(self):
        if self.n_routed_experts is None:
            self.n_routed_experts = self.num_local_experts if self.num_local_experts is not None else 256
        if self.routed_scaling_factor is None:  # the Hub config stores null
            self.routed_scaling_factor = 1.0
        if self.sliding_window_size is not None:
            self.sliding_window = self.sliding_window_size + 1
        if self.layer_types is None:
            self.layer_types = ["full_attention" if i == 0 or (i + 1) % 6 == 0 else "sliding_attention"
                                for i in range(self.num_hidden_layers)]
        super().__post_init__()
        self.mlp_layer_types = mlp_kinds(self.num_hidden_layers, self.mlp_layer_types, first_dense=1)
        self.rope_parameters = self.rope_parameters or DEFAULT_ROPE
        if not all(isinstance(self.rope_parameters.get(t), dict) for t in set(self.layer_types)):
            raise ValueError(f"mimo_v2_flash needs rope_parameters per layer type ({sorted(set(self.layer_types))}), "
                             f"got {self.rope_parameters}")

    def rotary_dims(self, layer_type: str) -> int:
        dims = int(self.head_dim * self.rope_parameters[layer_type].get("partial_rotary_factor", 0.334))
        if dims % 2:
            raise ValueError(f"mimo_v2_flash {layer_type} layers rotate int(head_dim * partial_rotary_factor) = {dims} "
                             "channels, an odd number (transformers then rotates one more channel than it has "
                             "frequencies for): not supported")
        return dims


class ScaledValueAttention(Attention):
    """Attention whose values have their own head size and are scaled by `value_scale`, with a learned sink logit per
    head (`attention_sink_bias`) joining each softmax when `sinks`."""

    def __init__(self, hidden_size: int, n_heads: int, n_kv_heads: int, head_dim: int, v_head_dim: int, rope,
                 bias: bool, value_scale: float, sinks: bool):
        super().__init__(hidden_size, n_heads, n_kv_heads, head_dim, rope, qkv_bias=bias)
        self.v_proj = nn.Linear(hidden_size, n_kv_heads * v_head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * v_head_dim, hidden_size, bias=False)
        self.value_scale = value_scale
        if sinks:
            self.attention_sink_bias = mx.zeros((n_heads,))

    def project(self, x):
        q, k, v = super().project(x)
        return q, k, v * self.value_scale

    def attend(self, q, k, v, mask, cache):
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        sinks = self.attention_sink_bias.astype(q.dtype) if "attention_sink_bias" in self else None
        out = scaled_dot_product_attention(q, k, v, cache, self.scale, mask, sinks=sinks)
        B, _, L, _ = out.shape
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


class Model(RoutedModel, llama.Model):
    @cached_property
    def ropes(self) -> dict:
        """One RoPE per layer type."""
        a = self.args
        return {t: make_rope(a.rotary_dims(t), a.rope_parameters[t]["rope_theta"], rope_scaling(a.rope_parameters[t]),
                             max_position_embeddings=a.max_position_embeddings) for t in set(a.layer_types)}

    def attention(self, index: int, kind: LayerKind) -> ScaledValueAttention:
        a = self.args
        layer_type = a.layer_types[index]
        sliding = layer_type == "sliding_attention"
        scale = a.attention_value_scale if a.attention_value_scale is not None else 1.0
        return ScaledValueAttention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads * (2 if sliding else 1),
                                    a.head_dim, a.v_head_dim, self.ropes[layer_type], a.attention_bias, scale,
                                    sinks=sliding)

    route = deepseek_v3.Model.route  # DeepSeek-V3's router with this config's settings

    def mlp(self, index: int) -> nn.Module:
        a = self.args
        if a.mlp_layer_types[index] == "dense":
            return super().mlp(index)
        return SparseMoE(a.hidden_size, a.moe_intermediate_size, a.n_routed_experts, self.route(), a.hidden_act,
                         correction_bias="gate.e_score_correction_bias")

    def weight_rules(self) -> list:
        mtp = Drop(*(f"model.mtp.{{*}}{leaf}" for leaf in ("weight", "bias", "e_score_correction_bias",
                                                             "attention_sink_bias")),
                   why="multi-token-prediction layers, unused by inference")
        return super().weight_rules() + [mtp] + stack_experts("model.layers.{i}.mlp", self.args.n_routed_experts)

    def export_config(self, config: dict) -> dict:
        # mlx-lm reads the Hub's remote-code keys only; `sliding_window_size` is the window less the query there (and
        # in MiMoV2FlashConfig, which reads it back as sliding_window).
        a = self.args
        full = a.rope_parameters["full_attention"]
        swa = a.rope_parameters.get("sliding_attention", full)
        return {**config, "head_dim": a.head_dim, "v_head_dim": a.v_head_dim, "swa_head_dim": a.head_dim,
                "swa_v_head_dim": a.v_head_dim, "swa_num_attention_heads": a.num_attention_heads,
                "swa_num_key_value_heads": 2 * a.num_key_value_heads, "sliding_window_size": a.sliding_window - 1,
                "hybrid_layer_pattern": [int(t == "sliding_attention") for t in a.layer_types],
                "moe_layer_freq": [int(k == "sparse") for k in a.mlp_layer_types],
                "add_swa_attention_sink_bias": True, "add_full_attention_sink_bias": False,
                "layernorm_epsilon": a.rms_norm_eps, "rope_theta": full["rope_theta"],
                "swa_rope_theta": swa["rope_theta"], "partial_rotary_factor": full.get("partial_rotary_factor", 0.334),
                "n_routed_experts": a.n_routed_experts, "routed_scaling_factor": a.routed_scaling_factor,
                "n_shared_experts": None, "topk_method": "noaux_tc", "scoring_func": "sigmoid"}
