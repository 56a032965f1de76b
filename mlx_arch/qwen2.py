"""Qwen2, mirroring transformers/models/qwen2/modeling_qwen2.py: llama with q/k/v biases (no o_proj bias) and
sliding windows on the layers from `max_window_layers` on when `use_sliding_window` is set."""

from dataclasses import dataclass
from typing import Optional

from . import llama
from .core.layers import Attention


@dataclass
class ModelArgs(llama.ModelArgs):
    use_sliding_window: bool = False
    max_window_layers: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        # Hub configs keep `sliding_window: 4096` even when the window is switched off.
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.layer_types is None:
            first = self.max_window_layers if self.max_window_layers is not None else self.num_hidden_layers
            self.layer_types = [
                "sliding_attention" if self.sliding_window is not None and i >= first else "full_attention"
                for i in range(self.num_hidden_layers)
            ]


class Model(llama.Model):
    def attention(self, index: int, kind) -> Attention:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                         qkv_bias=True, o_bias=False)
