"""GPT-J, mirroring transformers/models/gptj/modeling_gptj.py: one LayerNorm (`ln_1`) feeding attention and a
non-gated `fc_in` -> GELU -> `fc_out` MLP in parallel, bias-free q/k/v/out projections, interleaved
("rotate every two") RoPE of base 10000 on the first `rotary_dim` features of each head, and a head with a bias.

Weights move from `transformer.` to `model.`, where mlx-lm's gptj keeps them."""

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import mlx.nn as nn

from . import phi
from .core.base import BaseModelArgs
from .core.kinds import LayerKind
from .core.layers import Attention, DenseMLP, NamedBackbone, ResidualBlock, make_rope
from .core.weights import Rename


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 50400
    n_positions: int = 2048
    n_embd: int = 4096
    n_layer: int = 28
    n_head: int = 16
    rotary_dim: Optional[int] = 64
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        if self.rotary_dim is None and self.n_head > 1:
            # GPTJRotaryEmbedding then spans n_embd features, which transformers cannot apply to one head
            raise ValueError("gptj config without rotary_dim (and more than one head) cannot run in transformers")
        self.rotary_dim = self.rotary_dim or self.n_embd

    # The scaffold's names for GPT-J's fields.
    hidden_size = property(lambda self: self.n_embd)
    num_hidden_layers = property(lambda self: self.n_layer)
    num_attention_heads = property(lambda self: self.n_head)


class OutProjAttention(Attention):
    """The shared attention with its output projection named `out_proj` (GPT-J, EXAONE 3)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.out_proj = self.pop("o_proj")

    def __call__(self, x, mask=None, cache=None):
        return self.out_proj(self.attend(*self.project(x), mask, cache))


class Model(phi.Model):
    """Phi's head (with a bias, which stays when the weight is tied); GPT-J's own blocks and names."""

    @cached_property
    def rope(self):
        return make_rope(self.args.rotary_dim, 10000.0, None, traditional=True)

    def norm(self) -> nn.Module:
        return nn.LayerNorm(self.args.n_embd, eps=self.args.layer_norm_epsilon)

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        attn = OutProjAttention(a.n_embd, a.n_head, a.n_head, a.n_embd // a.n_head, self.rope)
        mlp = DenseMLP(a.n_embd, a.n_inner, a.activation_function, names=("fc_in", "fc_out"))
        return ResidualBlock(attn, mlp, self.norm, norms=("ln_1",), parallel=True, names=("attn", "mlp"), kind=kind)

    def backbone(self, layers: list) -> nn.Module:
        a = self.args
        return NamedBackbone(a.vocab_size, a.n_embd, layers, self.norm(), names=("wte", "h", "ln_f"))

    def weight_rules(self):
        return super().weight_rules() + [Rename({"transformer.": "model."})]
