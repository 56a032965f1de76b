"""RecurrentGemma (Griffin), mirroring transformers/models/recurrent_gemma/modeling_recurrent_gemma.py: residual blocks
whose temporal block is, by the repeated `block_types` pattern (recurrent, recurrent, attention by default), either
local attention (a sliding window of `attention_window_size`; RoPE on `partial_rotary_factor` of each head, 0.5 by
default; an output bias always) or Griffin's recurrent block; then a gated MLP of intermediate_size // 2 with biases.
Norms are Gemma's (1 + w) RMS norms, the embeddings are scaled by sqrt(hidden_size) rounded to bfloat16 (the
buffer transformers keeps), the logits soft-capped by `logits_soft_cap`.

Recurrent block: linear_out(RG-LRU(conv_1d(linear_x(x))) * act(linear_y(x))). The RG-LRU gates its input and its
decay per head with block-diagonal weights: i = sigmoid(x W_i + b_i), r = sigmoid(x W_r + b_r),
log a = -8 r softplus(recurrent_param), h_t = a_t h_{t-1} + sqrt(1 - a_t^2) i_t x_t; the first token of a sequence
(position 0, i.e. no state yet) resets: it enters unscaled and nothing decays into it. Prompts run the recurrence as
a chunked associative scan, decoding as a one-token step (core/linear.py); its weights are plain arrays, which MLX
never quantizes.

transformers reads neither `embeddings_scale_by_sqrt_dim` nor the 9B's `_block_types` (nor `layer_types`, an alias
of its derived layer kinds): neither does this module. `sliding_window` is an alias of `attention_window_size`.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .core.conv import DepthwiseLayout, causal_conv, depthwise_conv
from .core.kinds import LayerKind
from .core.layers import MLP, Attention, NamedBackbone, OffsetRMSNorm, activation
from .core.linear import RecurrentBlock, diagonal_recurrence


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "recurrent_gemma"
    vocab_size: int = 256000
    hidden_size: int = 2560
    intermediate_size: int = 3 * 2560
    num_hidden_layers: int = 26
    num_attention_heads: int = 10
    lru_width: Optional[int] = None
    attention_window_size: int = 2048
    conv1d_width: int = 4
    logits_soft_cap: float = 30.0
    hidden_activation: str = "gelu_pytorch_tanh"
    block_types: tuple = ("recurrent", "recurrent", "attention")
    partial_rotary_factor: float = 0.5
    tie_word_embeddings: bool = True
    windowed = False

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        if "attention_window_size" not in config and "sliding_window" in config:
            config = {**config, "attention_window_size": config["sliding_window"]}
        return super().from_dict({k: v for k, v in config.items() if k not in ("layer_types", "head_dim")})

    def __post_init__(self):
        super().__post_init__()
        self.lru_width = self.lru_width or self.hidden_size
        self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_scaling:
            raise ValueError(f"recurrent_gemma supports only default RoPE (as transformers), got {self.rope_scaling}")


class RGLRU(nn.Module):
    """The real-gated linear recurrent unit (see the module docstring); its state is `cache[slot]`."""

    chunk = 64  # tokens per associative scan of a prompt

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, block = heads, width // heads
        self.recurrent_param = mx.zeros((width,))
        self.input_gate_weight = mx.zeros((heads, block, block))
        self.input_gate_bias = mx.zeros((heads, block))
        self.recurrent_gate_weight = mx.zeros((heads, block, block))
        self.recurrent_gate_bias = mx.zeros((heads, block))

    def _gate(self, x, weight, bias):
        B, L, _ = x.shape
        blocks = x.reshape(B, L, self.heads, 1, -1)
        return mx.sigmoid((blocks @ weight.astype(x.dtype)).squeeze(-2) + bias.astype(x.dtype)).reshape(B, L, -1)

    def __call__(self, x, cache=None, slot: int = 1):
        h = x.astype(mx.float32)  # gates in float32: sqrt(1 - a^2) loses every digit in bfloat16 as a nears 1
        log_a = -8.0 * self._gate(h, self.recurrent_gate_weight, self.recurrent_gate_bias) \
            * nn.softplus(self.recurrent_param.astype(mx.float32))
        a, scale = mx.exp(log_a), mx.sqrt(1 - mx.exp(2 * log_a))
        if cache is None or cache[slot] is None:  # position 0: reset
            a = mx.concatenate([mx.zeros_like(a[:, :1]), a[:, 1:]], axis=1)
            scale = mx.concatenate([mx.ones_like(scale[:, :1]), scale[:, 1:]], axis=1)
        u = h * self._gate(h, self.input_gate_weight, self.input_gate_bias) * scale
        return diagonal_recurrence(a, u, cache, slot, self.chunk).astype(x.dtype)


class RecurrentTemporalBlock(nn.Module):
    """Griffin's recurrent block."""

    cache_slots = 2  # the convolution's last inputs, the RG-LRU's state
    sensitive_children = ("linear_out",)

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.linear_y = nn.Linear(a.hidden_size, a.lru_width)
        self.linear_x = nn.Linear(a.hidden_size, a.lru_width)
        self.linear_out = nn.Linear(a.lru_width, a.hidden_size)
        self.conv_1d = depthwise_conv(a.lru_width, a.conv1d_width)
        self.rg_lru = RGLRU(a.lru_width, a.num_attention_heads)
        self.act = activation(a.hidden_activation)

    def __call__(self, x, mask=None, cache=None):
        y = self.act(self.linear_y(x))
        h = causal_conv(self.conv_1d, self.linear_x(x), cache, slot=0)
        return self.linear_out(self.rg_lru(h, cache, slot=1) * y)


class Model(llama.Model):
    reference_reads_children = True  # transformers' recurrent block reads its conv's weight without calling it

    @property
    def embed_scale(self) -> float:
        return mx.array(self.args.hidden_size**0.5, dtype=mx.bfloat16).item()

    @property
    def final_softcap(self) -> Optional[float]:
        return self.args.logits_soft_cap

    def norm(self) -> nn.Module:
        return OffsetRMSNorm(self.args.hidden_size, eps=self.args.rms_norm_eps)

    def layer_kinds(self) -> list:
        a = self.args
        types = (list(a.block_types) * a.num_hidden_layers)[: a.num_hidden_layers]
        return [LayerKind("recurrent") if t == "recurrent" else LayerKind("sliding", a.attention_window_size)
                for t in types]

    def backbone(self, layers: list) -> nn.Module:
        a = self.args
        return NamedBackbone(a.vocab_size, a.hidden_size, layers, self.norm(),
                             names=("embed_tokens", "layers", "final_norm"))

    def attention(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                         qkv_bias=a.attention_bias, o_bias=True)

    def mlp(self, index: int) -> nn.Module:
        a = self.args
        return MLP(a.hidden_size, a.intermediate_size // 2, a.hidden_activation, bias=True)

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        mixer = self.attention(index, kind) if kind.attends else RecurrentTemporalBlock(self.args)
        return RecurrentBlock(mixer, self.mlp(index), self.norm, norms=("temporal_pre_norm", "channel_pre_norm"),
                              names=("temporal_block", "mlp_block"), kind=kind)

    def weight_rules(self) -> list:
        return super().weight_rules() + [DepthwiseLayout("model.layers.{i}.temporal_block.conv_1d.weight")]

    def export_config(self, config: dict) -> dict:
        """mlx-lm requires `rope_theta` at the top level (it rotates half of each head with base 10000 whatever the
        config says)."""
        return {**config, "rope_theta": self.args.rope_theta, "block_types": list(self.args.block_types)}
