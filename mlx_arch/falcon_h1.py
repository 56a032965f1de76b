"""Falcon-H1, mirroring transformers/models/falcon_h1/modeling_falcon_h1.py: every layer runs a Mamba-2 mixer
(`mamba`) and Llama attention (`self_attn`, keys times `key_multiplier`) side by side on the same normed input
(`input_layernorm`), x + ssm_out_multiplier * mamba(h) + attention_out_multiplier * attn(attention_in_multiplier *
h), then a gated MLP (`feed_forward`, the gate projection's output times mlp_multipliers[0], the down projection's
times mlp_multipliers[1]) after `pre_ff_layernorm`; `final_layernorm`. The mixer's inner width is `mamba_d_ssm`
(else mamba_expand * hidden_size), its input is scaled by `ssm_in_multiplier` and its projection by the muP vector
(`ssm_multipliers` over the gate, x, B, C and dt channels); its gated RMS norm is optional (`mamba_rms_norm`, grouped,
`mamba_norm_before_gate`). Embeddings are scaled by `embedding_multiplier`, logits by `lm_head_multiplier`.

Every one of these multipliers is a constant factor of a linear map, folded into the weights by `sanitize` as
mlx-lm's falcon_h1 folds them (the checkpoint layout is recognised by its convolution weight, so a second run changes
nothing, and the inverse divides them out again); a head tied to the embeddings then scales its logits by
lm_head_multiplier / embedding_multiplier. mlx-lm reads our output so; it computes transformers' function except
that its convolution always applies silu (transformers `hidden_act`), it ignores `time_step_limit` and it normalises
the gated norm over all channels at once (transformers per group when mamba_n_groups > 1): transformers wins.

Each layer's cache is a KVStateCache (core/ssm.py): a KVCache that also holds the mixer's state."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .core.conv import DepthwiseLayout
from .core.kinds import FULL, KindedLayer, LayerKind
from .core.layers import NamedBackbone
from .core.linear import FoldNormOffset
from .core.ssm import GatedRMSNorm, KVStateCache, Mamba2Fields, Mamba2Mixer, SSMModel, time_step_bounds
from .core.weights import Drop

LAYER = "model.layers.{i}"
CONV = f"{LAYER}.mamba.conv1d.weight"


@dataclass
class ModelArgs(llama.ModelArgs, Mamba2Fields):
    model_type: str = "falcon_h1"
    vocab_size: int = 128000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_key_value_heads: Optional[int] = 8
    rms_norm_eps: float = 1e-5
    max_position_embeddings: Optional[int] = 8192
    mamba_d_ssm: Optional[int] = 1024
    mamba_norm_before_gate: bool = True
    mamba_rms_norm: bool = False
    projectors_bias: bool = False
    lm_head_multiplier: float = 1.0
    embedding_multiplier: float = 1.0
    mlp_multipliers: Optional[list] = None
    key_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    ssm_multipliers: Optional[list] = None
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    windowed = False

    def __post_init__(self):
        super().__post_init__()
        if self.mamba_d_ssm is None:
            self.mamba_d_ssm = int(self.mamba_expand * self.hidden_size)
        if self.mamba_d_head == "auto":
            self.mamba_d_head = self.mamba_d_ssm // self.mamba_n_heads
        if self.mamba_d_head * self.mamba_n_heads != self.mamba_d_ssm:
            raise ValueError(f"falcon_h1: mamba_n_heads ({self.mamba_n_heads}) x mamba_d_head ({self.mamba_d_head}) "
                             f"must equal the mixer's width mamba_d_ssm ({self.mamba_d_ssm})")
        self.mlp_multipliers = list(self.mlp_multipliers or (1.0, 1.0))
        self.ssm_multipliers = list(self.ssm_multipliers or (1.0,) * 5)

    def mup_vector(self) -> mx.array:
        """The factor of each of in_proj's output channels: [gate | x | B | C | dt] times ssm_multipliers."""
        d, bc = self.mamba_d_ssm, self.mamba_n_groups * self.mamba_d_state
        sizes = (d, d, bc, bc, self.mamba_n_heads)
        return mx.concatenate([mx.full((n,), m, mx.float32) for n, m in zip(sizes, self.ssm_multipliers)])


class FoldMultipliers(FoldNormOffset):
    """Constant factors (a number, or one per output channel) folded into the declared checkpoint tensors by
    multiplication; the inverse divides. Both give float32 (the later cast rounds once; an inverse that rounded
    again would hand the gate's reference other weights than the output's). Like FoldNormOffset, it acts only while
    the marker convolution is still in the checkpoint's layout, so that sanitize can run twice."""

    rounding = 2.0**-20  # a multiplication and a division in float32 of tensors below 2 in size

    def __init__(self, marker: str, factors: dict, divide: bool = False):
        super().__init__(marker, *factors)
        self.factors, self.divide = list(factors.values()), divide
        for key, f in factors.items():
            if not mx.all(mx.array(f) != 0).item():
                raise ValueError(f"falcon_h1: a multiplier of {key} is zero; such a checkpoint cannot be converted")

    def _scaled(self, v, f):
        f = mx.array(f, mx.float32)
        f = f.reshape(-1, *([1] * (v.ndim - 1))) if f.ndim else f
        return v.astype(mx.float32) / f if self.divide else v.astype(mx.float32) * f

    def apply(self, w):
        if not self._source_layout(w):
            return w
        out = {}
        for k, v in w.items():
            f = next((f for r, f in zip(self.regexes, self.factors) if r.match(k)), None)
            out[k] = v if f is None else self._scaled(v, f)
        return out

    def inverse(self):
        return FoldMultipliers(self.marker, dict(zip(self.patterns, self.factors)), divide=not self.divide)

    def stored_offset(self, key: str) -> float:
        return 0.0


