"""Shared decoder blocks: attention, MLPs, norms and a causal-LM shell that architectures configure.

Module names follow the Hugging Face modules (`self_attn.q_proj`, `mlp.down_proj`, `input_layernorm`, ...) so that
checkpoint keys map one to one and `sanitize` only handles real layout differences.
"""

from functools import cached_property
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .base import scaled_dot_product_attention
from .kinds import FULL, KindedLayer, LayerKind, cache_offset, layer_kinds
from .rope import initialize_rope

ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": nn.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_fast": nn.gelu_fast_approx,
    "gelu_approx": nn.gelu_approx,
    "relu": nn.relu,
    "relu2": lambda x: mx.square(nn.relu(x)),
}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def make_rope(head_dim: int, rope_theta: float, rope_scaling, partial_rotary_factor=1.0,
              max_position_embeddings=None, traditional=False):
    dims = int(head_dim * (partial_rotary_factor or 1.0))
    return initialize_rope(dims, rope_theta, traditional, rope_scaling, max_position_embeddings)


class OffsetRMSNorm(nn.Module):
    """RMSNorm whose stored weight is an offset from one: y = x / rms(x) * (1 + w) (gemma family)."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class WeightlessRMSNorm(nn.Module):
    """RMSNorm without a learned scale: y = x / rms(x) (Llama 4's q/k norm)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, None, self.eps)


class Attention(nn.Module):
    """Multi-head attention with GQA, optional biases, q/k norms, sliding window and logit soft-capping."""

    sensitive_children = ("v_proj",)  # its error goes straight into the residual stream through o_proj

    def __init__(
        self,
        hidden_size: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        rope: Optional[nn.Module],
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: Optional[Callable[[int], nn.Module]] = None,
        scale: Optional[float] = None,
        softcap: Optional[float] = None,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        self.softcap = softcap
        self.q_proj = nn.Linear(hidden_size, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden_size, bias=o_bias)
        if qk_norm is not None:
            self.q_norm = qk_norm(head_dim)
            self.k_norm = qk_norm(head_dim)
        self.rope = rope

    def project(self, x):
        """Queries, keys and values as (B, heads, L, head_dim), q/k-normed but not yet rotated."""
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def attend(self, q, k, v, mask, cache):
        """Rotate, update the cache, attend; returns (B, L, heads * head_dim)."""
        offset = cache.offset if cache is not None else 0
        if self.rope is not None:
            q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache, self.scale, mask, softcap=self.softcap)
        B, _, L, _ = out.shape
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)

    def __call__(self, x, mask=None, cache=None):
        return self.o_proj(self.attend(*self.project(x), mask, cache))


