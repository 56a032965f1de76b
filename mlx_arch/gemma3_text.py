"""Gemma 3 (text), mirroring transformers/models/gemma3/modeling_gemma3.py (`Gemma3ForCausalLM`): Gemma 2's sandwich
blocks with (1 + w) RMS q/k norms per head, sliding-window layers from `layer_types` (five of every six by default)
whose RoPE has its own base (`rope_local_base_freq` in transformers 4, `rope_parameters["sliding_attention"]` in
transformers 5) while global layers use `rope_theta` and any `rope_scaling`.

As in transformers, `attn_logit_softcapping` is not applied (Gemma3Attention never passes it on); the final logits
are capped when `final_logit_softcapping` is set.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from . import gemma2
from .core.base import sliding_rope
from .core.kinds import LayerKind
from .core.layers import Attention, OffsetRMSNorm, make_rope, sliding_period


@dataclass
class ModelArgs(gemma2.ModelArgs):
    vocab_size: int = 262_208
    max_position_embeddings: Optional[int] = 131_072
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_local_scaling: Optional[dict] = None
    final_logit_softcapping: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    sliding_window_pattern: int = 6

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        args = super().from_dict(config)
        args.rope_local_base_freq, args.rope_local_scaling = sliding_rope(config, args.rope_local_base_freq)
        return args

    def __post_init__(self):
        if self.layer_types is None:
            # Older configs give only `sliding_window_pattern`: every n-th layer is global.
            self.layer_types = ["sliding_attention" if (i + 1) % self.sliding_window_pattern else "full_attention"
                                for i in range(self.num_hidden_layers)]
        super().__post_init__()


class Model(gemma2.Model):
    @cached_property
    def local_rope(self):
        """The RoPE of the sliding layers, shared by all of them."""
        a = self.args
        return make_rope(a.head_dim, a.rope_local_base_freq, a.rope_local_scaling, 1.0, a.max_position_embeddings)

    def attention(self, index: int, kind: LayerKind) -> Attention:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                         self.local_rope if kind.name == "sliding" else self.rope,
                         qkv_bias=a.attention_bias, o_bias=a.attention_bias, scale=a.query_pre_attn_scalar**-0.5,
                         qk_norm=lambda dims: OffsetRMSNorm(dims, eps=a.rms_norm_eps))

    def export_config(self, config: dict) -> dict:
        # mlx-lm reads the local base and an integer pattern, not rope_parameters / layer_types.
        out = {**config, "rope_local_base_freq": self.args.rope_local_base_freq}
        period = sliding_period(self.args.layer_types[: self.args.num_hidden_layers])
        return {**out, "sliding_window_pattern": period} if period else out
