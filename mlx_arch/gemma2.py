"""Gemma 2, mirroring transformers/models/gemma2/modeling_gemma2.py: Gemma with norms before and after each sublayer
("sandwich" blocks), tanh soft-capping of attention scores and of the final logits, attention scaled by
query_pre_attn_scalar**-0.5, and sliding-window attention on the layers `layer_types` marks (every other layer by
default, starting with the first)."""

from dataclasses import dataclass
from typing import Optional

from . import gemma
from .core.kinds import LayerKind
from .core.layers import Attention, PostNormDecoderLayer


@dataclass
class ModelArgs(gemma.ModelArgs):
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = 4
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    sliding_window: Optional[int] = 4096
    final_logit_softcapping: Optional[float] = 30.0
    attn_logit_softcapping: Optional[float] = 50.0
    windowed = True

    def __post_init__(self):
        super().__post_init__()
        self.hidden_act = self.hidden_activation  # Gemma2MLP reads `hidden_activation`, taken as it is
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                for i in range(self.num_hidden_layers)]


class Model(gemma.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.final_softcap = args.final_logit_softcapping

    def attention(self, index: int, kind: LayerKind) -> Attention:
        """Gemma's attention with its own scale and soft-capped scores; gemma3 overrides this."""
        attn = super().attention(index, kind)
        attn.scale, attn.softcap = self.args.query_pre_attn_scalar**-0.5, self.args.attn_logit_softcapping
        return attn

    def layer(self, index: int, kind: LayerKind) -> PostNormDecoderLayer:
        return PostNormDecoderLayer(self.attention(index, kind), self.mlp(index), self.norm, kind=kind)
