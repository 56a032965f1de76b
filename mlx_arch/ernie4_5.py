"""ERNIE 4.5 (dense), mirroring transformers/models/ernie4_5/modeling_ernie4_5.py: llama with interleaved
("traditional") RoPE over the whole head, one `use_bias` switch for the q/k/v/o and MLP biases, and tied
embeddings by default."""

from dataclasses import dataclass
from typing import Optional

from . import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 103424
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 18
    num_attention_heads: int = 16
    num_key_value_heads: Optional[int] = 2
    head_dim: Optional[int] = 128
    max_position_embeddings: Optional[int] = 131072
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    rope_theta: float = 500000.0  # Ernie4_5Config.default_theta
    use_bias: bool = False
    windowed = False

    def __post_init__(self):
        super().__post_init__()
        self.attention_bias = self.mlp_bias = self.use_bias


class Model(llama.Model):
    rope_traditional = True
