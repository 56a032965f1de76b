"""Nemotron-H, mirroring transformers/models/nemotron_h/modeling_nemotron_h.py: every layer is x + mixer(norm(x))
with one mixer per layer, by `layers_block_type`: a Mamba-2 mixer ("linear_attention"), attention without position
embeddings ("full_attention"), a non-gated MLP ("mlp", `up_proj` -> `mlp_hidden_act` -> `down_proj`) or a MoE block
("moe": DeepSeek-V3-style sigmoid routing with a correction bias, non-gated experts, an optional latent projection
`moe_latent_size` around them, and a shared MLP). Only the Mamba and attention layers keep a cache.

Configs in the wild: the layer list as `layers_block_type` (its legacy spellings "mamba" / "attention" too) or the
string `hybrid_override_pattern` ("M", "*", "-", "E"), and the Mamba keys under their old `mamba_*` names, which
win over the new ones as in NemotronHConfig. Checkpoints (transformers 5 saves them so too) store `backbone.` and
one tensor per expert; the module tree is mlx-lm's (experts stacked under `mixer.switch_mlp.fc1` / `fc2`). The head is
never tied to the embeddings, whatever `tie_word_embeddings` says (transformers and mlx-lm keep `lm_head`)."""

from dataclasses import dataclass
from functools import partial
from typing import Optional, Union

import mlx.nn as nn

from . import mamba
from .core.base import BaseModelArgs
from .core.cache import StateCache
from .core.conv import DepthwiseLayout
from .core.kinds import FULL, LayerKind
from .core.layers import Attention, DenseMLP, activation
from .core.moe import RoutedModel, SparseMoE, SwitchGLU, SwitchLinear, sigmoid_topk
from .core.ssm import RECURRENT, GatedRMSNorm, Mamba2Mixer, MixerBlock, time_step_bounds
from .core.weights import Stack

PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
LEGACY_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}
# NemotronHConfig's old Mamba key names -> the current ones (the old name wins when both are present).
OLD_KEYS = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
            "mamba_dt_limit": "time_step_limit", "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size"}
MIXER = "backbone.layers.{i}.mixer"


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "nemotron_h"
    vocab_size: int = 131072
    hidden_size: int = 4096
    layers_block_type: Optional[list] = None
    tie_word_embeddings: bool = False
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 8
    head_dim: Optional[int] = 128
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    ssm_state_size: int = 128
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    mamba_hidden_act: str = "silu"
    n_groups: int = 8
    conv_kernel: int = 4
    time_step_limit: Optional[Union[list, tuple]] = (0.0, float("inf"))
    use_conv_bias: bool = True
    chunk_size: int = 128
    use_bias: bool = False
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: Optional[int] = None
    num_experts_per_tok: int = 2
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    layer_norm_epsilon: float = 1e-5

    @classmethod
    def from_dict(cls, config: dict):
        config = dict(config)
        for old, new in OLD_KEYS.items():
            if old in config:
                config[new] = config.pop(old)
        if config.get("num_local_experts") is not None and "n_routed_experts" not in config:
            config["n_routed_experts"] = config["num_local_experts"]
        types = config.get("layers_block_type") or config.get("layer_types")
        if types is None and config.get("hybrid_override_pattern"):
            types = [PATTERN[c] for c in config["hybrid_override_pattern"]]
        config["layers_block_type"] = [LEGACY_TYPES.get(t, t) for t in types or PATTERN.values()]
        return super().from_dict(config)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.num_hidden_layers = len(self.layers_block_type)  # NemotronHConfig ignores a stated count
        self.tie_word_embeddings = False
        unknown = sorted(set(self.layers_block_type) - set(PATTERN.values()))
        if unknown:
            raise ValueError(f"nemotron_h layers_block_type has unknown entries {unknown}; known: "
                             f"{sorted(PATTERN.values())}")


class SwitchMLP(SwitchGLU):
    """Non-gated expert MLPs fc2(act(fc1(x))) under mlx-lm's names (SwitchGLU's routing of tokens to experts)."""

    sensitive_children = ("fc2",)

    def __init__(self, input_size: int, intermediate_size: int, num_experts: int, act: str):
        nn.Module.__init__(self)
        self.fc1 = SwitchLinear(input_size, intermediate_size, num_experts)
        self.fc2 = SwitchLinear(intermediate_size, input_size, num_experts)
        self.act = activation(act)

    def experts(self, x, indices, sorted_indices: bool = False):
        return self.fc2(self.act(self.fc1(x, indices, sorted_indices)), indices, sorted_indices)


