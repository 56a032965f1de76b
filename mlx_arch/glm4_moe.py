"""GLM-4.5 / GLM-4.6 (glm4_moe), mirroring transformers/models/glm4_moe/modeling_glm4_moe.py: dots1's MoE (dense
`intermediate_size` MLPs on the first `first_k_dense_replace` layers; elsewhere DeepSeek-V3 routing: sigmoid scores,
the top `num_experts_per_tok` of `n_routed_experts` chosen by score + `gate.e_score_correction_bias` within the
`topk_group` best of `n_group` groups, renormalised when `norm_topk_prob`, times `routed_scaling_factor`; plus an
ungated shared MLP of moe_intermediate_size * `n_shared_experts`) with GLM-4.5's attention: biases on q/k/v only
(`attention_bias`), optional RMS q/k norms per head (`use_qk_norm`), RoPE on the first `partial_rotary_factor` of each
head (0.5 when the config does not say, as Glm4MoeConfig sets it), every layer full.

Hub checkpoints carry `num_nextn_predict_layers` multi-token-prediction layers after the last decoder layer; they
are not part of the language model (transformers ignores them) and are dropped."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from . import dots1
from .core.kinds import LayerKind
from .core.layers import Attention
from .core.weights import Drop


@dataclass
class ModelArgs(dots1.ModelArgs):
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 10944
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: Optional[int] = 8
    max_position_embeddings: Optional[int] = 131072
    rms_norm_eps: float = 1e-5
    partial_rotary_factor: float = 0.5
    moe_intermediate_size: int = 1408
    n_routed_experts: Optional[int] = 128
    n_shared_experts: Optional[int] = 1
    num_experts_per_tok: Optional[int] = 8
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    use_qk_norm: bool = False
    num_nextn_predict_layers: int = 1
    windowed = False

    def __post_init__(self):
        self.layer_types = ["full_attention"] * self.num_hidden_layers
        super().__post_init__()


class Model(dots1.Model):
    experts_name = "switch_mlp"

    def attention(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        norm = (lambda dims: nn.RMSNorm(dims, eps=a.rms_norm_eps)) if a.use_qk_norm else None
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                         qkv_bias=a.attention_bias, qk_norm=norm)

    def weight_rules(self) -> list:
        a = self.args
        extra = range(a.num_hidden_layers, a.num_hidden_layers + a.num_nextn_predict_layers)
        mtp = [f"model.layers.{n}.{{*}}{leaf}" for n in extra for leaf in ("weight", "bias", "e_score_correction_bias")]
        return super().weight_rules() + ([Drop(*mtp, why="multi-token-prediction layers")] if mtp else [])

    def export_config(self, config: dict) -> dict:
        # mlx-lm requires these keys, which transformers writes only when set (head_dim, rope_scaling) or inside
        # rope_parameters (partial_rotary_factor).
        a = self.args
        return {**config, "head_dim": a.head_dim, "partial_rotary_factor": a.partial_rotary_factor,
                "rope_scaling": config.get("rope_scaling", a.rope_scaling)}
