"""GPT-OSS, mirroring transformers/models/gpt_oss/modeling_gpt_oss.py: llama-shaped blocks whose attention has
biases (`attention_bias`, default true) and one learned logit per head, the sink, that joins every softmax as a key
without a value; sliding-window layers from `layer_types` (every other layer, starting with a sliding one, when the
config has none); YaRN RoPE (GptOssConfig's default when the config names no RoPE scaling); and a sparse MoE MLP on
every layer: a router with a bias keeps the `num_experts_per_tok` largest logits and softmaxes them, each expert a
biased clamped SwiGLU, (clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit).

transformers keeps a layer's experts as (in, out) parameters, gate and up interleaved along the fused output axis
(`gate_up_proj[..., ::2]` is the gate); we store them as mlx-lm does: `mlp.experts.{gate,up,down}_proj` (out, in)
and `mlp.router`. The released checkpoints store the expert matrices as MXFP4 `*_blocks` / `*_scales` (out, in; rows
interleaved the same way): those stay MXFP4 byte for byte (core/mxfp4.py)."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .core.base import scaled_dot_product_attention
from .core.kinds import LayerKind
from .core.layers import Attention
from .core.moe import RoutedModel, SwitchGLU, topk_softmax
from .core.mxfp4 import PackBlocks, source_format
from .core.weights import Move, Split, Transpose

# GptOssConfig's RoPE scaling when a config names none (the base stays `rope_theta`, 150000 by default).
DEFAULT_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    num_key_value_heads: Optional[int] = 8
    head_dim: Optional[int] = 64
    max_position_embeddings: Optional[int] = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    attention_bias: bool = True
    sliding_window: Optional[int] = 128
    num_local_experts: Optional[int] = None
    num_experts: Optional[int] = None  # GptOssConfig's other name for num_local_experts
    num_experts_per_tok: int = 4
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    source_format: Optional[str] = None  # "mxfp4": the checkpoint stores its experts as MXFP4 blocks

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        args = super().from_dict(config)
        if config.get("rope_parameters") is None and config.get("rope_scaling") is None:
            args.rope_scaling = dict(DEFAULT_YARN)
        args.source_format = source_format(config)
        return args

    def __post_init__(self):
        if self.num_local_experts is None:
            self.num_local_experts = self.num_experts if self.num_experts is not None else 128
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        super().__post_init__()


class SinkAttention(Attention):
    """Attention whose softmax counts each head's learned sink logit as one more key; its share is dropped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sinks = mx.zeros((self.n_heads,))

    def attend(self, q, k, v, mask, cache):
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # The fused kernel wants sinks of the activations' dtype.
        out = scaled_dot_product_attention(q, k, v, cache, self.scale, mask, sinks=self.sinks.astype(q.dtype))
        B, _, L, _ = out.shape
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


def clamped_swiglu(gate, up, alpha: float, limit: float):
    """GptOssExperts._apply_gate on split halves: the gate clipped from above, up from both sides, up shifted by one."""
    gate = mx.minimum(gate, limit)
    return (mx.clip(up, -limit, limit) + 1) * gate * mx.sigmoid(alpha * gate)


class ClampedSwitchGLU(SwitchGLU):
    """Gathered experts with biases computing down(clamped_swiglu(gate(x), up(x)))."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, alpha: float, limit: float):
        super().__init__(hidden_size, intermediate_size, num_experts, bias=True)
        self.alpha, self.limit = alpha, limit

    def experts(self, x, indices, sorted_indices: bool = False):
        h = clamped_swiglu(self.gate_proj(x, indices, sorted_indices), self.up_proj(x, indices, sorted_indices),
                           self.alpha, self.limit)
        return self.down_proj(h, indices, sorted_indices)


class SparseMLP(nn.Module):
    """GptOssMLP: route with `router` (top-k logits, softmax over them), sum the chosen experts' weighted outputs."""

    float_children = frozenset({"router"})  # kept in full precision (core/moe.py, RoutedModel)

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.router = nn.Linear(a.hidden_size, a.num_local_experts, bias=True)
        self.experts = ClampedSwitchGLU(a.hidden_size, a.intermediate_size, a.num_local_experts, a.swiglu_alpha,
                                        a.swiglu_limit)
        self.top_k = a.num_experts_per_tok

    def __call__(self, x):
        indices, weights = topk_softmax(self.router(x), self.top_k)
        return (self.experts(x, indices) * weights[..., None].astype(x.dtype)).sum(axis=-2)


class Model(RoutedModel, llama.Model):
    source_formats = ("mxfp4",)  # transformers-quantized checkpoints this family reads (pre-flight accepts them)

    def attention(self, index: int, kind: LayerKind) -> SinkAttention:
        a = self.args
        return SinkAttention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                             qkv_bias=a.attention_bias, o_bias=a.attention_bias)

    def mlp(self, index: int) -> SparseMLP:
        return SparseMLP(self.args)

    def weight_rules(self) -> list:
        e, size = "model.layers.{i}.mlp.experts", self.args.intermediate_size
        if self.args.source_format == "mxfp4":
            # MXFP4 blocks are (out, in) already; MLX keeps their bytes and their scales as they are.
            layout = [PackBlocks(f"{e}.gate_up_proj_blocks", f"{e}.gate_up_proj.weight"),
                      Move(f"{e}.gate_up_proj_scales", f"{e}.gate_up_proj.scales"),
                      PackBlocks(f"{e}.down_proj_blocks", f"{e}.down_proj.weight"),
                      Move(f"{e}.down_proj_scales", f"{e}.down_proj.scales")]
            fused = [".weight", ".scales"]
        else:
            layout = [Transpose(f"{e}.gate_up_proj", f"{e}.down_proj"),  # (in, out) parameters -> (out, in)
                      Move(f"{e}.gate_up_proj", f"{e}.gate_up_proj.weight"),
                      Move(f"{e}.down_proj", f"{e}.down_proj.weight")]
            fused = [".weight"]
        # Gate and up alternate along the fused output axis: the weight's rows, the bias's entries.
        split = [Split(f"{e}.gate_up_proj{leaf}", [f"{e}.gate_proj.{name}", f"{e}.up_proj.{name}"], [size, size],
                       axis=1, interleave=1)
                 for leaf, name in [(leaf, leaf[1:]) for leaf in fused] + [("_bias", "bias")]]
        return super().weight_rules() + layout + split + [Move(f"{e}.down_proj_bias", f"{e}.down_proj.bias")]

    def export_config(self, config: dict) -> dict:
        # mlx-lm reads `num_local_experts` only and assumes plain RoPE where GptOssConfig defaults to YaRN.
        a = self.args
        out = {**config, "num_local_experts": a.num_local_experts, "layer_types": a.layer_types}
        if config.get("rope_parameters") is None and config.get("rope_scaling") is None:
            out["rope_scaling"] = a.rope_scaling
        return out