class LatentMoE(SparseMoE):
    """The sparse block whose experts run in a `moe_latent_size` space (fc1_latent_proj / fc2_latent_proj), routed
    and shared on the full hidden state; mixer(h, mask, cache) like the other mixers."""

    def __init__(self, *args, latent: Optional[int] = None, hidden_size: int = 0, bias: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if latent is not None:
            self.fc1_latent_proj = nn.Linear(hidden_size, latent, bias=bias)
            self.fc2_latent_proj = nn.Linear(latent, hidden_size, bias=bias)

    def __call__(self, x, mask=None, cache=None):
        if "fc1_latent_proj" not in self:
            return super().__call__(x)
        indices, weights = self.route(self.gate(x), correction_bias=self.gate.e_score_correction_bias)
        y = self.switch_mlp(self.fc1_latent_proj(x), indices)
        y = self.fc2_latent_proj((y * weights[..., None].astype(y.dtype)).sum(axis=-2))
        return y + self.shared_experts(x)


class FeedForward(DenseMLP):
    def __call__(self, x, mask=None, cache=None):
        return super().__call__(x)


class Block(MixerBlock):
    """x + mixer(norm(x)); the cache is the mixer's (attention: by kind; MLP and MoE layers keep nothing)."""

    def __init__(self, mixer, norm, kind: LayerKind):
        super().__init__(mixer, norm)
        self.kind = kind

    def __call__(self, x, mask=None, cache=None):
        return x + self.mixer(self.norm(x), mask, cache)

    def make_cache(self):
        if self.kind.attends:
            return self.kind.make_cache()
        return StateCache(getattr(self.mixer, "cache_slots", 0))


class Model(mamba.Model, RoutedModel):
    def layer_kinds(self) -> list:
        return [FULL if t == "full_attention" else RECURRENT for t in self.args.layers_block_type]

    def mixer(self, index: int) -> nn.Module:
        a = self.args
        kind = a.layers_block_type[index]
        if kind == "linear_attention":
            inner = a.mamba_num_heads * a.mamba_head_dim
            return Mamba2Mixer(a.hidden_size, a.mamba_num_heads, a.mamba_head_dim, a.ssm_state_size, a.n_groups,
                               a.conv_kernel, a.chunk_size, a.time_step_limit, a.use_bias, a.use_conv_bias,
                               a.mamba_hidden_act, GatedRMSNorm(inner, a.n_groups, a.layer_norm_epsilon))
        if kind == "full_attention":  # no position embeddings, no biases
            return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, None)
        if kind == "mlp":
            return self.mlp(a.intermediate_size)
        return self.moe()

    def mlp(self, size: int) -> FeedForward:
        a = self.args
        return FeedForward(a.hidden_size, size, a.mlp_hidden_act, a.mlp_bias, names=("up_proj", "down_proj"))

    def moe(self) -> LatentMoE:
        a = self.args
        route = partial(sigmoid_topk, k=a.num_experts_per_tok, scaling=a.routed_scaling_factor,
                        normalize=a.norm_topk_prob, n_group=a.n_group, topk_group=a.topk_group)
        width = a.moe_latent_size or a.hidden_size
        return LatentMoE(a.hidden_size, a.moe_intermediate_size, a.n_routed_experts, route,
                         switch=SwitchMLP(width, a.moe_intermediate_size, a.n_routed_experts, a.mlp_hidden_act),
                         shared=self.mlp(a.moe_shared_expert_intermediate_size), shared_name="shared_experts",
                         correction_bias="gate.e_score_correction_bias", latent=a.moe_latent_size,
                         hidden_size=a.hidden_size, bias=a.mlp_bias)

    def layer(self, index: int, kind: LayerKind) -> Block:
        return Block(self.mixer(index), self.norm(), kind)

    def weight_rules(self) -> list:
        n = self.args.n_routed_experts
        return super().weight_rules() + [
            Stack(f"{MIXER}.experts.{{e}}.up_proj.weight", f"{MIXER}.switch_mlp.fc1.weight", n),
            Stack(f"{MIXER}.experts.{{e}}.down_proj.weight", f"{MIXER}.switch_mlp.fc2.weight", n),
        ]

    def export_config(self, config: dict) -> dict:
        a = self.args
        return {**config, "layers_block_type": a.layers_block_type, "num_hidden_layers": a.num_hidden_layers,
                "time_step_limit": list(time_step_bounds(a.time_step_limit))}
