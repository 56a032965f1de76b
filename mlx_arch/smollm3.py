"""SmolLM3, mirroring transformers/models/smollm3/modeling_smollm3.py: llama with RoPE switched off in some layers
(NoPE). `no_rope_layers[i]` is 1 where layer i rotates; by default every `no_rope_layer_interval`-th layer does not.
Sliding windows, when enabled, go to the layers that `layer_types` marks (by default the NoPE layers)."""

from dataclasses import dataclass
from typing import Optional

from . import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    num_key_value_heads: Optional[int] = 4
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_theta: float = 2_000_000.0
    tie_word_embeddings: bool = True
    use_sliding_window: bool = False
    no_rope_layers: Optional[list] = None
    no_rope_layer_interval: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.no_rope_layers is None:
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0)
                                   for i in range(self.num_hidden_layers)]
        if len(self.no_rope_layers) < self.num_hidden_layers:
            raise ValueError(f"no_rope_layers has {len(self.no_rope_layers)} entries for "
                             f"{self.num_hidden_layers} layers")
        if self.layer_types is None:
            sliding = self.use_sliding_window and self.sliding_window is not None
            self.layer_types = ["sliding_attention" if sliding and not rope else "full_attention"
                                for rope in self.no_rope_layers[: self.num_hidden_layers]]


class Model(llama.Model):
    def attention(self, index: int, kind):
        attn = super().attention(index, kind)
        if not self.args.no_rope_layers[index]:
            attn.rope = None
        return attn
