"""GPT-2, mirroring transformers/models/gpt2/modeling_gpt2.py: learned positions (`wpe`), a fused `c_attn`,
LayerNorm, a non-gated GELU MLP and (by default) a head tied to `wte`.

Transformers stores the projections as Conv1D, (in, out); sanitize transposes them to Linear while moving them from
`transformer.` (or the bare names of the original checkpoints) to `model.`, where mlx-lm's gpt2 keeps them.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.layers import CausalLM, DenseMLP, FusedQKVAttention, NamedBackbone, ResidualBlock, add_positions, layer_norm
from .core.weights import rename, rename_with


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


class Model(CausalLM):
    backbone = "model"  # where the backbone's weights live (mlx-lm's name)

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        norm = layer_norm(args.n_embd, args.layer_norm_epsilon)
        layers = [
            ResidualBlock(self.attention(args, i),
                          DenseMLP(args.n_embd, args.n_inner, args.activation_function, names=("c_fc", "c_proj")),
                          norm, norms=("ln_1", "ln_2"), names=("attn", "mlp"))
            for i in range(args.n_layer)
        ]
        wpe = nn.Embedding(args.n_positions, args.n_embd)
        self[self.backbone] = NamedBackbone(args.vocab_size, args.n_embd, layers, norm(), names=("wte", "h", "ln_f"),
                                            extra={"wpe": wpe})
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.n_embd, args.vocab_size, bias=False)

    def export_config(self, config: dict) -> dict:
        # mlx-lm requires `n_ctx` (transformers 5 dropped it) and an explicit `n_inner`.
        return {**config, "n_ctx": config.get("n_ctx") or self.args.n_positions, "n_inner": self.args.n_inner}

    def attention(self, args: ModelArgs, index: int) -> FusedQKVAttention:
        head_dim = args.n_embd // args.n_head
        scale = head_dim**-0.5 if args.scale_attn_weights else 1.0
        if args.scale_attn_by_inverse_layer_idx:
            scale /= index + 1
        return FusedQKVAttention(args.n_embd, args.n_head, args.n_head, head_dim, None, layout="blocks",
                                 names=("c_attn", "c_proj"), scale=scale)

    def embed(self, inputs, cache=None):
        return add_positions(super().embed(inputs, cache), self.model.wpe, cache)

    def weight_rules(self):
        conv1d = r"^(?:transformer\.)?(h\.\d+\.(?:attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight)$"
        return super().weight_rules() + [
            rename_with(conv1d, r"model.\1", lambda w: w.T),
            rename(r"^(?:transformer\.)?(?=(?:wte|wpe|h|ln_f)\.)", "model."),
        ]
