"""DBRX, mirroring transformers/models/dbrx/modeling_dbrx.py: a decoder under `transformer.` (`wte`, `blocks`,
`norm_f`) with bias-free LayerNorms, attention through one fused `Wqkv` ([q | k | v], `attn_config.kv_n_heads` KV
heads) whose output is clamped to [-clip_qkv, clip_qkv] when set, and a sparse MoE `ffn` on every layer:
`router.layer`, a softmax over `moe_num_experts`, the top `moe_top_k` divided by their
`moe_normalize_expert_weights`-norm (kept as they are when null), experts of `ffn_hidden_size` with
`ffn_act_fn.name`. The head is never tied.

The checkpoint stores each layer's experts as three (experts * ffn_hidden_size, d_model) matrices `experts.mlp.w1`
(gate), `v1` (up) and `w2` (the down projections, transposed); they are split into one module per expert
(`experts.{e}.w1/v1/w2`), the layout mlx-lm reads, quantized one expert at a time.

RoPE's base is the top-level `rope_parameters` / `rope_theta` (default 10000), as transformers 5 reads it; it
ignores `attn_config.rope_theta`, which mlx-lm reads and the export sets to the base actually used."""

from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.kinds import KindedLayer, LayerKind
from .core.layers import CausalLM, ClipQKV, FusedQKVAttention, NamedBackbone, activation
from .core.moe import NestedGate, RoutedModel, SparseMoE, softmax_topk_pnorm
from .core.weights import Split, Transpose

EXPERTS = "transformer.blocks.{i}.ffn.experts"


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "dbrx"
    vocab_size: int = 32000
    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    max_seq_len: int = 2048
    attn_config: Optional[dict] = None
    ffn_config: Optional[dict] = None
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None

    def __post_init__(self):
        if self.tie_word_embeddings:
            raise ValueError("dbrx with tie_word_embeddings is not supported (transformers refuses it)")
        attn, ffn = self.attn_config or {}, self.ffn_config or {}
        self.kv_n_heads = attn.get("kv_n_heads", 1)
        self.clip_qkv = attn.get("clip_qkv")
        self.ffn_hidden_size = ffn.get("ffn_hidden_size", 3584)
        self.moe_num_experts = ffn.get("moe_num_experts", 4)
        self.moe_top_k = ffn.get("moe_top_k", 1)
        self.moe_normalize_expert_weights = ffn.get("moe_normalize_expert_weights", 1.0)
        self.ffn_act = (ffn.get("ffn_act_fn") or {}).get("name", "silu")

    # The scaffold's names for DBRX's fields.
    hidden_size = property(lambda self: self.d_model)
    num_attention_heads = property(lambda self: self.n_heads)
    num_hidden_layers = property(lambda self: self.n_layers)
    max_position_embeddings = property(lambda self: self.max_seq_len)


class ClippedFusedAttention(ClipQKV, FusedQKVAttention):
    """Fused q/k/v attention whose projections are clamped elementwise (before RoPE)."""


class ExpertGLU(nn.Module):
    """One expert: w2(act(w1(x)) * v1(x))."""

    sensitive_children = ("w2",)

    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.v1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = activation(act)

    def __call__(self, x):
        return self.w2(self.act(self.w1(x)) * self.v1(x))


class NormAttnNorm(nn.Module):
    """The attention and the two norms around it, one module as in the checkpoint."""

    def __init__(self, attn: nn.Module, norm):
        super().__init__()
        self.norm_1, self.attn, self.norm_2 = norm(), attn, norm()


class Block(KindedLayer, nn.Module):
    """h = x + attn(norm_1(x)); out = h + ffn(norm_2(h))."""

    def __init__(self, attn: nn.Module, ffn: nn.Module, norm, kind: LayerKind):
        super().__init__()
        self.norm_attn_norm = NormAttnNorm(attn, norm)
        self.ffn = ffn
        self.kind = kind

    def __call__(self, x, mask=None, cache=None):
        n = self.norm_attn_norm
        h = x + n.attn(n.norm_1(x), mask, cache)
        return h + self.ffn(n.norm_2(h))


class Model(RoutedModel, CausalLM):
    backbone_name = "transformer"
    # transformers' DbrxExperts reads its experts' weights itself: the gate's reference loads whole blocks
    reference_reads_children = True

    def norm(self) -> nn.Module:
        return nn.LayerNorm(self.args.d_model, eps=1e-5, bias=False)

    def attention(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        return ClippedFusedAttention(a.d_model, a.n_heads, a.kv_n_heads, a.d_model // a.n_heads, self.rope,
                                     layout="blocks", bias=False, names=("Wqkv", "out_proj"), clip=a.clip_qkv)

    def ffn(self, index: int) -> SparseMoE:
        a = self.args
        route = partial(softmax_topk_pnorm, k=a.moe_top_k, p=a.moe_normalize_expert_weights)
        experts = [ExpertGLU(a.d_model, a.ffn_hidden_size, a.ffn_act) for _ in range(a.moe_num_experts)]
        return SparseMoE(a.d_model, a.ffn_hidden_size, a.moe_num_experts, route,
                         gate=NestedGate(a.d_model, a.moe_num_experts, "layer"), gate_name="router",
                         switch=experts, switch_name="experts")

    def layer(self, index: int, kind: LayerKind) -> Block:
        return Block(self.attention(index, kind), self.ffn(index), self.norm, kind)

    def backbone(self, layers: list) -> nn.Module:
        return NamedBackbone(self.args.vocab_size, self.args.d_model, layers, self.norm(),
                             names=("wte", "blocks", "norm_f"))

    def export_config(self, config: dict) -> dict:
        return {**config, "attn_config": {**(config.get("attn_config") or {}), "rope_theta": self.args.rope_theta}}

    def weight_rules(self) -> list:
        n, size = self.args.moe_num_experts, self.args.ffn_hidden_size

        def per_expert(name):
            return [f"{EXPERTS}.{e}.{name}.weight" for e in range(n)]

        return super().weight_rules() + [
            Split(f"{EXPERTS}.mlp.w1", per_expert("w1"), [size] * n),
            Split(f"{EXPERTS}.mlp.v1", per_expert("v1"), [size] * n),
            Transpose(f"{EXPERTS}.mlp.w2"),  # stored (in, out) per expert: the down projections transposed
            Split(f"{EXPERTS}.mlp.w2", per_expert("w2"), [size] * n, axis=1),
        ]
