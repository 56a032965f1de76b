"""GPT-2, mirroring transformers/models/gpt2/modeling_gpt2.py: learned positions (`wpe`), a fused `c_attn`,
LayerNorm, a non-gated GELU MLP and (by default) a head tied to `wte`.

Transformers stores the projections as Conv1D, (in, out); sanitize transposes them to Linear while moving them from
`transformer.` (or the bare names of the original checkpoints) to `model.`, where mlx-lm's gpt2 keeps them.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.kinds import LayerKind
from .core.layers import CausalLM, DenseMLP, FusedQKVAttention, NamedBackbone, ResidualBlock, add_positions
from .core.weights import Alias, Rename, Transpose


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.add_cross_attention:
            raise ValueError(f"{self.model_type} with add_cross_attention (encoder-decoder use) is not supported")
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd

    # The scaffold's names for GPT-2's fields.
    hidden_size = property(lambda self: self.n_embd)
    num_hidden_layers = property(lambda self: self.n_layer)


class Model(CausalLM):
    # Conv1D weights and the names of GPT-2 checkpoints -> mlx-lm's gpt2 layout (gpt_bigcode has none of it).
    checkpoint_layout = (
        Alias({p: "transformer." + p for p in ("h.", "wte.", "wpe.", "ln_f.")}),  # the original exports' bare names
        Transpose("transformer.h.{i}.attn.c_attn.weight", "transformer.h.{i}.attn.c_proj.weight",  # Conv1D: (in, out)
                  "transformer.h.{i}.mlp.c_fc.weight", "transformer.h.{i}.mlp.c_proj.weight"),
        Rename({"transformer.": "model."}),
    )

    def norm(self) -> nn.Module:
        return nn.LayerNorm(self.args.n_embd, eps=self.args.layer_norm_epsilon)

    def attention(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        head_dim = a.n_embd // a.n_head
        scale = head_dim**-0.5 if a.scale_attn_weights else 1.0
        if a.scale_attn_by_inverse_layer_idx:
            scale /= index + 1
        return FusedQKVAttention(a.n_embd, a.n_head, a.n_head, head_dim, None, layout="blocks",
                                 names=("c_attn", "c_proj"), scale=scale)

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        mlp = DenseMLP(self.args.n_embd, self.args.n_inner, self.args.activation_function, names=("c_fc", "c_proj"))
        return ResidualBlock(self.attention(index, kind), mlp, self.norm, norms=("ln_1", "ln_2"),
                             names=("attn", "mlp"), kind=kind)

    def backbone(self, layers: list) -> nn.Module:
        a = self.args
        return NamedBackbone(a.vocab_size, a.n_embd, layers, self.norm(), names=("wte", "h", "ln_f"),
                             extra={"wpe": nn.Embedding(a.n_positions, a.n_embd)})

    def embed(self, inputs, offset: int = 0):
        return add_positions(super().embed(inputs, offset), self.model.wpe, offset)

    def export_config(self, config: dict) -> dict:
        # mlx-lm requires `n_ctx` (transformers 5 dropped it) and an explicit `n_inner`.
        return {**config, "n_ctx": config.get("n_ctx") or self.args.n_positions, "n_inner": self.args.n_inner}

    def weight_rules(self):
        return super().weight_rules() + list(self.checkpoint_layout)
