"""Zamba2, mirroring transformers/models/zamba2/modeling_zamba2.py: a stack of Mamba-2 layers (x + mamba(norm(x)),
`input_layernorm` / `mamba`) in which the "hybrid" layers of `layers_block_type` first run a shared transformer
block on [x | the token embeddings] and add its output, through the layer's own `linear`, to the input of their
Mamba-2 layer (`mamba_decoder`, whose residual is x alone).

The shared blocks: `num_mem_blocks` of them, the k-th hybrid layer using block k % num_mem_blocks. A block is
RMSNorm over 2 * hidden_size, attention from that width (head size 2 * hidden_size / heads, scores scaled by
(head_size / 2)^-0.5, RoPE only with `use_mem_rope`), RMSNorm, a fused gate/up MLP; no residual inside. Its
per-use adapters are LoRA pairs indexed by the hybrid layer's rank k: one on the MLP's `gate_up_proj` always, and on
q, k and v with `use_shared_attention_adapter`. The checkpoint stores each block once, under the first hybrid layer
that uses it (`model.layers.{i}.shared_transformer`, with the adapters of every use), as transformers ties them:
that layer owns the block here too, later uses only refer to it, so the weights are loaded, quantized and saved once.
transformers ties the later uses only when `tie_word_embeddings` is set: otherwise every hybrid layer has its own
copy of its block, stored under its own index, and so here.

Each hybrid layer's cache is a KVStateCache (core/ssm.py): the block's keys and values and the Mamba state. The
mixers' convolution always has a bias and SiLU, their norm eps is 1e-5 and dt is clipped below at `time_step_min`,
whatever the config says otherwise (as transformers); `use_long_context` only raises max_position_embeddings.
mlx-lm has no zamba2."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .core.conv import DepthwiseLayout
from .core.kinds import FULL, KindedLayer, LayerKind
from .core.layers import Attention, FusedGateUpMLP, NamedBackbone
from .core.cache import StateCache
from .core.ssm import RECURRENT, GatedRMSNorm, KVStateCache, Mamba2Mixer, SSMModel

LEGACY_TYPES = {"mamba": "linear_attention"}  # transformers' remap_legacy_layer_types
BLOCK_TYPES = ("linear_attention", "hybrid")


def default_block_types() -> list:
    """Zamba2Config's layers when the config lists none (Zamba2-2.7B's 54)."""
    mamba = "linear_attention"
    return [mamba] + ([mamba] * 5 + ["hybrid"]) * 7 + [mamba] * 4 + ["hybrid"] + [mamba] * 3 + ["hybrid"] + [mamba] * 2


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "zamba2"
    vocab_size: int = 32000
    max_position_embeddings: Optional[int] = 4096
    hidden_size: int = 2560
    intermediate_size: Optional[int] = None
    num_hidden_layers: int = 54
    layers_block_type: Optional[list] = None
    mamba_d_state: int = 64
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_ngroups: int = 1
    time_step_min: float = 0.001
    n_mamba_heads: int = 8
    chunk_size: int = 256
    add_bias_linear: bool = False
    hidden_act: str = "gelu"
    rms_norm_eps: float = 1e-5
    num_mem_blocks: int = 1
    use_shared_attention_adapter: bool = False
    adapter_rank: int = 128
    use_mem_rope: bool = False
    tie_word_embeddings: bool = True
    # Derived by Zamba2Config unless the config stores them (transformers then reads the stored values).
    attention_hidden_size: Optional[int] = None
    attention_head_dim: Optional[int] = None
    mamba_headdim: Optional[int] = None
    windowed = False

    @classmethod
    def from_dict(cls, config: dict):
        config = dict(config)
        types = config.get("layers_block_type") or config.get("layer_types")  # Zamba2Config's attribute_map
        config["layers_block_type"] = [LEGACY_TYPES.get(t, t) for t in types or default_block_types()]
        if config.get("attention_head_dim") is None and config.get("head_dim") is not None:
            config["attention_head_dim"] = config["head_dim"]  # Zamba2Config's attribute_map
        return super().from_dict(config)

    def __post_init__(self):
        self.intermediate_size = self.intermediate_size or 4 * self.hidden_size
        self.num_hidden_layers = len(self.layers_block_type)  # Zamba2Model builds one layer per entry
        super().__post_init__()
        self.attention_hidden_size = self.attention_hidden_size or 2 * self.hidden_size
        self.head_dim = self.attention_head_dim = self.attention_head_dim or 2 * self.hidden_size // self.num_attention_heads
        self.mamba_headdim = self.mamba_headdim or self.mamba_expand * self.hidden_size // self.n_mamba_heads
        if self.attention_hidden_size != 2 * self.hidden_size:
            raise ValueError(f"zamba2: attention_hidden_size ({self.attention_hidden_size}) must be twice hidden_size "
                             f"({self.hidden_size}): the shared blocks read [hidden state | embeddings]")
        unknown = sorted(set(self.layers_block_type) - set(BLOCK_TYPES))
        if unknown:
            raise ValueError(f"zamba2 layers_block_type has unknown entries {unknown}; known: {list(BLOCK_TYPES)}")
        if self.use_shared_attention_adapter and self.num_key_value_heads != self.num_attention_heads:
            raise ValueError("zamba2: the shared attention's adapters (use_shared_attention_adapter) add full-width "
                             "keys and values, which needs num_key_value_heads == num_attention_heads (transformers "
                             "fails on this config too)")
        inner = self.mamba_expand * self.hidden_size
        if self.mamba_headdim * self.n_mamba_heads != inner:
            raise ValueError(f"zamba2: n_mamba_heads ({self.n_mamba_heads}) x mamba_headdim ({self.mamba_headdim}) must "
                             f"equal mamba_expand * hidden_size ({inner})")

    @property
    def hybrid_layers(self) -> list:
        return [i for i, t in enumerate(self.layers_block_type) if t == "hybrid"]


def adapters(uses: list, dims: int, rank: int, out: int) -> list:
    """One LoRA pair per use of a shared block, indexed by the hybrid layer's rank k: [down, up] where this block
    serves use k, [] where another block does (the checkpoint's `{list}.{k}.0` / `{list}.{k}.1`)."""
    return [[nn.Linear(dims, rank, bias=False), nn.Linear(rank, out, bias=False)] if mine else [] for mine in uses]


def adapted(pairs: list, x, use: int):
    down, up = pairs[use]
    return up(down(x))


class SharedAttention(Attention):
    """Attention from [x | embeddings] (2 * hidden_size) back to hidden_size, plus the use's q/k/v adapters."""

    def __init__(self, a: ModelArgs, rope, uses: Optional[list]):
        width = 2 * a.hidden_size
        super().__init__(width, a.num_attention_heads, a.num_key_value_heads, a.head_dim, rope,
                         scale=(a.head_dim / 2) ** -0.5)
        self.o_proj = nn.Linear(a.num_attention_heads * a.head_dim, a.hidden_size, bias=False)
        self.adapted = uses is not None
        if self.adapted:
            for p in "qkv":  # each back to the full width, as transformers builds them
                self[f"linear_{p}_adapter_list"] = adapters(uses, width, a.adapter_rank, width)

    def __call__(self, x, mask=None, cache=None, use: int = 0):
        B, L, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.adapted:
            q = q + adapted(self.linear_q_adapter_list, x, use)
            k = k + adapted(self.linear_k_adapter_list, x, use)
            v = v + adapted(self.linear_v_adapter_list, x, use)
        heads = lambda t: t.reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3)  # noqa: E731
        return self.o_proj(self.attend(heads(q), heads(k), heads(v), mask, cache))


