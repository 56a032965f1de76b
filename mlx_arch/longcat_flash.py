"""LongCat-Flash, mirroring transformers/models/longcat_flash/modeling_longcat_flash.py.

Each of the `num_layers` decoder layers holds two pre-norm attention + dense MLP sub-blocks and one "shortcut" MoE:
the MoE reads the first sub-block's MLP input and its output joins the residual stream after the second sub-block
(transformers counts `num_hidden_layers` = 2 * num_layers, and a config that states `num_hidden_layers` sets
num_layers to half of it, as LongcatFlashConfig's setter does). Both attention blocks cache their own latents
(`CacheList`).

Attention is DeepSeek-V3's latent attention (core/mla.py), always with low-rank queries, interleaved RoPE whose
frequencies come from `head_dim` (which must equal `qk_rope_head_dim`), the YaRN softmax scale of `mscale_all_dim`,
and LongCat's LoRA scaling: queries times sqrt(hidden_size / q_lora_rank), the normed latent times
sqrt(hidden_size / kv_lora_rank). transformers 5 always applies them and no longer writes the Hub configs'
`mla_scale_q_lora` / `mla_scale_kv_lora` flags; like LongcatFlashConfig we accept them and ignore their value, and
the export writes them true for mlx-lm, which reads them.

The MoE routes over `n_routed_experts` experts of `expert_ffn_hidden_size` plus `zero_expert_num` zero-computation
experts that return their input: softmax over all of them (float32), the `moe_topk` best by probability +
`router.e_score_correction_bias`, weighted by their probabilities times `routed_scaling_factor`, never
renormalised (transformers reads no `norm_topk_prob`). A `router_bias` classifier bias is loaded by transformers but
never applied: dropped. Multi-token-prediction weights (`model.mtp.*`) are dropped, as transformers ignores them.

mlx-lm's longcat_flash reads the output (kv_b_proj split per head, experts under `switch_mlp`) where transformers
and it agree; it would apply `router_bias`, `norm_topk_prob` and false `mla_scale_*` flags, which transformers does
not (the export writes what we compute), and it has only SiLU MLPs and an untied head."""

from dataclasses import dataclass
from functools import cached_property, partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .core.cache import CacheList, KVCache
from .core.kinds import FULL, KindedLayer
from .core.layers import MLP
from .core.mla import LatentAttention, SplitKeyValueHeads, softmax_scale
from .core.moe import RoutedModel, SparseMoE, softmax_topk_corrected, stack_experts
from .core.rope import initialize_rope
from .core.weights import Drop

# LongcatFlashConfig.attribute_map: an alias given in the config wins over the key it stands for.
ALIASES = {"num_local_experts": "n_routed_experts", "num_experts_per_tok": "moe_topk",
           "intermediate_size": "ffn_hidden_size", "moe_intermediate_size": "expert_ffn_hidden_size"}


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 131072
    hidden_size: int = 6144
    num_layers: int = 28
    num_hidden_layers: Optional[int] = None
    num_attention_heads: int = 64
    max_position_embeddings: Optional[int] = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000000.0
    ffn_hidden_size: int = 12288
    intermediate_size: Optional[int] = None
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    head_dim: Optional[int] = 64
    v_head_dim: int = 128
    qk_head_dim: Optional[int] = None
    moe_topk: int = 12
    num_experts_per_tok: Optional[int] = None
    n_routed_experts: int = 512
    num_local_experts: Optional[int] = None
    zero_expert_num: int = 256
    expert_ffn_hidden_size: int = 2048
    moe_intermediate_size: Optional[int] = None
    routed_scaling_factor: float = 6.0
    router_bias: bool = False
    windowed = False

    def __post_init__(self):
        for alias, name in ALIASES.items():
            if getattr(self, alias) is not None:
                setattr(self, name, getattr(self, alias))
        if self.num_hidden_layers is not None:
            self.num_layers = self.num_hidden_layers // 2
        self.num_hidden_layers = 2 * self.num_layers
        self.qk_head_dim = self.qk_head_dim or self.qk_nope_head_dim + self.qk_rope_head_dim
        super().__post_init__()
        self.refuse_what_transformers_cannot_run()

    def refuse_what_transformers_cannot_run(self):
        if self.q_lora_rank is None:
            raise ValueError("longcat_flash always projects queries through q_lora_rank (transformers' "
                             "LongcatFlashMLA has no full-rank q_proj): set q_lora_rank")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(f"longcat_flash expands its latents to every query head: num_key_value_heads "
                             f"({self.num_key_value_heads}) must equal num_attention_heads "
                             f"({self.num_attention_heads}), as transformers fails otherwise")
        if self.head_dim != self.qk_rope_head_dim:
            raise ValueError(f"longcat_flash takes its RoPE frequencies from head_dim ({self.head_dim}) and rotates "
                             f"qk_rope_head_dim ({self.qk_rope_head_dim}) features: transformers fails unless they "
                             "are equal")
        if self.qk_head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
            raise ValueError(f"qk_head_dim ({self.qk_head_dim}) must be qk_nope_head_dim + qk_rope_head_dim "
                             f"({self.qk_nope_head_dim + self.qk_rope_head_dim}), as transformers splits queries")


