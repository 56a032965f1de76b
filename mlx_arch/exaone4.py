"""EXAONE 4.0, mirroring transformers/models/exaone4/modeling_exaone4.py: llama-shaped attention with RMS q/k norms
per head (before RoPE), blocks that norm each sublayer's output instead of its input (olmo2's post-norm layout),
and hybrid attention: the layers `layer_types` marks slide over `sliding_window` tokens and rotate; when a window
is set, the global layers use no positional encoding at all (NoPE)."""

from dataclasses import dataclass
from typing import Optional, Union

import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.layers import MLP, Attention, Backbone, CausalLM, PostNormDecoderLayer, make_rope, rms_norm, sliding_period


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    sliding_window: Optional[int] = 4096
    sliding_window_pattern: Union[str, int, None] = 4
    layer_types: Optional[list] = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            if self.sliding_window is None:
                # Exaone4Config sets the pattern to 0 here (no sliding layers); its formula would divide by it.
                self.layer_types = ["full_attention"] * self.num_hidden_layers
            elif isinstance(self.sliding_window_pattern, int) and self.sliding_window_pattern > 0:
                self.layer_types = ["sliding_attention" if (i + 1) % self.sliding_window_pattern else "full_attention"
                                    for i in range(self.num_hidden_layers)]
            else:
                raise ValueError(f"exaone4 config without layer_types needs an integer sliding_window_pattern, got "
                                 f"{self.sliding_window_pattern!r}")


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        norm = rms_norm(args.hidden_size, args.rms_norm_eps)
        layers = []
        for layer_type in args.layer_types[: args.num_hidden_layers]:
            sliding = layer_type == "sliding_attention"
            rotates = args.sliding_window is None or sliding
            rope = make_rope(args.head_dim, args.rope_theta, args.rope_scaling, 1.0, args.max_position_embeddings)
            attn = Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                             rope if rotates else None, qk_norm=lambda dims: nn.RMSNorm(dims, eps=args.rms_norm_eps))
            layers.append(PostNormDecoderLayer(attn, MLP(args.hidden_size, args.intermediate_size, args.hidden_act),
                                               norm, pre_norms=False,
                                               window=args.sliding_window if sliding else None))
        self.model = Backbone(args.vocab_size, args.hidden_size, layers, norm())
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def export_config(self, config: dict) -> dict:
        # mlx-lm requires head_dim and rope_scaling, and reads the layer kinds from a pattern string ("LLLG").
        out = {**config, "head_dim": self.args.head_dim, "rope_scaling": self.args.rope_scaling}
        period = sliding_period(self.args.layer_types[: self.args.num_hidden_layers])
        if self.args.sliding_window is None:
            return {**out, "sliding_window_pattern": None}  # every layer global and rotating
        # Global layers without RoPE beside no sliding layer, or no period: mlx-lm has no way to say it.
        return {**out, "sliding_window_pattern": "L" * (period - 1) + "G"} if period and period > 1 else out
