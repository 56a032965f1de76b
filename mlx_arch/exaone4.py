"""EXAONE 4.0, mirroring transformers/models/exaone4/modeling_exaone4.py: llama-shaped attention with RMS q/k norms
per head (before RoPE), blocks that norm each sublayer's output instead of its input (olmo2's post-norm layout),
and hybrid attention: the layers `layer_types` marks slide over `sliding_window` tokens and rotate; when a window
is set, the global layers use no positional encoding at all (NoPE)."""

from dataclasses import dataclass
from typing import Optional, Union

import mlx.nn as nn

from . import llama
from .core.kinds import LayerKind
from .core.layers import Attention, PostNormDecoderLayer, sliding_period


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 102400
    intermediate_size: int = 16384
    num_key_value_heads: Optional[int] = 32
    rms_norm_eps: float = 1e-5
    sliding_window: Optional[int] = 4096
    sliding_window_pattern: Union[str, int, None] = 4

    def __post_init__(self):
        super().__post_init__()
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


class Model(llama.Model):
    def attention(self, index: int, kind: LayerKind) -> Attention:
        a = self.args
        rotates = kind.name == "sliding" or a.sliding_window is None
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                         self.rope if rotates else None, qk_norm=lambda dims: nn.RMSNorm(dims, eps=a.rms_norm_eps))

    def layer(self, index: int, kind: LayerKind) -> PostNormDecoderLayer:
        return PostNormDecoderLayer(self.attention(index, kind), self.mlp(index), self.norm, pre_norms=False,
                                    kind=kind)

    def export_config(self, config: dict) -> dict:
        # mlx-lm requires head_dim and rope_scaling, and reads the layer kinds from a pattern string ("LLLG").
        out = {**config, "head_dim": self.args.head_dim, "rope_scaling": self.args.rope_scaling}
        period = sliding_period(self.args.layer_types[: self.args.num_hidden_layers])
        if self.args.sliding_window is None:
            return {**out, "sliding_window_pattern": None}  # every layer global and rotating
        # Global layers without RoPE beside no sliding layer, or no period: mlx-lm has no way to say it.
        return {**out, "sliding_window_pattern": "L" * (period - 1) + "G"} if period and period > 1 else out
