"""Phi-3.5-MoE, mirroring transformers/models/phimoe/modeling_phimoe.py: Mixtral's layout (experts `w1`/`w3`/`w2`
under `block_sparse_moe`, a sliding window on every layer when `sliding_window` is set) with LayerNorms (weight and
bias, eps `rms_norm_eps`), q/k/v/o biases when `attention_bias`, a head bias when `lm_head_bias`, and:

- the "sparsemixer" router: always two experts whatever `num_experts_per_tok`, each weighted by a softmax over the
  experts whose logits lie within a relative band of 2 * `router_jitter_noise` below the pick (`sparsemixer`);
- LongRoPE with its own attention scaling: the short factors at every length (transformers computes the
  frequencies without the sequence length), cos and sin multiplied by `short_mscale`, or by `long_mscale` in a call
  whose positions reach past `original_max_position_embeddings`.

mlx-lm's phimoe always has the attention and head biases and applies LongRoPE's long factors."""

from dataclasses import dataclass
from functools import cached_property, partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import mixtral
from .core.layers import make_rope
from .phi import HeadBias


@dataclass
class ModelArgs(mixtral.ModelArgs):
    vocab_size: int = 32064
    intermediate_size: int = 6400
    num_local_experts: Optional[int] = 16
    router_jitter_noise: float = 0.01
    lm_head_bias: bool = False


def sparsemixer(logits: mx.array, jitter_eps: float, k: int = 2):
    """Phi-MoE's inference routing: pick the best remaining expert k times; weigh each pick by the softmax of the
    remaining logits, from which those more than 2 * jitter_eps (relative to max(|logit|, pick)) below the pick are
    masked out."""
    logits = logits.astype(mx.float32)
    remaining, indices, weights = logits, [], []
    for _ in range(k):
        pick = mx.argmax(remaining, axis=-1, keepdims=True)
        best = mx.take_along_axis(remaining, pick, axis=-1)
        far = (best - logits) / mx.maximum(mx.abs(logits), best) > 2 * jitter_eps
        band = mx.softmax(mx.where(far, -mx.inf, remaining), axis=-1)
        indices.append(pick)
        weights.append(mx.take_along_axis(band, pick, axis=-1))
        remaining = mx.put_along_axis(remaining, pick, mx.array(-mx.inf), axis=-1)
    return mx.concatenate(indices, axis=-1), mx.concatenate(weights, axis=-1)


class MscaledLongRoPE(nn.Module):
    """LongRoPE with the short factors and a per-call scale: `short` below the original length, `long` past it."""

    def __init__(self, short: nn.Module, long: nn.Module, original_max_position_embeddings: int):
        super().__init__()
        self.short, self.long, self.original_max = short, long, original_max_position_embeddings

    def __call__(self, x, offset: int = 0):
        return (self.long if int(offset) + x.shape[-2] > self.original_max else self.short)(x, offset)


class Model(mixtral.Model):
    def norm(self) -> nn.Module:
        return nn.LayerNorm(self.args.hidden_size, eps=self.args.rms_norm_eps)

    @cached_property
    def rope(self):
        a = self.args
        scaling = a.rope_scaling
        if not scaling or scaling.get("rope_type") != "longrope":
            return super().rope
        # The same (short) frequencies twice, each with one of the two scales as LongRoPE's attention factor.
        rope = lambda mscale: make_rope(a.head_dim, a.rope_theta, {  # noqa: E731
            **scaling, "long_factor": scaling["short_factor"], "attention_factor": scaling[mscale]},
            a.partial_rotary_factor, a.max_position_embeddings)
        original = scaling.get("original_max_position_embeddings") or a.max_position_embeddings
        return MscaledLongRoPE(rope("short_mscale"), rope("long_mscale"), original)

    def router(self):
        return partial(sparsemixer, jitter_eps=self.args.router_jitter_noise)

    def output_head(self) -> Optional[nn.Module]:
        a = self.args
        if a.tie_word_embeddings:
            return HeadBias(a.vocab_size) if a.lm_head_bias else None
        return nn.Linear(a.hidden_size, a.vocab_size, bias=a.lm_head_bias)

    def head(self, h):
        logits = super().head(h)
        return logits + self.lm_head.bias if self.args.tie_word_embeddings and self.args.lm_head_bias else logits
