"""FalconMamba, mirroring transformers/models/falcon_mamba/modeling_falcon_mamba.py: Mamba whose mixer normalises dt
(before `dt_proj`), B and C with weightless RMS norms (eps `mixer_rms_eps`). mlx-lm reads it with its mamba module
(which fixes that eps at 1e-6)."""

from dataclasses import dataclass

from . import mamba


@dataclass
class ModelArgs(mamba.ModelArgs):
    model_type: str = "falcon_mamba"
    mixer_rms_eps: float = 1e-6


class Model(mamba.Model):
    bcdt_norm = "weightless"
