"""GLM-4.7-Flash ("GLM-4-MoE-Lite"), mirroring transformers/models/glm4_moe_lite/modeling_glm4_moe_lite.py:
DeepSeek-V3's latent attention and sigmoid group-limited routing with GLM's defaults, dense or sparse MLP per layer
from `mlp_layer_types` (by default the first layer dense; `first_k_dense_replace` is not read). The config's
`head_dim` is an alias of `qk_rope_head_dim` (attribute_map), and wins when both are given.

mlx-lm's glm4_moe_lite reads `first_k_dense_replace` instead: the export writes it (deepseek_v3.Model)."""

from dataclasses import dataclass
from typing import Optional

from . import deepseek_v3
from .core.moe import mlp_kinds


@dataclass
class ModelArgs(deepseek_v3.ModelArgs):
    vocab_size: int = 154880
    hidden_size: int = 2048
    intermediate_size: int = 10240
    moe_intermediate_size: int = 1536
    num_hidden_layers: int = 47
    num_attention_heads: int = 20
    num_key_value_heads: Optional[int] = 20
    n_routed_experts: int = 64
    routed_scaling_factor: float = 1.8
    q_lora_rank: Optional[int] = 768
    v_head_dim: int = 256
    qk_nope_head_dim: int = 192
    n_group: Optional[int] = 1
    topk_group: Optional[int] = 1
    num_experts_per_tok: Optional[int] = 4
    max_position_embeddings: Optional[int] = 202752
    rms_norm_eps: float = 1e-5
    mlp_layer_types: Optional[list] = None
    first_k_dense_replace: Optional[int] = None

    def __post_init__(self):
        if self.head_dim is not None:  # attribute_map: head_dim -> qk_rope_head_dim
            self.qk_rope_head_dim = self.head_dim
        super().__post_init__()
        self.mlp_layer_types = mlp_kinds(self.num_hidden_layers, self.mlp_layer_types, first_dense=1)


class Model(deepseek_v3.Model):
    pass
