"""Mamba-2, mirroring transformers/models/mamba2/modeling_mamba2.py: Mamba's layout (`backbone.embeddings`,
`backbone.layers.{i}.norm` / `.mixer`, `backbone.norm_f`) around a Mamba-2 mixer (SSD scan over `num_heads` heads of
`head_dim`, B and C shared by `n_groups` groups of heads, dt clipped to `time_step_limit`, a grouped gated RMS norm
before `out_proj`; core/ssm.py). The prompt is scanned in chunks of `chunk_size` tokens.

mlx-lm's mamba2 normalises the gated output over all channels at once, which is transformers' computation only
with n_groups = 1 (transformers wins: ours normalises per group)."""

from dataclasses import dataclass
from typing import Optional, Union

from . import mamba
from .core.ssm import GatedRMSNorm, Mamba2Mixer, time_step_bounds


@dataclass
class ModelArgs(mamba.ModelArgs):
    model_type: str = "mamba2"
    num_heads: int = 128
    head_dim: int = 64
    vocab_size: int = 32768
    hidden_size: int = 4096
    state_size: int = 128
    num_hidden_layers: int = 64
    n_groups: int = 8
    time_step_limit: Optional[Union[list, tuple]] = (0.0, float("inf"))
    chunk_size: int = 256
    tie_word_embeddings: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.intermediate_size = self.num_heads * self.head_dim  # what the mixer builds, whatever `expand` says


class Model(mamba.Model):
    def export_config(self, config: dict) -> dict:
        # mlx-lm reads intermediate_size and takes time_step_limit as plain numbers (JSON Infinity, not
        # transformers' {"__float__": "Infinity"}).
        return {**super().export_config(config), "time_step_limit": list(time_step_bounds(self.args.time_step_limit))}

    def mixer(self) -> Mamba2Mixer:
        a = self.args
        norm = GatedRMSNorm(a.intermediate_size, a.n_groups, a.layer_norm_epsilon)
        return Mamba2Mixer(a.hidden_size, a.num_heads, a.head_dim, a.state_size, a.n_groups, a.conv_kernel,
                           a.chunk_size, a.time_step_limit, a.use_bias, a.use_conv_bias, a.hidden_act, norm)
