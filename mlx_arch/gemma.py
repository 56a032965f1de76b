"""Gemma, mirroring transformers/models/gemma/modeling_gemma.py: llama's layout with embeddings scaled by
sqrt(hidden_size), RMS norms that compute with (1 + weight), a GELU (tanh) gated MLP and a tied head by default."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from . import llama
from .core.layers import OffsetRMSNorm


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: Optional[int] = 16
    head_dim: Optional[int] = 256
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: Optional[int] = 8192
    tie_word_embeddings: bool = True
    use_bidirectional_attention: Optional[bool] = None
    windowed = False

    def __post_init__(self):
        super().__post_init__()
        # GemmaConfig: the official checkpoints say "gelu" but were trained with the tanh approximation.
        if self.hidden_act == "gelu":
            self.hidden_act = "gelu_pytorch_tanh"
        refuse_bidirectional(self)


def refuse_bidirectional(args):
    if args.use_bidirectional_attention:
        raise ValueError(f"{args.model_type} with use_bidirectional_attention=True is an encoder (embedding model), "
                         "not a causal language model; it is not supported")


def offset_rms_norm(dims: int, eps: float):
    return lambda: OffsetRMSNorm(dims, eps=eps)


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.embed_scale = args.hidden_size**0.5

    def norm(self) -> nn.Module:
        return OffsetRMSNorm(self.args.hidden_size, eps=self.args.rms_norm_eps)
