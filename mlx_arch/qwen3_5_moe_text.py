"""Qwen3.5-MoE (text), mirroring transformers/models/qwen3_5_moe/modeling_qwen3_5_moe.py
(`Qwen3_5MoeForCausalLM`): Qwen3.5's hybrid with a sparse block on every layer (softmax over `num_experts`, the top
`num_experts_per_tok` always renormalised, plus a shared expert under a sigmoid gate). Qwen3_5MoeTextConfig has no
`mlp_only_layers`, `decoder_sparse_step` nor `norm_topk_prob`: stray keys are not read.
"""

from dataclasses import dataclass

from . import qwen3_5_text


@dataclass
class ModelArgs(qwen3_5_text.ModelArgs):
    model_type: str = "qwen3_5_moe_text"
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_key_value_heads: int = 2
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts_per_tok: int = 8
    num_experts: int = 256

    def __post_init__(self):
        experts = self.num_experts
        super().__post_init__()
        self.num_experts, self.norm_topk_prob, self.decoder_sparse_step, self.mlp_only_layers = experts, True, 1, []


class Model(qwen3_5_text.Model):
    pass