class ClipQKV:
    """Mixin for an attention class whose q/k/v projections are clamped elementwise before RoPE (OLMo's and DBRX's
    `clip_qkv`; None switches it off)."""

    def __init__(self, *args, clip: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip = clip

    def project(self, x):
        q, k, v = super().project(x)
        if self.clip is None:
            return q, k, v
        return tuple(mx.clip(t, -self.clip, self.clip) for t in (q, k, v))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    sensitive_children = ("down_proj",)

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation(act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class FusedGateUpMLP(nn.Module):
    """Gated MLP whose gate and up projections stay one fused `gate_up_proj` with output [gate | up], as the
    checkpoint and mlx-lm store it (phi3, glm4): down(act(gate) * up)."""

    sensitive_children = ("down_proj",)

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation(act)

    def __call__(self, x):
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(KindedLayer, nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, norm: Callable[[], nn.Module], kind: LayerKind = FULL):
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.kind = kind

    def __call__(self, x, mask=None, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class PostNormDecoderLayer(KindedLayer, nn.Module):
    """Block that norms each sublayer's output before the residual add (gemma2/3 "sandwich", olmo2, exaone4):
    h = x + post_attention_layernorm(attn(a)); out = h + post_feedforward_layernorm(mlp(m)).

    With `pre_norms`, a = input_layernorm(x) and m = pre_feedforward_layernorm(h) (gemma2/3); without, the
    sublayers read the residual stream itself (olmo2, exaone4).
    """

    def __init__(self, attn: nn.Module, mlp: nn.Module, norm: Callable[[], nn.Module], pre_norms: bool = True,
                 kind: LayerKind = FULL):
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp
        if pre_norms:
            self.input_layernorm = norm()
            self.pre_feedforward_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.post_feedforward_layernorm = norm()
        self.pre_norms, self.kind = pre_norms, kind

    def __call__(self, x, mask=None, cache=None):
        a = self.input_layernorm(x) if self.pre_norms else x
        h = x + self.post_attention_layernorm(self.self_attn(a, mask, cache))
        m = self.pre_feedforward_layernorm(h) if self.pre_norms else h
        return h + self.post_feedforward_layernorm(self.mlp(m))


class Backbone(nn.Module):
    """`model.` in the checkpoint: token embeddings, decoder layers and the final norm."""

    def __init__(self, vocab_size: int, hidden_size: int, layers: list, norm: nn.Module):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = layers
        self.norm = norm


class CausalLM(nn.Module):
    """A decoder-only language model: the one scaffold every family builds on.

    The scaffold asks the family for its layer kinds (`layer_kinds()`) and one decoder layer per index
    (`layer(i, kind)`), wraps them in `backbone(layers)` (token embeddings, layers, final norm) and adds an untied
    `lm_head`. Families override only the hooks where they differ.

    The forward pass is split into `embed`, per-layer calls and `head` so that validation can run the model one
    layer at a time and compare hidden states with the reference. Positions are an explicit `offset` (the number
    of tokens already in the cache), never read from a particular layer's cache.
    """

    embed_scale: float = 1.0
    logit_scale: float = 1.0
    final_softcap: Optional[float] = None
    backbone_name = "model"  # where the backbone's weights live (`transformer` in gpt_bigcode and falcon)

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        kinds = self.layer_kinds()
        self[self.backbone_name] = self.backbone([self.layer(i, kind) for i, kind in enumerate(kinds)])
        self.place_head(self.output_head())

    @property
    def model(self) -> nn.Module:
        return self[self.backbone_name]

    # --- construction hooks ------------------------------------------------------------------------------------
    def layer_kinds(self) -> list:
        """One LayerKind per decoder layer (from `layer_types` and `sliding_window` by default)."""
        args = self.args
        return layer_kinds(getattr(args, "layer_types", None), args.num_hidden_layers,
                           getattr(args, "sliding_window", None))

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must define layer(index, kind)")

    def norm(self) -> nn.Module:
        """A new instance of the family's normalisation layer."""
        raise NotImplementedError(f"{type(self).__name__} must define norm()")

    rope_traditional = False  # rotate interleaved pairs (GLM, Cohere, ERNIE) instead of halves

    @cached_property
    def rope(self):
        """One RoPE module shared by every layer, from the config's RoPE fields."""
        a = self.args
        return make_rope(default_head_dim(a), a.rope_theta, a.rope_scaling, getattr(a, "partial_rotary_factor", 1.0),
                         getattr(a, "max_position_embeddings", None), traditional=self.rope_traditional)

    def backbone(self, layers: list) -> nn.Module:
        return Backbone(self.args.vocab_size, self.args.hidden_size, layers, self.norm())

    def output_head(self) -> Optional[nn.Module]:
        """The head's own module: a Linear, or None when tied to the embeddings."""
        if self.args.tie_word_embeddings:
            return None
        return nn.Linear(self.args.hidden_size, self.args.vocab_size, bias=False)

    def place_head(self, head: Optional[nn.Module]):
        """Where the head's weights live (`lm_head`; gpt_neox keeps it in the backbone)."""
        if head is not None:
            self.lm_head = head

    # --- forward -----------------------------------------------------------------------------------------------
    @property
    def layers(self):
        return self.model.layers

    def embed(self, inputs, offset: int = 0):
        h = self.model.embed_tokens(inputs)
        return h * mx.array(self.embed_scale, dtype=h.dtype) if self.embed_scale != 1.0 else h

    def masks(self, h, cache=None, offset: int = 0, kinds=None):
        """One mask per layer, built per (kind, cache): layers of one kind without caches share one mask."""
        kinds = kinds if kinds is not None else [layer.kind for layer in self.layers]
        cache = cache or [None] * len(kinds)
        built = {}
        out = []
        for kind, c in zip(kinds, cache):
            key = (kind, id(c) if c is not None and kind.window else None)
            if key not in built:
                built[key] = kind.mask(h, c)
            out.append(built[key])
        return out

    def head(self, h):
        h = self.model.norm(h)
        if getattr(self.args, "tie_word_embeddings", False):
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.final_softcap is not None:
            logits = mx.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def stream_context(self, inputs, h):
        """What the layers of one forward pass read besides the hidden states (e.g. per-layer inputs computed from
        the token ids and their embeddings h, keys and values one layer shares with later ones); None for most."""
        return None

    def layer_args(self, context, index: int) -> tuple:
        """Layer `index`'s extra arguments from the pass's `stream_context`."""
        return ()

    def __call__(self, inputs, cache=None):
        offset = cache_offset(cache)
        h = self.embed(inputs, offset)
        context = self.stream_context(inputs, h)
        cache = cache if cache is not None else [None] * len(self.layers)
        for i, (layer, mask, c) in enumerate(zip(self.layers, self.masks(h, cache, offset), cache)):
            h = layer(h, mask, c, *self.layer_args(context, i))
        return self.head(h)

    def make_cache(self):
        return [layer.make_cache() for layer in self.layers]

    # --- conversion hooks --------------------------------------------------------------------------------------
    def export_config(self, config: dict) -> dict:
        """The config.json to publish; families add the keys mlx-lm reads but transformers 5 no longer writes."""
        return config

    def weight_rules(self) -> list:
        """The weight-layout operations (mlx_arch.core.weights) from checkpoint names to this module tree, in order;
        families extend the list. `sanitize` applies them; `inverse(rules)` maps our weights back."""
        from .weights import Drop

        rules = [Drop("{*}rotary_emb.inv_freq", "{*}attn.masked_bias", "{*}attn.bias", why="buffers")]
        if getattr(self.args, "tie_word_embeddings", False):
            rules.append(Drop("lm_head.weight", why="tied to the embeddings"))
        return rules

    container = None  # the multimodal container the checkpoint is, set by mlx_arch.build_model (core/containers.py)

    def checkpoint_rules(self) -> list:
        """`weight_rules()` after a container's own (selecting and renaming its language model's weights)."""
        return (self.container.rules() if self.container else []) + self.weight_rules()

    def sanitize(self, weights: dict) -> dict:
        from .weights import apply_rules

        return apply_rules(weights, self.checkpoint_rules())

    # --- quantization hooks: the pipeline asks the model, never matches names -----------------------------------
    def _roles(self) -> dict:
        """Paths of the vocabulary-sized modules, of the sensitive projections (each block lists its own in
        `sensitive_children`), and the prefix of the decoder layers; computed once (quantizing keeps paths)."""
        if "_role_paths" not in self.__dict__:
            modules = dict(self.named_modules())
            by_id = {id(m): p for p, m in modules.items()}
            head = self.lm_head if "lm_head" in self or hasattr(type(self), "lm_head") else None
            vocab = {by_id[id(m)] for m in (self.model.embed_tokens, head) if m is not None and id(m) in by_id}
            sensitive = {f"{p}.{name}" for p, m in modules.items() for name in getattr(m, "sensitive_children", ())}
            first = by_id[id(self.layers[0])] if len(self.layers) else ""
            self.__dict__["_role_paths"] = dict(vocab=vocab, sensitive=sensitive, layers=first.rsplit(".", 1)[0])
        return self.__dict__["_role_paths"]

    def is_vocab(self, path: str) -> bool:
        """Whether `path` is the token embedding or the output head."""
        return path in self._roles()["vocab"]

    def sensitive(self, path: str) -> bool:
        """Whether the module at `path` carries the most quantization error per bit (value and output-to-residual
        projections): mixed recipes give it more bits in some layers."""
        return path in self._roles()["sensitive"]

    def layer_index(self, path: str):
        """The index of the decoder layer that holds `path`, or None."""
        prefix = self._roles()["layers"] + "."
        if not path.startswith(prefix):
            return None
        return int(path[len(prefix) :].split(".", 1)[0])


def sliding_period(layer_types: list) -> Optional[int]:
    """The n for which `layer_types` is "every n-th layer global, the rest sliding" (the integer
    `sliding_window_pattern` of older configs and of mlx-lm), or None when the layers follow no such period."""
    for n in range(1, len(layer_types) + 2):  # len + 1: every layer slides
        if all((t == "full_attention") == ((i + 1) % n == 0) for i, t in enumerate(layer_types)):
            return n
    return None


def default_head_dim(args) -> int:
    return getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads


def rms_norm(dims: int, eps: float):
    return lambda: nn.RMSNorm(dims, eps=eps)


# --- Blocks of the GPT-2 lineage (gpt2, gpt_bigcode, gpt_neox, phi, falcon, starcoder2, ...): modules under the
# checkpoint's own names, fused q/k/v kept fused, non-gated MLPs, parallel attention + MLP, learned positions.


def layer_norm(dims: int, eps: float, bias: bool = True):
    return lambda: nn.LayerNorm(dims, eps=eps, bias=bias)


def add_positions(h, table: nn.Embedding, offset: int = 0):
    """h plus learned absolute position embeddings (GPT-2's `wpe`) for positions offset .. offset + L - 1."""
    return h + table(mx.arange(offset, offset + h.shape[1]))


class DenseMLP(nn.Module):
    """Non-gated MLP: out(act(in(x))), under the checkpoint's names (`c_fc`/`c_proj`, `fc1`/`fc2`, ...)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "gelu", bias: bool = True,
                 names=("c_fc", "c_proj")):
        super().__init__()
        self.in_name, self.out_name = names
        self.sensitive_children = frozenset({self.out_name})
        self[self.in_name] = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self[self.out_name] = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation(act)

    def __call__(self, x):
        return self[self.out_name](self.act(self[self.in_name](x)))


class FusedQKVAttention(nn.Module):
    """Attention whose q/k/v projection stays one fused linear, as the checkpoint (and mlx-lm) store it.

    `layout` is the order of the fused output features:
      "blocks": [all q | all k | all v]            (GPT-2, multi-query GPT-BigCode and Falcon)
      "heads":  per head [q | k | v]               (GPT-NeoX, GPT-BigCode and Falcon without multi-query)
      "groups": per KV head [q_1 .. q_g | k | v]   (Falcon's new decoder architecture)
    """

    attend = Attention.attend

    def __init__(self, hidden_size: int, n_heads: int, n_kv_heads: int, head_dim: int, rope: Optional[nn.Module],
                 layout: str = "blocks", bias: bool = True, names=("c_attn", "c_proj"), scale: Optional[float] = None):
        super().__init__()
        if layout not in ("blocks", "heads", "groups") or (layout == "heads" and n_kv_heads != n_heads):
            raise ValueError(f"unsupported fused qkv layout {layout!r} with {n_heads} heads, {n_kv_heads} kv heads")
        self.n_heads, self.n_kv_heads, self.head_dim, self.layout = n_heads, n_kv_heads, head_dim, layout
        self.scale = scale if scale is not None else head_dim**-0.5
        self.softcap = None
        self.qkv_name, self.out_name = names
        self.sensitive_children = frozenset({self.qkv_name})  # holds the values
        self[self.qkv_name] = nn.Linear(hidden_size, (n_heads + 2 * n_kv_heads) * head_dim, bias=bias)
        self[self.out_name] = nn.Linear(n_heads * head_dim, hidden_size, bias=bias)
        self.rope = rope

    def project(self, x):
        """Queries, keys and values as (B, heads, L, head_dim)."""
        B, L, _ = x.shape
        qkv = self[self.qkv_name](x)
        nq, nkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        if self.layout == "blocks":
            q, k, v = mx.split(qkv, [nq * d, (nq + nkv) * d], axis=-1)
        elif self.layout == "heads":
            q, k, v = mx.split(qkv.reshape(B, L, nq, 3 * d), 3, axis=-1)
        else:
            qkv = qkv.reshape(B, L, nkv, nq // nkv + 2, d)
            q, k, v = qkv[..., :-2, :], qkv[..., -2, :], qkv[..., -1, :]
        q, k, v = q.reshape(B, L, nq, d), k.reshape(B, L, nkv, d), v.reshape(B, L, nkv, d)
        return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def __call__(self, x, mask=None, cache=None):
        return self[self.out_name](self.attend(*self.project(x), mask, cache))


class ResidualBlock(KindedLayer, nn.Module):
    """Pre-norm decoder block under the checkpoint's module names (`ln_1`/`attn`/`ln_2`/`mlp` in GPT-2, ...).

    `norms` names the attention norm and the MLP norm; a single name means the attention norm's output feeds the
    MLP too (phi, falcon-7b). Sequential: h = x + attn(n1(x)); out = h + mlp(n2(h)).
    Parallel (`parallel=True`): out = x + attn(n1(x)) + mlp(n2(x)).
    """

    def __init__(self, attn: nn.Module, mlp: nn.Module, norm: Callable[[], nn.Module],
                 norms=("input_layernorm", "post_attention_layernorm"), parallel: bool = False,
                 names=("self_attn", "mlp"), kind: LayerKind = FULL):
        super().__init__()
        if len(norms) == 1 and not parallel:
            raise ValueError("a sequential block needs a norm for attention and one for the MLP")
        self.attn_name, self.mlp_name = names
        self.norm1, self.norm2 = norms[0], (norms[1] if len(norms) == 2 else None)
        self[self.attn_name], self[self.mlp_name] = attn, mlp
        for name in norms:
            self[name] = norm()
        self.parallel, self.kind = parallel, kind

    def __call__(self, x, mask=None, cache=None):
        h = self[self.norm1](x)
        a = self[self.attn_name](h, mask, cache)
        mlp = self[self.mlp_name]
        if self.parallel:
            return x + a + mlp(self[self.norm2](x) if self.norm2 else h)
        h = x + a
        return h + mlp(self[self.norm2](h))


class NamedBackbone(nn.Module):
    """A backbone under the checkpoint's names (GPT-2: `wte`, `h`, `ln_f`) that CausalLM sees through the standard
    `embed_tokens` / `layers` / `norm`. `extra` adds modules such as learned positions (`wpe`)."""

    def __init__(self, vocab_size: int, hidden_size: int, layers: list, norm: nn.Module,
                 names=("embed_tokens", "layers", "norm"), extra: Optional[dict] = None):
        super().__init__()
        self.embed_name, self.layers_name, self.norm_name = names
        self[self.embed_name] = nn.Embedding(vocab_size, hidden_size)
        self[self.layers_name] = layers
        self[self.norm_name] = norm
        for name, module in (extra or {}).items():
            self[name] = module

    @property
    def embed_tokens(self):
        return self[self.embed_name]

    @property
    def layers(self):
        return self[self.layers_name]

    @property
    def norm(self):
        return self[self.norm_name]
