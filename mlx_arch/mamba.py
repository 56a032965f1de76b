"""Mamba, mirroring transformers/models/mamba/modeling_mamba.py: an embedding, a stack of pre-norm residual blocks
around a Mamba-1 mixer (selective scan, core/ssm.py), a final RMS norm and a head tied to the embedding by default.

Weights keep the checkpoint's names (`backbone.embeddings`, `backbone.layers.{i}.mixer`, `backbone.norm_f`), which
mlx-lm's mamba reads too. `residual_in_fp32` only sets the residual stream's dtype in transformers; the residual
add here happens in the activations' dtype."""

import math
from dataclasses import dataclass
from typing import Optional, Union

import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.conv import DepthwiseLayout
from .core.weights import Alias
from .core.layers import CausalLM, NamedBackbone
from .core.ssm import RECURRENT, MambaMixer, MixerBlock, SSMModel


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "mamba"
    vocab_size: int = 50280
    hidden_size: int = 768
    state_size: int = 16
    num_hidden_layers: int = 32
    layer_norm_epsilon: float = 1e-5
    expand: int = 2
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    time_step_rank: Union[int, str] = "auto"
    tie_word_embeddings: bool = True
    intermediate_size: Optional[int] = None

    def __post_init__(self):
        # As MambaConfig: `expand` gives the intermediate size unless the config states one (transformers saves it).
        self.intermediate_size = self.intermediate_size or int(self.expand * self.hidden_size)
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)


class Model(SSMModel, CausalLM):
    backbone_name = "backbone"
    bcdt_norm = None  # FalconMamba normalises dt, B and C

    def layer_kinds(self) -> list:
        return [RECURRENT] * self.args.num_hidden_layers

    def norm(self) -> nn.Module:
        return nn.RMSNorm(self.args.hidden_size, eps=self.args.layer_norm_epsilon)

    def mixer(self) -> MambaMixer:
        a = self.args
        return MambaMixer(a.hidden_size, a.intermediate_size, a.state_size, a.conv_kernel, int(a.time_step_rank),
                          a.use_bias, a.use_conv_bias, a.hidden_act, self.bcdt_norm,
                          getattr(a, "mixer_rms_eps", 1e-6))

    def layer(self, index, kind) -> MixerBlock:
        return MixerBlock(self.mixer(), self.norm())

    def backbone(self, layers: list) -> nn.Module:
        a = self.args
        return NamedBackbone(a.vocab_size, a.hidden_size, layers, self.norm(),
                             names=("embeddings", "layers", "norm_f"))

    def weight_rules(self) -> list:
        return super().weight_rules() + self.layout_rules()

    def layout_rules(self) -> list:
        # Older exports name the embedding `embedding` (transformers renames it on load).
        return [Alias({"backbone.embedding.": "backbone.embeddings."}),
                DepthwiseLayout("backbone.layers.{i}.mixer.conv1d.weight")]

    def export_config(self, config: dict) -> dict:
        # mlx-lm reads these as given; transformers derives them.
        a = self.args
        return {**config, "intermediate_size": a.intermediate_size, "time_step_rank": a.time_step_rank}
