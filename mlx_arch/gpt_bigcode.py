"""GPTBigCode (StarCoder 1, SantaCoder), mirroring transformers/models/gpt_bigcode/modeling_gpt_bigcode.py: GPT-2
with multi-query attention (one KV head when `multi_query`), nn.Linear instead of Conv1D, and weights kept under
transformers' own `transformer.` names (as mlx-lm's gpt_bigcode does)."""

from dataclasses import dataclass

import mlx.nn as nn

from . import gpt2
from .core.kinds import LayerKind
from .core.layers import FusedQKVAttention


@dataclass
class ModelArgs(gpt2.ModelArgs):
    activation_function: str = "gelu_pytorch_tanh"
    multi_query: bool = True


class Model(gpt2.Model):
    checkpoint_layout = ()  # nn.Linear under transformers' names: none of GPT-2's transposes and renames
    backbone_name = "transformer"

    def attention(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        head_dim = a.n_embd // a.n_head
        # Multi-query: [q | k | v] with one KV head; otherwise q, k, v interleaved per head.
        n_kv, layout = (1, "blocks") if a.multi_query else (a.n_head, "heads")
        return FusedQKVAttention(a.n_embd, a.n_head, n_kv, head_dim, None, layout=layout,
                                 names=("c_attn", "c_proj"), scale=head_dim**-0.5 if a.scale_attn_weights else 1.0)