class ParallelBlock(KindedLayer, nn.Module):
    """x + mamba(h) + self_attn(h) with h = input_layernorm(x) (multipliers folded into the weights), then
    + feed_forward(pre_ff_layernorm(.)); one KVStateCache for both mixers."""

    def __init__(self, mamba: Mamba2Mixer, attn: nn.Module, mlp: nn.Module, norm):
        super().__init__()
        self.input_layernorm = norm()
        self.mamba = mamba
        self.self_attn = attn
        self.feed_forward = mlp
        self.pre_ff_layernorm = norm()
        self.kind = FULL

    def __call__(self, x, mask=None, cache=None):
        h = self.input_layernorm(x)
        x = x + self.mamba(h, None, cache) + self.self_attn(h, mask, cache)
        return x + self.feed_forward(self.pre_ff_layernorm(x))

    def make_cache(self) -> KVStateCache:
        return KVStateCache(self.mamba.cache_slots)


class Model(SSMModel, llama.Model):
    @property
    def logit_scale(self) -> float:
        a = self.args  # an untied head has lm_head_multiplier folded in; a tied one shares the scaled embedding
        return a.lm_head_multiplier / a.embedding_multiplier if a.tie_word_embeddings else 1.0

    def mixer(self) -> Mamba2Mixer:
        a = self.args
        norm = (GatedRMSNorm(a.mamba_d_ssm, a.mamba_n_groups, a.rms_norm_eps, a.mamba_norm_before_gate)
                if a.mamba_rms_norm else None)
        return Mamba2Mixer(a.hidden_size, a.mamba_n_heads, a.mamba_d_head, a.mamba_d_state, a.mamba_n_groups,
                           a.mamba_d_conv, a.mamba_chunk_size, a.time_step_limit, a.mamba_proj_bias,
                           a.mamba_conv_bias, a.hidden_act, norm, out_bias=a.projectors_bias)

    def layer(self, index: int, kind: LayerKind) -> ParallelBlock:
        return ParallelBlock(self.mixer(), self.attention(index, kind), self.mlp(index), self.norm)

    def backbone(self, layers: list) -> nn.Module:
        return NamedBackbone(self.args.vocab_size, self.args.hidden_size, layers, self.norm(),
                             names=("embed_tokens", "layers", "final_layernorm"))

    def multipliers(self) -> dict:
        """{checkpoint key template: the factor transformers applies to that tensor's output}."""
        a = self.args
        attn, mamba, mlp = f"{LAYER}.self_attn", f"{LAYER}.mamba", f"{LAYER}.feed_forward"
        gate, down = a.mlp_multipliers
        mup = a.mup_vector()
        table = {"model.embed_tokens.weight": a.embedding_multiplier, "lm_head.weight": a.lm_head_multiplier,
                 f"{attn}.q_proj.weight": a.attention_in_multiplier, f"{attn}.v_proj.weight": a.attention_in_multiplier,
                 f"{attn}.k_proj.weight": a.attention_in_multiplier * a.key_multiplier,
                 f"{attn}.k_proj.bias": a.key_multiplier,
                 f"{mamba}.in_proj.weight": mup * a.ssm_in_multiplier, f"{mamba}.in_proj.bias": mup}
        for leaf in ("weight", "bias"):
            table.update({f"{attn}.o_proj.{leaf}": a.attention_out_multiplier,
                          f"{mamba}.out_proj.{leaf}": a.ssm_out_multiplier,
                          f"{mlp}.gate_proj.{leaf}": gate, f"{mlp}.down_proj.{leaf}": down})
        return {k: f for k, f in table.items() if not mx.all(mx.array(f) == 1.0).item()}

    def weight_rules(self) -> list:
        return super().weight_rules() + [
            Drop(f"{LAYER}.mamba.mup_vector", why="computed from ssm_multipliers, as transformers does"),
            FoldMultipliers(CONV, self.multipliers()), DepthwiseLayout(CONV)]

    def export_config(self, config: dict) -> dict:
        # mlx-lm's defaults differ from transformers' for these, or it reads only the resolved numbers.
        a = self.args
        return {**config, "head_dim": a.head_dim, "mamba_d_ssm": a.mamba_d_ssm, "mamba_d_head": a.mamba_d_head,
                "rope_theta": a.rope_theta, "time_step_limit": list(time_step_bounds(a.time_step_limit))}
