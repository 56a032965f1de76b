"""OLMo Hybrid, mirroring transformers/models/olmo_hybrid/modeling_olmo_hybrid.py: OLMo 3's attention layers (RMS
norms over the whole q and k projections, post-norm blocks without input norms, no sliding window) among gated
delta-net layers in pre-norm blocks (by default every fourth layer attends, and at least the last one does).

The delta net projects q, k, v, a, b and an output gate separately, runs q, k, v through their own short causal
convolutions (+ act), l2-norms q and k (q scaled by key_head_dim^-0.5), repeats them to the value heads, and uses
beta = sigmoid(b), doubled when `linear_allow_neg_eigval` (eigenvalues in [-1, 1]), and the log decay
g = -exp(A_log) * softplus(a + dt_bias) per value head; the output goes through an RMSNorm (eps 1e-5, as FLA's)
gated by silu(g_proj(x)), then o_proj.

Released checkpoints use no positional encoding: a config whose `rope_theta` is null (in `rope_parameters` or at the
top level) gives NoPE attention, as transformers builds it. Checkpoints name the pre-norms `attention_layer_norm` /
`feedforward_layer_norm` (transformers renames them to `input_layernorm` / `post_attention_layernorm`, the names
mlx-lm reads, also for the attention layers' post-attention norm) and keep q, k and v's convolutions apart, as
mlx-lm reads them.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import llama, olmo2
from .core.conv import DepthwiseLayout, causal_conv, depthwise_conv
from .core.kinds import LayerKind
from .core.layers import PostNormDecoderLayer, activation, make_rope
from .core.linear import GatedRMSNorm, RecurrentBlock, gated_delta, l2norm, repeat_heads
from .core.weights import Concat, Rename, Split


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "olmo_hybrid"
    vocab_size: int = 100352
    hidden_size: int = 3840
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 30
    max_position_embeddings: Optional[int] = 65536
    rope_theta: Optional[float] = 10000.0
    linear_num_key_heads: Optional[int] = None
    linear_num_value_heads: Optional[int] = None
    linear_key_head_dim: Optional[int] = None
    linear_value_head_dim: Optional[int] = None
    linear_conv_kernel_dim: int = 4
    linear_allow_neg_eigval: bool = True
    windowed = False

    def __post_init__(self):
        super().__post_init__()
        n = self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(n)]
            if "full_attention" not in self.layer_types:
                self.layer_types[-1] = "full_attention"
        self.linear_num_key_heads = self.linear_num_key_heads or self.num_attention_heads
        self.linear_num_value_heads = self.linear_num_value_heads or self.num_attention_heads
        self.linear_key_head_dim = self.linear_key_head_dim or int(0.75 * self.hidden_size / self.linear_num_key_heads)
        self.linear_value_head_dim = self.linear_value_head_dim or 2 * self.linear_key_head_dim


class GatedDeltaNet(nn.Module):
    """OLMo Hybrid's delta-net mixer (see the module docstring), under the checkpoint's names."""

    cache_slots = 4  # the q, k and v convolutions' last inputs, the delta rule's state
    sensitive_children = ("o_proj",)
    chunk = 64  # transformers' chunk size

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.nk, self.nv = a.linear_num_key_heads, a.linear_num_value_heads
        self.dk, self.dv = a.linear_key_head_dim, a.linear_value_head_dim
        widths = {"q": self.nk * self.dk, "k": self.nk * self.dk, "v": self.nv * self.dv}
        for name, width in widths.items():
            self[f"{name}_proj"] = nn.Linear(a.hidden_size, width, bias=False)
            self[f"{name}_conv1d"] = depthwise_conv(width, a.linear_conv_kernel_dim, bias=False)
        self.a_proj = nn.Linear(a.hidden_size, self.nv, bias=False)
        self.b_proj = nn.Linear(a.hidden_size, self.nv, bias=False)
        self.g_proj = nn.Linear(a.hidden_size, widths["v"], bias=False)
        self.o_proj = nn.Linear(widths["v"], a.hidden_size, bias=False)
        self.A_log = mx.zeros((self.nv,))
        self.dt_bias = mx.ones((self.nv,))
        self.o_norm = GatedRMSNorm(self.dv, eps=1e-5)
        self.act = activation(a.hidden_act)
        self.beta_scale = 2.0 if a.linear_allow_neg_eigval else 1.0

    def __call__(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        q, k, v = (self.act(causal_conv(self[f"{n}_conv1d"], self[f"{n}_proj"](x), cache, slot=i))
                   for i, n in enumerate("qkv"))
        q, k = (l2norm(t.reshape(B, L, self.nk, self.dk).astype(mx.float32)) for t in (q, k))
        q, k = repeat_heads(q * self.dk**-0.5, self.nv), repeat_heads(k, self.nv)
        beta = mx.sigmoid(self.b_proj(x).astype(mx.float32)) * self.beta_scale
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(self.a_proj(x).astype(mx.float32) + self.dt_bias)
        out = gated_delta(q, k, v.reshape(B, L, self.nv, self.dv), g, beta, cache, slot=3, chunk=self.chunk)
        gate = self.g_proj(x).reshape(B, L, self.nv, self.dv)
        return self.o_proj(self.o_norm(out.astype(x.dtype), gate).reshape(B, L, -1))


class Model(olmo2.Model):
    reference_reads_children = True  # transformers' delta net reads its conv1d's weight without calling the module

    @cached_property
    def rope(self):
        a = self.args
        if a.rope_theta is None:  # NoPE, as the released checkpoints
            return None
        return make_rope(a.head_dim, a.rope_theta, a.rope_scaling, 1.0, a.max_position_embeddings)

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        if kind.attends:
            return PostNormDecoderLayer(self.attention(index, kind), self.mlp(index), self.norm, pre_norms=False,
                                        kind=kind)
        return RecurrentBlock(GatedDeltaNet(self.args), self.mlp(index), self.norm, names=("linear_attn", "mlp"),
                              kind=kind)

    def weight_rules(self) -> list:
        names = {}
        for i in range(self.args.num_hidden_layers):
            names[f"model.layers.{i}.attention_layer_norm."] = f"model.layers.{i}.input_layernorm."
            names[f"model.layers.{i}.feedforward_layer_norm."] = f"model.layers.{i}.post_attention_layernorm."
        return super().weight_rules() + [Rename(names), *self.conv_rules()]

    def conv_rules(self) -> list:
        """transformers fuses the three convolutions into one and saves it back as three equal thirds, whatever the
        key and value widths: join whatever is stored, split by the real widths (the inverse writes thirds)."""
        a = self.args
        convs = [f"model.layers.{{i}}.linear_attn.{n}_conv1d.weight" for n in "qkv"]
        fused = "model.layers.{i}.linear_attn.conv1d.weight"
        key, value = a.linear_num_key_heads * a.linear_key_head_dim, a.linear_num_value_heads * a.linear_value_head_dim
        thirds = [(2 * key + value) // 3] * 3
        return [Concat(convs, fused, sizes=thirds), Split(fused, convs, [key, key, value]), DepthwiseLayout(*convs)]