class SharedMLP(FusedGateUpMLP):
    """The fused gate/up MLP plus the use's adapter on gate_up_proj."""

    def __init__(self, a: ModelArgs, uses: list):
        super().__init__(a.hidden_size, a.intermediate_size, a.hidden_act, a.add_bias_linear)
        self.gate_up_proj_adapter_list = adapters(uses, a.hidden_size, a.adapter_rank, 2 * a.intermediate_size)

    def __call__(self, x, use: int = 0):
        gate, up = mx.split(self.gate_up_proj(x) + adapted(self.gate_up_proj_adapter_list, x, use), 2, axis=-1)
        return self.down_proj(self.act(gate) * up)


class SharedBlock(nn.Module):
    """transformers' Zamba2AttentionDecoderLayer: mlp(norm(attn(norm([x | embeddings])))), no residuals."""

    def __init__(self, a: ModelArgs, rope, uses: list):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(2 * a.hidden_size, eps=a.rms_norm_eps)
        self.self_attn = SharedAttention(a, rope, uses if a.use_shared_attention_adapter else None)
        self.pre_ff_layernorm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)
        self.feed_forward = SharedMLP(a, uses)

    def __call__(self, x, embeddings, mask, cache, use: int):
        h = self.input_layernorm(mx.concatenate([x, embeddings], axis=-1))
        return self.feed_forward(self.pre_ff_layernorm(self.self_attn(h, mask, cache, use)), use)