class Router(nn.Module):
    """LongcatFlashTopkRouter's weights: `classifier` and `e_score_correction_bias` over the real and the zero
    experts. Its logits are computed in float32, as transformers keeps the classifier in float32."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.classifier = nn.Linear(hidden_size, num_experts, bias=False)
        self.e_score_correction_bias = mx.zeros((num_experts,))

    def __call__(self, x):
        return self.classifier(x.astype(mx.float32))


class ZeroExpertMoE(SparseMoE):
    """Routed experts of which the last `zero_experts` (indices >= num_experts) are the identity: their weight
    multiplies the input itself, the rest go through the gathered experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, zero_experts: int, route,
                 act: str = "silu"):
        super().__init__(hidden_size, intermediate_size, num_experts, route, act,
                         gate=Router(hidden_size, num_experts + zero_experts), gate_name="router",
                         correction_bias="router.e_score_correction_bias")
        self.num_experts = num_experts

    def __call__(self, x):
        indices, weights = self.route(self.router(x), correction_bias=self.router.e_score_correction_bias)
        identity = indices >= self.num_experts
        y = self.switch_mlp(x, mx.where(identity, 0, indices))  # an identity slot computes expert 0, weighted 0
        y = (y * mx.where(identity, 0.0, weights)[..., None].astype(x.dtype)).sum(axis=-2)
        return y + x * mx.where(identity, weights, 0.0).sum(axis=-1, keepdims=True).astype(x.dtype)


class DecoderLayer(KindedLayer, nn.Module):
    """Two attention + MLP sub-blocks with the shortcut MoE, under the checkpoint's names (`self_attn.{0,1}`,
    `mlps.{0,1}`, `input_layernorm.{0,1}`, `post_attention_layernorm.{0,1}`, `mlp`)."""

    def __init__(self, attns: list, mlps: list, moe: nn.Module, norm):
        super().__init__()
        self.self_attn, self.mlps, self.mlp = attns, mlps, moe
        self.input_layernorm = [norm(), norm()]
        self.post_attention_layernorm = [norm(), norm()]
        self.kind = FULL

    def __call__(self, x, mask=None, cache=None):
        caches = cache if cache is not None else (None, None)
        h = x + self.self_attn[0](self.input_layernorm[0](x), mask, caches[0])
        m = self.post_attention_layernorm[0](h)
        shortcut = self.mlp(m)
        h = h + self.mlps[0](m)
        h = h + self.self_attn[1](self.input_layernorm[1](h), mask, caches[1])
        return h + self.mlps[1](self.post_attention_layernorm[1](h)) + shortcut

    def make_cache(self):
        return CacheList(KVCache(), KVCache())


class Model(RoutedModel, llama.Model):
    reference_reads_children = True  # transformers' router reads its classifier's weight without calling it

    def layer_kinds(self) -> list:
        return [FULL] * self.args.num_layers

    @cached_property
    def rope(self):
        a = self.args
        return initialize_rope(a.head_dim, a.rope_theta, True, a.rope_scaling, a.max_position_embeddings)

    def attention(self, index: int, kind=FULL) -> LatentAttention:
        a = self.args
        return LatentAttention(a.hidden_size, a.num_attention_heads, a.q_lora_rank, a.kv_lora_rank,
                               a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, self.rope,
                               softmax_scale(a.qk_head_dim, a.rope_scaling), bias=a.attention_bias,
                               q_scale=(a.hidden_size / a.q_lora_rank) ** 0.5,
                               latent_scale=(a.hidden_size / a.kv_lora_rank) ** 0.5)

    def moe(self) -> ZeroExpertMoE:
        a = self.args
        route = partial(softmax_topk_corrected, k=a.moe_topk, normalize=False, scaling=a.routed_scaling_factor)
        return ZeroExpertMoE(a.hidden_size, a.expert_ffn_hidden_size, a.n_routed_experts, a.zero_expert_num, route,
                             a.hidden_act)

    def layer(self, index: int, kind=FULL) -> DecoderLayer:
        a = self.args
        return DecoderLayer([self.attention(index), self.attention(index)],
                            [MLP(a.hidden_size, a.ffn_hidden_size, a.hidden_act) for _ in range(2)], self.moe(),
                            self.norm)

    def export_config(self, config: dict) -> dict:
        """The keys mlx-lm's longcat_flash requires, stating what this model computes (transformers' semantics)."""
        a = self.args
        return {**config, "num_layers": a.num_layers, "ffn_hidden_size": a.ffn_hidden_size,
                "expert_ffn_hidden_size": a.expert_ffn_hidden_size, "moe_topk": a.moe_topk,
                "n_routed_experts": a.n_routed_experts, "attention_method": "MLA", "zero_expert_type": "identity",
                "mla_scale_q_lora": True, "mla_scale_kv_lora": True, "norm_topk_prob": False, "router_bias": False}

    def weight_rules(self) -> list:
        a = self.args
        leaves = ("weight", "bias", "e_score_correction_bias")
        rules = [Drop(*(f"model.mtp.{{*}}{leaf}" for leaf in leaves), why="multi-token-prediction layers, unused "
                      "by inference")]
        if a.router_bias:
            rules.append(Drop("model.layers.{i}.mlp.router.classifier.bias", why="transformers' router never "
                              "applies its bias"))
        return super().weight_rules() + rules + stack_experts("model.layers.{i}.mlp", a.n_routed_experts) \
            + [SplitKeyValueHeads("model.layers.{i}.self_attn.{e}.", a.num_attention_heads, a.qk_nope_head_dim,
                                  a.v_head_dim)]
