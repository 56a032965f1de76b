"""EXAONE 3 / 3.5, which transformers runs as llama (transformers/models/exaone holds only ExaoneConfig;
AutoModelForCausalLM builds LlamaForCausalLM from it, renaming the checkpoint's keys on load): a llama model under
EXAONE's own names (`transformer.wte`, `h.{i}.ln_1`, `attn.attention.{q,k,v,out}_proj`, `mlp.c_fc_0` (gate) /
`c_fc_1` (up) / `c_proj`, `ln_f`), which mlx-lm's exaone also reads, and EXAONE's config keys (`num_layers`,
`layer_norm_epsilon`, `activation_function`)."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from . import llama
from .core.kinds import LayerKind
from .core.layers import MLP, NamedBackbone, ResidualBlock
from .gptj import OutProjAttention

# ExaoneConfig.attribute_map
RENAMED = {"num_layers": "num_hidden_layers", "layer_norm_epsilon": "rms_norm_eps", "activation_function": "hidden_act"}


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 102400
    intermediate_size: int = 14336
    num_key_value_heads: Optional[int] = 8
    max_position_embeddings: Optional[int] = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    windowed = False

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        return super().from_dict({**{RENAMED[k]: v for k, v in config.items() if k in RENAMED}, **config})


class AttentionWrapper(nn.Module):
    """`attn.attention.*`: EXAONE nests its attention one module deeper."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention

    def __call__(self, x, mask=None, cache=None):
        return self.attention(x, mask, cache)


class ExaoneMLP(MLP):
    """The gated MLP under EXAONE's names: c_proj(act(c_fc_0(x)) * c_fc_1(x))."""

    sensitive_children = ("c_proj",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.c_fc_0, self.c_fc_1, self.c_proj = self.pop("gate_proj"), self.pop("up_proj"), self.pop("down_proj")

    def __call__(self, x):
        return self.c_proj(self.act(self.c_fc_0(x)) * self.c_fc_1(x))


class Model(llama.Model):
    backbone_name = "transformer"

    def attention(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        return AttentionWrapper(OutProjAttention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads,
                                                 a.head_dim, self.rope, qkv_bias=a.attention_bias,
                                                 o_bias=a.attention_bias))

    def mlp(self, index: int) -> nn.Module:
        a = self.args
        return ExaoneMLP(a.hidden_size, a.intermediate_size, a.hidden_act, a.mlp_bias)

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        return ResidualBlock(self.attention(index, kind), self.mlp(index), self.norm, norms=("ln_1", "ln_2"),
                             names=("attn", "mlp"), kind=kind)

    def backbone(self, layers: list) -> nn.Module:
        a = self.args
        return NamedBackbone(a.vocab_size, a.hidden_size, layers, self.norm(), names=("wte", "h", "ln_f"))

    def export_config(self, config: dict) -> dict:
        # mlx-lm's exaone requires EXAONE's own key names and rope_theta
        a = self.args
        return {**config, "num_layers": a.num_hidden_layers, "layer_norm_epsilon": a.rms_norm_eps,
                "rope_theta": a.rope_theta, "rope_scaling": a.rope_scaling}
