"""VaultGemma, mirroring transformers/models/vaultgemma/modeling_vaultgemma.py: Gemma 2 (soft-capped scores and
logits, sliding layers from `layer_types`, query_pre_attn_scalar) with plain pre-norm blocks: the norms after each
sublayer are gone, leaving `input_layernorm` before attention and `pre_feedforward_layernorm` before the MLP."""

from dataclasses import dataclass

from . import gemma2
from .core.kinds import LayerKind
from .core.layers import ResidualBlock


@dataclass
class ModelArgs(gemma2.ModelArgs):
    pass


class Model(gemma2.Model):
    def layer(self, index: int, kind: LayerKind) -> ResidualBlock:
        return ResidualBlock(self.attention(index, kind), self.mlp(index), self.norm,
                             norms=("input_layernorm", "pre_feedforward_layernorm"), kind=kind)
