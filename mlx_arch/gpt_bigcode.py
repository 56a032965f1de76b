"""GPTBigCode (StarCoder 1, SantaCoder), mirroring transformers/models/gpt_bigcode/modeling_gpt_bigcode.py: GPT-2
with multi-query attention (one KV head when `multi_query`), nn.Linear instead of Conv1D, and weights kept under
transformers' own `transformer.` names (as mlx-lm's gpt_bigcode does)."""

from dataclasses import dataclass

from . import gpt2
from .core.layers import CausalLM, FusedQKVAttention


@dataclass
class ModelArgs(gpt2.ModelArgs):
    activation_function: str = "gelu_pytorch_tanh"
    multi_query: bool = True


class Model(gpt2.Model):
    backbone = "transformer"
    model = property(lambda self: self.transformer)

    def attention(self, args: ModelArgs, index: int) -> FusedQKVAttention:
        head_dim = args.n_embd // args.n_head
        # Multi-query: [q | k | v] with one KV head; otherwise q, k, v interleaved per head.
        n_kv, layout = (1, "blocks") if args.multi_query else (args.n_head, "heads")
        return FusedQKVAttention(args.n_embd, args.n_head, n_kv, head_dim, None, layout=layout,
                                 names=("c_attn", "c_proj"), scale=head_dim**-0.5 if args.scale_attn_weights else 1.0)

    def weight_rules(self):
        return CausalLM.weight_rules(self)  # nn.Linear under transformers' names: none of GPT-2's renames