class MambaLayer(KindedLayer, nn.Module):
    """x + mamba(input_layernorm(x + extra)): a plain Mamba-2 layer, or a hybrid layer's with its block's output."""

    kind = RECURRENT

    def __init__(self, mixer: Mamba2Mixer, norm: nn.Module):
        super().__init__()
        self.mamba = mixer
        self.input_layernorm = norm

    def __call__(self, x, mask=None, cache=None, extra=None):
        return x + self.mamba(self.input_layernorm(x if extra is None else x + extra), None, cache)

    def make_cache(self) -> StateCache:
        return StateCache(self.mamba.cache_slots)


class HybridLayer(KindedLayer, nn.Module):
    """The shared block (owned here by its first use, referred to by the others), this layer's `linear`, and its
    Mamba-2 layer `mamba_decoder`."""

    kind = FULL

    def __init__(self, block: SharedBlock, owner: bool, use: int, linear: nn.Linear, mamba: MambaLayer):
        super().__init__()
        if owner:
            self.shared_transformer = block
        object.__setattr__(self, "block", block)  # not a child: its weights belong to the owner
        self.use = use
        self.linear = linear
        self.mamba_decoder = mamba

    def __call__(self, x, mask=None, cache=None, embeddings=None):
        t = self.linear(self.block(x, embeddings, mask, cache, self.use))
        return self.mamba_decoder(x, None, cache, extra=t)

    def make_cache(self) -> KVStateCache:
        return KVStateCache(self.mamba_decoder.mamba.cache_slots)


class Model(SSMModel, llama.Model):
    derived_config_keys = ("attention_hidden_size", "attention_head_dim", "mamba_headdim", "kv_channels",
                           "num_query_groups", "hybrid_layer_ids")  # dropped by the gate's shadow when it shrinks

    def __init__(self, args: ModelArgs):
        # Plain attributes, not children: a hybrid layer's rank among the hybrid layers, and the shared blocks
        # (made by their first use, as layer() is called in order; the owning layers hold them as children).
        object.__setattr__(self, "use_of", {layer: k for k, layer in enumerate(args.hybrid_layers)})
        object.__setattr__(self, "blocks", [])
        super().__init__(args)

    @property
    def rope(self):
        return super().rope if self.args.use_mem_rope else None

    def layer_kinds(self) -> list:
        return [FULL if t == "hybrid" else RECURRENT for t in self.args.layers_block_type]

    def mamba_layer(self) -> MambaLayer:
        a = self.args
        inner = a.mamba_expand * a.hidden_size
        mixer = Mamba2Mixer(a.hidden_size, a.n_mamba_heads, a.mamba_headdim, a.mamba_d_state,
                            a.mamba_ngroups, a.mamba_d_conv, a.chunk_size, (a.time_step_min, float("inf")),
                            a.add_bias_linear, True, "silu", GatedRMSNorm(inner, a.mamba_ngroups, 1e-5))
        return MambaLayer(mixer, self.norm())

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        if not kind.attends:
            return self.mamba_layer()
        a = self.args
        use = self.use_of[index]
        block_id = use % a.num_mem_blocks
        uses = [k % a.num_mem_blocks == block_id for k in range(len(self.use_of))]
        # transformers ties a block's later uses to its first only along with the embeddings: untied, every hybrid
        # layer has a block of its own (built the same way).
        shared = a.tie_word_embeddings and block_id < len(self.blocks)
        block = self.blocks[block_id] if shared else SharedBlock(a, self.rope, uses)
        if not shared:
            self.blocks.append(block)
        linear = nn.Linear(a.hidden_size, a.hidden_size, bias=False)
        return HybridLayer(block, not shared, use, linear, self.mamba_layer())

    def backbone(self, layers: list) -> nn.Module:
        return NamedBackbone(self.args.vocab_size, self.args.hidden_size, layers, self.norm(),
                             names=("embed_tokens", "layers", "final_layernorm"))

    def stream_context(self, inputs, h):
        return h  # the token embeddings, which every shared block reads

    def layer_args(self, context, index: int) -> tuple:
        return (context,) if index in self.use_of else ()

    def weight_rules(self) -> list:
        convs = ["model.layers.{i}.mamba.conv1d.weight", "model.layers.{i}.mamba_decoder.mamba.conv1d.weight"]
        return super().weight_rules() + [DepthwiseLayout(*convs)]
