"""Llama 4 (text), mirroring transformers/models/llama4/modeling_llama4.py (`Llama4ForCausalLM`).

Differences from llama:
- Chunked attention: layers marked `chunked_attention` in `layer_types` (by default those with RoPE, when
  `attention_chunk_size` is set) attend only within their chunk of `attention_chunk_size` tokens.
- NoPE layers: `no_rope_layers[i] == 0` turns RoPE off in layer i (by default every `no_rope_layer_interval`-th);
  RoPE rotates interleaved pairs (transformers' complex product). Layers with RoPE put queries and keys through a
  weightless RMS norm when `use_qk_norm`; layers without scale their queries by the attention temperature
  1 + attn_scale * log(1 + floor((position + 1) / floor_scale)) when `attn_temperature_tuning`.
- `feed_forward` is a dense MLP of `intermediate_size_mlp`, or, on the layers of `moe_layers` (by default every
  `interleave_moe_layer_step`-th), `num_local_experts` experts of `intermediate_size` behind a router that keeps
  the `num_experts_per_tok` largest logits and gives each chosen expert its input scaled by sigmoid(logit), plus an
  ungated shared expert. The checkpoint stores the experts fused as (E, in, out) parameters `gate_up_proj`
  ([gate | up] along the last axis) and `down_proj`.

mlx-lm's llama4_text is another model (dense, no chunks, head named `output`); its llama4 container reads this
layout under `language_model.`.
"""

from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .core.kinds import LayerKind, layer_kinds
from .core.layers import MLP, Attention, DecoderLayer, WeightlessRMSNorm
from .core.moe import RoutedModel, SparseMoE, topk_sigmoid
from .core.weights import Move, Split, Transpose


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192
    intermediate_size_mlp: int = 16384
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: Optional[int] = 8
    head_dim: Optional[int] = 128
    max_position_embeddings: Optional[int] = 4096 * 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    num_experts_per_tok: int = 1
    num_local_experts: int = 16
    moe_layers: Optional[list] = None
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True
    no_rope_layers: Optional[list] = None
    no_rope_layer_interval: int = 4
    attention_chunk_size: Optional[int] = 8192
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    windowed = False

    def __post_init__(self):  # Llama4TextConfig's rules
        n = self.num_hidden_layers
        if not self.no_rope_layers:
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(n)]
        if self.moe_layers is None:
            self.moe_layers = list(range(self.interleave_moe_layer_step - 1, n, self.interleave_moe_layer_step))
        if self.layer_types is None:
            self.layer_types = ["chunked_attention" if rope and self.attention_chunk_size is not None
                                else "full_attention" for rope in self.no_rope_layers]
        super().__post_init__()


class TemperedAttention(Attention):
    """Attention of a NoPE layer with temperature tuning: queries scaled by 1 + scale * log1p(floor((p + 1) / floor))
    at position p, which grows the sharpness of attention with the distance covered."""

    def __init__(self, *args, floor_scale: int, attn_scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.floor_scale, self.attn_scale = floor_scale, attn_scale

    def __call__(self, x, mask=None, cache=None):
        q, k, v = self.project(x)
        offset = cache.offset if cache is not None else 0
        positions = mx.arange(offset, offset + x.shape[1], dtype=mx.float32)
        temperature = mx.log1p(mx.floor((positions + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
        q = q * temperature[:, None].astype(q.dtype)
        return self.o_proj(self.attend(q, k, v, mask, cache))


class Llama4MoE(SparseMoE):
    """Each chosen expert computes on the token scaled by its router score (not its output scaled); the shared expert
    is added ungated."""

    def __call__(self, x):
        indices, scores = self.route(self.router(x))
        routed = self.experts(mx.expand_dims(x, -2) * scores[..., None].astype(x.dtype), indices)
        return routed.sum(axis=-2) + self.shared_expert(x)


class FeedForwardLayer(DecoderLayer):
    """llama's block with its MLP under the checkpoint's name `feed_forward`."""

    def __init__(self, attn, mlp, norm, kind):
        super().__init__(attn, mlp, norm, kind)
        self.feed_forward = self.pop("mlp")

    def __call__(self, x, mask=None, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.feed_forward(self.post_attention_layernorm(h))


class Model(RoutedModel, llama.Model):
    rope_traditional = True

    def layer_kinds(self) -> list:
        a = self.args
        return layer_kinds(a.layer_types, a.num_hidden_layers, chunk=a.attention_chunk_size)

    def attention(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        args = (a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim)
        if a.no_rope_layers[index]:
            norm = (lambda dims: WeightlessRMSNorm(a.rms_norm_eps)) if a.use_qk_norm else None
            return Attention(*args, self.rope, qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm=norm)
        if a.attn_temperature_tuning:
            return TemperedAttention(*args, None, qkv_bias=a.attention_bias, o_bias=a.attention_bias,
                                     floor_scale=a.floor_scale, attn_scale=a.attn_scale)
        return Attention(*args, None, qkv_bias=a.attention_bias, o_bias=a.attention_bias)

    def mlp(self, index: int) -> nn.Module:
        a = self.args
        if index not in a.moe_layers:
            return MLP(a.hidden_size, a.intermediate_size_mlp, a.hidden_act)
        return Llama4MoE(a.hidden_size, a.intermediate_size, a.num_local_experts,
                         partial(topk_sigmoid, k=a.num_experts_per_tok), a.hidden_act,
                         shared=MLP(a.hidden_size, a.intermediate_size, a.hidden_act),
                         gate_name="router", switch_name="experts")

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        return FeedForwardLayer(self.attention(index, kind), self.mlp(index), self.norm, kind)

    def weight_rules(self) -> list:
        e, size = "model.layers.{i}.feed_forward.experts", self.args.intermediate_size
        return super().weight_rules() + [
            Transpose(f"{e}.gate_up_proj", f"{e}.down_proj"),  # (E, in, out) parameters -> (E, out, in)
            Split(f"{e}.gate_up_proj", [f"{e}.gate_proj.weight", f"{e}.up_proj.weight"], [size, size], axis=1),
            Move(f"{e}.down_proj", f"{e}.down_proj.weight")]
