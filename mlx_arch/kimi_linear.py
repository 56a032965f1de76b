"""Kimi Linear, mirroring transformers/models/kimi_linear/modeling_kimi_linear.py: a hybrid of Kimi Delta Attention
(KDA) layers and multi-head latent attention (MLA) layers without any positional encoding, each followed by a dense
SwiGLU MLP or DeepSeek-V3's MoE block (sigmoid routing with correction bias, groups, shared experts).

KDA is the gated delta rule with a decay per key channel: q, k, v = act(short causal conv(proj(x))) each (their
own depthwise convolutions), l2-normed q / k (q scaled by head_dim^-0.5), log decay g = -exp(A_log) *
softplus(f_b_proj(f_a_proj(x)) + dt_bias) per head channel, beta = sigmoid(b_proj(x)); the output goes through an
RMSNorm gated by sigmoid(g_b_proj(g_a_proj(x))) and o_proj. A prompt is processed one chunk at a time
(`gated_delta_by_chunk`), which bounds the per-channel pairwise decays to one chunk.

MLA is DeepSeek's (core/mla.py) with its shared "rope" key left unrotated and the softmax scaled by
(qk_nope_head_dim + qk_rope_head_dim)^-0.5.

Checkpoints (and transformers' saves) use the original layout, which mlx-lm reads too: `block_sparse_moe.` for every
MLP, experts `w1` / `w3` / `w2`, `q_conv1d` / `k_conv1d` / `v_conv1d`, the forget gate's `f_a_proj`, `f_b_proj`,
`A_log` (1, 1, heads, 1), `dt_bias` on the attention module. Configs name fields as KimiLinearConfig stores them
(`num_experts`, `num_experts_per_token`, `moe_renormalize`, `num_expert_group`, `num_shared_experts`,
`model_max_length`) and Hub configs keep the linear layers' settings and layer kinds (1-indexed) in the legacy
`linear_attn_config`, read as transformers reads it; `export_config` writes it back with the keys mlx-lm requires.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import deepseek_v3
from .core.conv import DepthwiseLayout, causal_conv, depthwise_conv
from .core.kinds import LayerKind
from .core.layers import CausalLM, activation
from .core.linear import GatedRMSNorm, RecurrentBlock, gated_delta_by_chunk, l2norm
from .core.mla import LatentAttention, SplitKeyValueHeads
from .core.moe import stack_experts
from .core.weights import Move, Rename

# KimiLinearConfig.attribute_map: the names its configs store -> our (DeepSeek-V3) fields
STORED_NAMES = {"model_max_length": "max_position_embeddings", "moe_renormalize": "norm_topk_prob",
                "num_expert_group": "n_group", "num_experts": "n_routed_experts",
                "num_local_experts": "n_routed_experts", "num_experts_per_token": "num_experts_per_tok",
                "num_shared_experts": "n_shared_experts"}


@dataclass
class ModelArgs(deepseek_v3.ModelArgs):
    model_type: str = "kimi_linear"
    vocab_size: int = 163840
    hidden_size: int = 2304
    intermediate_size: int = 9216
    moe_intermediate_size: int = 1024
    num_hidden_layers: int = 27
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 32
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.446
    q_lora_rank: Optional[int] = None
    n_group: Optional[int] = 1
    topk_group: Optional[int] = 1
    max_position_embeddings: Optional[int] = 1048576
    rms_norm_eps: float = 1e-5
    first_k_dense_replace: Optional[int] = 1  # legacy, read only to default mlp_layer_types
    mlp_layer_types: Optional[list] = None
    linear_head_dim: int = 128
    linear_num_heads: int = 32
    linear_conv_kernel_dim: int = 4
    linear_attn_config: Optional[dict] = None

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        return super().from_dict({**config, **{STORED_NAMES[k]: v for k, v in config.items() if k in STORED_NAMES}})

    def __post_init__(self):
        super().__post_init__()
        self.tie_word_embeddings = False  # KimiLinearForCausalLM ties nothing (its _tied_weights_keys is empty)
        legacy = self.linear_attn_config or {}
        self.linear_head_dim = legacy.get("head_dim", self.linear_head_dim)
        self.linear_num_heads = legacy.get("num_heads", self.linear_num_heads)
        self.linear_conv_kernel_dim = legacy.get("short_conv_kernel_size", self.linear_conv_kernel_dim)
        n = self.num_hidden_layers
        if self.layer_types is None:
            if "full_attn_layers" in legacy and "kda_layers" in legacy:
                full = set(legacy["full_attn_layers"])
                self.layer_types = ["full_attention" if i + 1 in full else "linear_attention" for i in range(n)]
            else:
                self.layer_types = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n)]
        if self.mlp_layer_types is None:
            dense = 1 if self.first_k_dense_replace is None else self.first_k_dense_replace
            self.mlp_layer_types = ["dense" if i < dense else "sparse" for i in range(n)]


class NoRotation(nn.Module):
    """Kimi's latent attention rotates nothing: its shared "rope" key passes through as it is."""

    def __call__(self, x, offset: int = 0):
        return x


