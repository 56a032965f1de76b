"""Gemma 4 (text), mirroring transformers/models/gemma4/modeling_gemma4.py (`Gemma4ForCausalLM`, the text path).

Differences from Gemma 3:
- Plain RMS norms (x / rms * w) everywhere; queries and keys RMS-normed per head with weights, values without;
  attention scale 1; embeddings times sqrt(hidden_size); final logits soft-capped when `final_logit_softcapping`.
- Sliding and full layers from `layer_types` (five of six slide by default; the last layer is always full). Full
  layers may have their own head size and KV head count: `per_layer_config` as transformers 5 writes it, or the
  `global_head_dim` / `num_global_key_value_heads` keys of Hub configs (the KV count only with `attention_k_eq_v`),
  exactly as Gemma4TextConfig reads them. With `attention_k_eq_v` full layers have no v_proj: values are the keys
  before their norm and RoPE. Each layer type has its RoPE from `rope_parameters` (full layers: "proportional",
  rotating only the first `partial_rotary_factor` of the rotate-half pairs).
- Per-layer inputs (`hidden_size_per_layer_input` > 0): a second token embedding (`vocab_size_per_layer_input`
  rows, one slice per layer) mixed with a projection of the input embeddings; each layer gates it with its own
  output and adds it back through a projection and a norm.
- KV sharing: the last `num_kv_shared_layers` layers have no key/value projections and attend over the keys and
  values of the last earlier layer of their type (which keeps no other cache); with `use_double_wide_mlp` their
  MLPs are twice as wide.
- MoE (`enable_moe_block`): beside the dense MLP, `num_experts` experts of `moe_intermediate_size` read the
  attention block's output, routed by a softmax over a scaled, normed projection, the `top_k_experts` best
  renormalised and times a learned per-expert scale; each path has its own norms before the two are added.
- Each layer's output is multiplied by its `layer_scalar` (checkpoint data).

Refused: `use_bidirectional_attention: "all"` (not a causal language model).
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .core.base import rope_config, scaled_dot_product_attention
from .core.kinds import FULL, KindedLayer, LayerKind
from .core.layers import MLP, Backbone, WeightlessRMSNorm, activation
from .core.moe import RoutedModel, SwitchGLU, softmax_topk
from .core.rope import initialize_rope
from .core.weights import Drop, Move, Split

_DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                 "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                    "rope_theta": 1_000_000.0}}


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = 4
    head_dim: Optional[int] = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: Optional[int] = 131_072
    tie_word_embeddings: bool = True
    rope_parameters: Optional[dict] = None
    sliding_window: Optional[int] = 512
    final_logit_softcapping: Optional[float] = None
    use_bidirectional_attention: Optional[str] = None
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: Optional[int] = None
    top_k_experts: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    global_head_dim: int = 512
    num_global_key_value_heads: Optional[int] = None
    per_layer_config: Optional[dict] = None

    def __post_init__(self):  # Gemma4TextConfig's rules
        if self.use_bidirectional_attention == "all":
            raise ValueError("gemma4_text with use_bidirectional_attention='all' attends both ways and is not a causal "
                             "language model; only causal checkpoints convert")
        n = self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
        self.layer_types = list(self.layer_types[:n - 1]) + ["full_attention"]  # the last layer is always full
        self.rope_parameters = self.rope_parameters or _DEFAULT_ROPE
        self.hidden_act = self.hidden_activation
        super().__post_init__()
        if self.per_layer_config is None:
            full = {"head_dim": self.global_head_dim}
            if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
                full["num_key_value_heads"] = self.num_global_key_value_heads
            self.per_layer_config = {i: full for i, t in enumerate(self.layer_types) if t == "full_attention"}
        self.per_layer_config = {int(i): dict(c) for i, c in self.per_layer_config.items()}
        first_shared = n - self.num_kv_shared_layers
        if self.num_kv_shared_layers and set(self.layer_types[:first_shared]) != set(self.layer_types):
            raise ValueError("gemma4_text: every layer type among the KV-shared layers needs an earlier layer of that "
                             "type to share keys and values from")

    def layer_dims(self, i: int):
        """(head_dim, num_key_value_heads) of layer i."""
        own = self.per_layer_config.get(i, {})
        return own.get("head_dim", self.head_dim), own.get("num_key_value_heads", self.num_key_value_heads)

    def sharing(self, i: int) -> Optional[str]:
        """"reuse" for a KV-shared layer, "store" for the layer whose keys and values it reuses, else None."""
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        if i >= first_shared:
            return "reuse"
        if self.num_kv_shared_layers and i == max(j for j in range(first_shared)
                                                 if self.layer_types[j] == self.layer_types[i]):
            return "store"
        return None


class Gemma4Attention(nn.Module):
    sensitive_children = ("v_proj",)

    def __init__(self, a: ModelArgs, index: int, rope):
        super().__init__()
        head_dim, n_kv = a.layer_dims(index)
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope = a.num_attention_heads, n_kv, head_dim, rope
        self.layer_type, self.sharing = a.layer_types[index], a.sharing(index)
        bias = a.attention_bias
        self.q_proj = nn.Linear(a.hidden_size, self.n_heads * head_dim, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=a.rms_norm_eps)
        if self.sharing != "reuse":
            self.k_proj = nn.Linear(a.hidden_size, n_kv * head_dim, bias=bias)
            if not (a.attention_k_eq_v and self.layer_type != "sliding_attention"):
                self.v_proj = nn.Linear(a.hidden_size, n_kv * head_dim, bias=bias)
            self.k_norm = nn.RMSNorm(head_dim, eps=a.rms_norm_eps)
            self.v_norm = WeightlessRMSNorm(a.rms_norm_eps)
        self.o_proj = nn.Linear(self.n_heads * head_dim, a.hidden_size, bias=bias)

    def keys_values(self, x, mask, cache, shared):
        """(keys, values, mask, offset, cache) this layer attends with: its own, or those of the layer it shares."""
        if self.sharing == "reuse":
            if shared is None or self.layer_type not in shared:
                raise ValueError("a KV-shared Gemma 4 layer needs the keys and values of an earlier layer: run it "
                                 "through the whole model")
            return shared[self.layer_type]
        B, L, _ = x.shape
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1) if "v_proj" in self else k
        k, v = self.k_norm(k).transpose(0, 2, 1, 3), self.v_norm(v).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        found = (k, v, mask, offset, cache)
        if self.sharing == "store" and shared is not None:
            shared[self.layer_type] = found
        return found

    def __call__(self, x, mask=None, cache=None, shared=None):
        B, L, _ = x.shape
        k, v, mask, offset, cache = self.keys_values(x, mask, cache, shared)
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        out = scaled_dot_product_attention(self.rope(q, offset=offset), k, v, cache, 1.0, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class Router(nn.Module):
    """Softmax over a projection of the RMS-normed input times `scale` / sqrt(hidden); the top k renormalised,
    times their `per_expert_scale`."""

    def __init__(self, hidden_size: int, num_experts: int, k: int, eps: float):
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_experts, bias=False)
        self.scale = mx.ones((hidden_size,))
        self.per_expert_scale = mx.ones((num_experts,))
        self.k, self.eps = k, eps

    def __call__(self, x):
        h = mx.fast.rms_norm(x, None, self.eps) * self.scale * (x.shape[-1] ** -0.5)
        indices, weights = softmax_topk(self.proj(h), self.k, normalize=True)
        return indices, weights * self.per_expert_scale[indices].astype(mx.float32)


class Experts(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.switch_glu = SwitchGLU(a.hidden_size, a.moe_intermediate_size, a.num_experts, a.hidden_act)

    def __call__(self, x, indices, weights):
        return (self.switch_glu(x, indices) * weights[..., None].astype(x.dtype)).sum(axis=-2)


class Gemma4Layer(KindedLayer, nn.Module):
    float_children = frozenset({"router"})  # kept in full precision (RoutedModel)

    def __init__(self, a: ModelArgs, index: int, attn: nn.Module, norm, kind: LayerKind = FULL):
        super().__init__()
        self.self_attn, self.kind = attn, kind
        wide = 2 if a.use_double_wide_mlp and a.sharing(index) == "reuse" else 1
        self.mlp = MLP(a.hidden_size, a.intermediate_size * wide, a.hidden_act)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            self[name] = norm()
        self.layer_scalar = mx.ones((1,))
        if a.hidden_size_per_layer_input:
            self.act = activation(a.hidden_act)
            self.per_layer_input_gate = nn.Linear(a.hidden_size, a.hidden_size_per_layer_input, bias=False)
            self.per_layer_projection = nn.Linear(a.hidden_size_per_layer_input, a.hidden_size, bias=False)
            self.post_per_layer_input_norm = norm()
        if a.enable_moe_block:
            self.router = Router(a.hidden_size, a.num_experts, a.top_k_experts, a.rms_norm_eps)
            self.experts = Experts(a)
            for name in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"):
                self[name] = norm()

    def __call__(self, x, mask=None, cache=None, per_layer_input=None, shared=None):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, cache, shared))
        m = self.mlp(self.pre_feedforward_layernorm(h))
        if "experts" in self:
            routed = self.experts(self.pre_feedforward_layernorm_2(h), *self.router(h))
            m = self.post_feedforward_layernorm_1(m) + self.post_feedforward_layernorm_2(routed)
        h = h + self.post_feedforward_layernorm(m)
        if "per_layer_input_gate" in self:
            if per_layer_input is None:
                raise ValueError("a Gemma 4 layer with per-layer inputs needs them: run it through the whole model")
            gated = self.act(self.per_layer_input_gate(h)) * per_layer_input
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return h * self.layer_scalar.astype(h.dtype)

    def make_cache(self):
        return None if self.self_attn.sharing == "reuse" else self.kind.make_cache()


class PerLayerBackbone(Backbone):
    """The backbone with the per-layer input embedding, its projection from the input embeddings and its norm."""

    def __init__(self, a: ModelArgs, layers: list, norm: nn.Module):
        super().__init__(a.vocab_size, a.hidden_size, layers, norm)
        n, p = a.num_hidden_layers, a.hidden_size_per_layer_input
        self.embed_tokens_per_layer = nn.Embedding(a.vocab_size_per_layer_input, n * p)
        self.per_layer_model_projection = nn.Linear(a.hidden_size, n * p, bias=False)
        self.per_layer_projection_norm = nn.RMSNorm(p, eps=a.rms_norm_eps)


class Model(RoutedModel, llama.Model):
    def __init__(self, args: ModelArgs):
        self.embed_scale = args.hidden_size**0.5
        self.final_softcap = args.final_logit_softcapping
        super().__init__(args)

    @cached_property
    def ropes(self) -> dict:
        """One RoPE per (layer type, head size)."""
        a = self.args
        out = {}
        for i, t in enumerate(a.layer_types[: a.num_hidden_layers]):
            dims = a.layer_dims(i)[0]
            if (t, dims) not in out:
                params = rope_config({"rope_parameters": a.rope_parameters}, t)
                out[(t, dims)] = initialize_rope(dims, params.get("rope_theta", 10_000.0), False, params,
                                                 a.max_position_embeddings)
        return out

    def backbone(self, layers: list) -> nn.Module:
        if self.args.hidden_size_per_layer_input:
            return PerLayerBackbone(self.args, layers, self.norm())
        return super().backbone(layers)

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        rope = self.ropes[(a.layer_types[index], a.layer_dims(index)[0])]
        return Gemma4Layer(a, index, Gemma4Attention(a, index, rope), self.norm, kind)

    def per_layer_inputs(self, inputs, h):
        """(B, L, layers, hidden_size_per_layer_input): the per-layer token embedding mixed with a projection of the
        input embeddings h."""
        a, m = self.args, self.model
        shape = (*inputs.shape, a.num_hidden_layers, a.hidden_size_per_layer_input)
        tokens = m.embed_tokens_per_layer(inputs)
        tokens = (tokens * mx.array(a.hidden_size_per_layer_input**0.5, tokens.dtype)).reshape(shape)
        projected = m.per_layer_projection_norm((m.per_layer_model_projection(h) * a.hidden_size**-0.5).reshape(shape))
        return (projected + tokens) * 2**-0.5

    def stream_context(self, inputs, h) -> dict:
        """The per-layer inputs of this pass (when the model has them) and the room where a layer leaves the keys
        and values that later layers share."""
        per_layer = self.per_layer_inputs(inputs, h) if self.args.hidden_size_per_layer_input else None
        return {"per_layer": per_layer, "shared": {}}

    def layer_args(self, context, index: int) -> tuple:
        per_layer = context["per_layer"]
        return None if per_layer is None else per_layer[:, :, index], context["shared"]

    def weight_rules(self) -> list:
        a, e = self.args, "model.layers.{i}.experts"
        rules = super().weight_rules()
        shared = [i for i in range(a.num_hidden_layers) if a.sharing(i) == "reuse"]
        if shared:  # Hub checkpoints may still hold them; transformers ignores them
            rules.append(Drop(*(f"model.layers.{i}.self_attn.{name}.weight" for i in shared
                                for name in ("k_proj", "v_proj", "k_norm")), why="KV-shared layers reuse another's"))
        if a.enable_moe_block:
            size = a.moe_intermediate_size
            rules += [Split(f"{e}.gate_up_proj", [f"{e}.switch_glu.gate_proj.weight", f"{e}.switch_glu.up_proj.weight"],
                            [size, size], axis=1),
                      Move(f"{e}.down_proj", f"{e}.switch_glu.down_proj.weight")]
        return rules

    def export_config(self, config: dict) -> dict:
        # mlx-lm reads the global layers' head size and KV heads from the Hub's keys, not from per_layer_config, and
        # RoPE from rope_parameters: a transformers-4 `rope_scaling` (without a base, per layer type) would only
        # make transformers 5 rebuild rope_parameters wrongly, so the output says there is none.
        a = self.args
        full = next(i for i, t in enumerate(a.layer_types) if t == "full_attention")  # the last layer is full
        head_dim, n_kv = a.layer_dims(full)
        return {**config, "global_head_dim": head_dim, "rope_scaling": None,
                "num_global_key_value_heads": n_kv if n_kv != a.num_key_value_heads else None}
