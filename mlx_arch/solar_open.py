"""Solar Open, mirroring transformers/models/solar_open/modeling_solar_open.py: GLM-4.5's MoE on every layer (no dense
first layers, no q/k norms, no multi-token-prediction layers) with llama's attention (q/k/v biases when
`attention_bias`, none on o_proj) and RoPE over the whole head unless `rope_parameters` says otherwise; RoPE base
1e6 by default."""

from dataclasses import dataclass
from typing import Optional

from . import glm4_moe


@dataclass
class ModelArgs(glm4_moe.ModelArgs):
    vocab_size: int = 196608
    num_hidden_layers: int = 48
    num_attention_heads: int = 64
    head_dim: Optional[int] = 128
    rope_theta: float = 1_000_000.0
    partial_rotary_factor: float = 1.0
    moe_intermediate_size: int = 1280

    def __post_init__(self):
        # SolarOpenConfig has none of these: every layer is sparse, no q/k norm, no MTP layers.
        self.first_k_dense_replace, self.use_qk_norm, self.num_nextn_predict_layers = 0, False, 0
        super().__post_init__()


class Model(glm4_moe.Model):
    def export_config(self, config: dict) -> dict:
        # mlx-lm's solar_open requires keys SolarOpenConfig lacks; with no dense layer, intermediate_size is unused.
        return {**super().export_config(config), "first_k_dense_replace": 0,
                "intermediate_size": config.get("intermediate_size", self.args.moe_intermediate_size)}