class ShortConv(nn.Module):
    """One depthwise causal convolution under mlx-lm's name (`q_conv.conv`)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv = depthwise_conv(channels, kernel, bias=False)


class DeltaAttention(nn.Module):
    """Kimi Delta Attention (see the module docstring)."""

    cache_slots = 4  # the q, k and v convolutions' last inputs, the delta rule's state
    sensitive_children = ("o_proj",)
    chunk = 64  # transformers' chunk size

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.heads, self.head_dim = a.linear_num_heads, a.linear_head_dim
        width = self.heads * self.head_dim
        for name in ("q", "k", "v"):
            self[f"{name}_proj"] = nn.Linear(a.hidden_size, width, bias=False)
            self[f"{name}_conv"] = ShortConv(width, a.linear_conv_kernel_dim)
        self.f_a_proj = nn.Linear(a.hidden_size, self.head_dim, bias=False)
        self.f_b_proj = nn.Linear(self.head_dim, width, bias=False)
        self.b_proj = nn.Linear(a.hidden_size, self.heads, bias=False)
        self.g_a_proj = nn.Linear(a.hidden_size, self.head_dim, bias=False)
        self.g_b_proj = nn.Linear(self.head_dim, width, bias=False)
        self.A_log = mx.zeros((1, 1, self.heads, 1))
        self.dt_bias = mx.zeros((width,))
        self.o_norm = GatedRMSNorm(self.head_dim, eps=a.rms_norm_eps, act=mx.sigmoid)
        self.o_proj = nn.Linear(width, a.hidden_size, bias=False)
        self.act = activation(a.hidden_act)

    def __call__(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        heads = (B, L, self.heads, self.head_dim)
        q, k, v = (self.act(causal_conv(self[f"{n}_conv"].conv, self[f"{n}_proj"](x), cache, slot=i)).reshape(heads)
                   for i, n in enumerate("qkv"))
        q, k = (l2norm(t.astype(mx.float32)) for t in (q, k))
        f = self.f_b_proj(self.f_a_proj(x)).astype(mx.float32) + self.dt_bias.astype(mx.float32)
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(f.reshape(heads))
        beta = mx.sigmoid(self.b_proj(x).astype(mx.float32))
        out = gated_delta_by_chunk(q * self.head_dim**-0.5, k, v, g, beta, cache, slot=3, chunk=self.chunk)
        gate = self.g_b_proj(self.g_a_proj(x)).reshape(heads)
        return self.o_proj(self.o_norm(out.astype(x.dtype), gate).reshape(B, L, -1))


class Model(deepseek_v3.Model):
    reference_reads_children = True  # transformers' delta attention reads its conv1d's weight without calling it
    correction_bias: Optional[str] = "e_score_correction_bias"  # on the MoE block, where mlx-lm keeps it

    @property
    def rope(self):
        return NoRotation()

    def attention(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        if not kind.attends:
            return DeltaAttention(a)
        return LatentAttention(a.hidden_size, a.num_attention_heads, a.q_lora_rank, a.kv_lora_rank,
                               a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, self.rope,
                               (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5, bias=a.attention_bias)

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        return RecurrentBlock(self.attention(index, kind), self.mlp(index), self.norm, kind=kind)

    def weight_rules(self) -> list:
        a = self.args
        layer = "model.layers.{i}."
        convs = [Move(f"{layer}self_attn.{n}_conv1d.weight", f"{layer}self_attn.{n}_conv.conv.weight") for n in "qkv"]
        return CausalLM.weight_rules(self) + [
            Rename({f"model.layers.{i}.block_sparse_moe.": f"model.layers.{i}.mlp." for i in range(a.num_hidden_layers)}),
            Move(f"{layer}mlp.gate.e_score_correction_bias", f"{layer}mlp.e_score_correction_bias"),
            *stack_experts("model.layers.{i}.mlp", a.n_routed_experts, {"w1": "gate_proj", "w3": "up_proj",
                                                                        "w2": "down_proj"}),
            *convs, DepthwiseLayout(*(f"{layer}self_attn.{n}_conv.conv.weight" for n in "qkv")),
            SplitKeyValueHeads(f"{layer}self_attn.", a.num_attention_heads, a.qk_nope_head_dim, a.v_head_dim)]

    def export_config(self, config: dict) -> dict:
        """mlx-lm reads the layer kinds from `linear_attn_config` (1-indexed), the dense layers from
        `first_k_dense_replace`, and requires a `rope_theta` (which neither model uses)."""
        a = self.args
        kinds = a.layer_types[: a.num_hidden_layers]
        legacy = {**(a.linear_attn_config or {}), "num_heads": a.linear_num_heads, "head_dim": a.linear_head_dim,
                  "short_conv_kernel_size": a.linear_conv_kernel_dim,
                  "kda_layers": [i + 1 for i, t in enumerate(kinds) if t == "linear_attention"],
                  "full_attn_layers": [i + 1 for i, t in enumerate(kinds) if t == "full_attention"]}
        mlp = a.mlp_layer_types[: a.num_hidden_layers]
        dense = mlp.count("dense")
        out = {"rope_theta": 10000.0, **config, "linear_attn_config": legacy, "tie_word_embeddings": False}
        if mlp[:dense] == ["dense"] * dense:
            out["first_k_dense_replace"] = dense
        return out
