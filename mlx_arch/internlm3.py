"""InternLM3, mirroring transformers/models/internlm3/configuration_internlm3.py: transformers builds it as
`LlamaForCausalLM` (there is no InternLM3 modeling file), so the model is llama's. Only the config differs: its own
defaults, and the remote-code key names `qkv_bias` (q/k/v/o biases) and `bias` (MLP biases), which InternLM3Config
maps to `attention_bias` / `mlp_bias` and requires to agree."""

from dataclasses import dataclass
from typing import Optional

from . import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    num_key_value_heads: Optional[int] = 2
    head_dim: Optional[int] = 128
    max_position_embeddings: Optional[int] = 32768
    rms_norm_eps: float = 1e-5
    qkv_bias: Optional[bool] = None
    bias: Optional[bool] = None

    def __post_init__(self):
        if self.qkv_bias is not None:
            self.attention_bias = self.qkv_bias
        if self.bias is not None:
            self.mlp_bias = self.bias
        if self.attention_bias != self.mlp_bias:
            raise ValueError("internlm3 with qkv_bias different from bias is not supported (as in transformers: "
                             "llama gives the q/k/v and output projections one bias setting)")
        super().__post_init__()


class Model(llama.Model):
    def export_config(self, config: dict) -> dict:
        # mlx-lm reads the biases only under the remote-code names.
        return {**config, "qkv_bias": self.args.attention_bias, "bias": self.args.mlp_bias}
