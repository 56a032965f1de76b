"""Ministral 3 (the text model of Mistral 3 / Ministral 3), mirroring transformers/models/ministral3/
modeling_ministral3.py: Mistral (llama with `sliding_window` on every layer when set) whose queries are scaled, after
RoPE, by Llama 4's position temperature 1 + beta * log(1 + floor(position / original_max_position_embeddings)),
with beta = `llama_4_scaling_beta` and the original context from the RoPE parameters (YaRN by default)."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from . import llama
from .core.layers import Attention

# Ministral3Config's RoPE when the config states none.
DEFAULT_ROPE = {"rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 16.0, "original_max_position_embeddings": 16384,
                "max_position_embeddings": 262144, "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0,
                "mscale": 1.0, "llama_4_scaling_beta": 0.1}


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 131072
    intermediate_size: int = 14336
    num_hidden_layers: int = 34
    num_key_value_heads: Optional[int] = 8
    head_dim: Optional[int] = 128
    max_position_embeddings: Optional[int] = 262144
    rms_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        if not config.get("rope_parameters") and not config.get("rope_scaling"):
            # Ministral3Config's RoPE when none is stated; as there, a bare transformers-4 `rope_theta` is ignored
            config = {**config, "rope_parameters": DEFAULT_ROPE}
        args = super().from_dict(config)
        scaling = args.rope_scaling or {}
        if scaling.get("llama_4_scaling_beta") is None or not scaling.get("original_max_position_embeddings"):
            raise ValueError("ministral3 needs llama_4_scaling_beta and original_max_position_embeddings in its RoPE "
                             "parameters (Ministral3Attention scales its queries with them)")
        return args


class TemperedQueryAttention(Attention):
    """Attention whose queries at position p are scaled by 1 + beta * log(1 + floor(p / original_context))."""

    def __init__(self, *args, beta: float, original_context: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.original_context = beta, original_context

    def attend(self, q, k, v, mask, cache):
        offset = cache.offset if cache is not None else 0
        positions = mx.arange(offset, offset + q.shape[2], dtype=mx.float32)
        scale = 1.0 + self.beta * mx.log1p(mx.floor(positions / self.original_context))
        return super().attend(q * scale[:, None].astype(q.dtype), k, v, mask, cache)


class Model(llama.Model):
    def attention(self, index: int, kind) -> Attention:
        a = self.args
        return TemperedQueryAttention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                                      beta=a.rope_scaling["llama_4_scaling_beta"],
                                      original_context=a.rope_scaling["original_max_position_embeddings"])

    def export_config(self, config: dict) -> dict:
        # mlx-lm reads the temperature's parameters from rope_parameters only (transformers 4 configs say rope_scaling)
        if config.get("rope_parameters"):
            return config
        return {**config, "rope_parameters": {**self.args.rope_scaling, "rope_theta": self.args.rope_theta}}
