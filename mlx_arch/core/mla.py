"""Multi-head latent attention (MLA, DeepSeek-V2 onwards) and DeepSeek Sparse Attention's indexer (DSA, DeepSeek-V3.2,
GLM-MoE-DSA).

MLA compresses keys and values into one latent per token: `kv_a_proj_with_mqa` gives a latent of `kv_lora_rank`
(RMS-normed by `kv_a_layernorm`) plus one rotary key of `qk_rope_head_dim` shared by every head. Each head's key is
[k_nope | k_rope] with k_nope = W_k(latent) (`qk_nope_head_dim`), its value W_v(latent) (`v_head_dim`); queries are
[q_nope | q_rope], projected directly (`q_proj`) or through a low-rank bottleneck (`q_a_proj`, `q_a_layernorm`,
`q_b_proj`) when `q_lora_rank` is set. The cache stores what transformers' stores: the normed latent (keys slot,
(B, 1, T, kv_lora_rank)) and the rotated shared key (values slot, (B, 1, T, qk_rope_head_dim)), plus the indexer's
keys next to the rotary key when the layer has an indexer.

The checkpoint's `kv_b_proj` (heads * (nope + v), kv_lora_rank) is kept the way mlx-lm keeps it for the family:
split per head (`split_kv`, DeepSeek-V3 onwards) into `embed_q` (heads, kv_lora_rank, nope), W_k transposed, and
`unembed_out` (heads, v, kv_lora_rank), W_v; or whole (mlx-lm's deepseek_v2), always expanded. A prompt
expands the latents into keys and values; a single decoded token is "absorbed" instead (its q_nope moved into latent
space, attention over the latents themselves as one shared KV head, the output moved out by W_v), which computes the
same scores without expanding the whole cache.

The rotary part rotates interleaved pairs (`rope_interleave`, the default) or halves; transformers' interleaved
rotation returns the pairs de-interleaved, a permutation shared by queries and keys that leaves q.k unchanged.
YaRN (and any scaled RoPE) with `mscale_all_dim` also scales the softmax by mscale(factor, mscale_all_dim)^2
(`softmax_scale`). LongCat-Flash also multiplies the queries (`q_scale`) and the normed latent, before it is cached
(`latent_scale`), by constants.
"""

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import quant
from .base import create_causal_mask, scaled_dot_product_attention
from .weights import Op, _Expand, fill, template


def softmax_scale(qk_head_dim: int, rope_scaling: Optional[dict]) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 for a scaled RoPE that states `mscale_all_dim`
    (transformers' `yarn_apply_mscale`)."""
    scale = qk_head_dim**-0.5
    scaling = rope_scaling or {}
    if scaling.get("rope_type", "default") != "default" and scaling.get("mscale_all_dim"):
        factor = float(scaling["factor"])
        mscale = 1.0 if factor <= 1 else 0.1 * float(scaling["mscale_all_dim"]) * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


# --- per-head linear layers ---------------------------------------------------------------------------------------


class MultiLinear(nn.Module):
    """One linear map per head: weight (heads, out, in); x (..., heads, L, in) -> (..., heads, L, out), or with
    `transpose=False`, x (..., L, out) -> (..., heads, L, in) through the same weight. mlx-lm's layout and name."""

    def __init__(self, input_dims: int, output_dims: int, num_heads: int):
        super().__init__()
        self.weight = mx.zeros((num_heads, output_dims, input_dims))

    def __call__(self, x, transpose: bool = True):
        return x @ (self.weight.swapaxes(-1, -2) if transpose else self.weight)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> "QuantizedMultiLinear":
        heads, output_dims, input_dims = self.weight.shape
        q = QuantizedMultiLinear(input_dims, output_dims, heads, group_size, bits, mode)
        q.weight, q.scales, *biases = mx.quantize(self.weight, group_size, bits, mode=mode)
        if biases:
            q.biases = biases[0]
        return q


class QuantizedMultiLinear(nn.Module):
    """MultiLinear with each head's rows quantized along the input axis, as `mx.quantize` packs them."""

    def __init__(self, input_dims: int, output_dims: int, num_heads: int, group_size: int = 64, bits: int = 4,
                 mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(mx.zeros((num_heads, output_dims, input_dims)), group_size,
                                                        bits, mode=mode)
        if biases:
            self.biases = biases[0]
        self.freeze()

    def __call__(self, x, transpose: bool = True):
        return mx.quantized_matmul(x, self.weight, self.scales, self.get("biases"), transpose=transpose,
                                   group_size=self.group_size, bits=self.bits, mode=self.mode)


def _multi_to_float(module: QuantizedMultiLinear) -> MultiLinear:
    weight = quant.dequantized_weight(module)
    layer = MultiLinear(weight.shape[2], weight.shape[1], weight.shape[0])
    layer.weight = weight
    return layer


quant.register(QuantizedMultiLinear, _multi_to_float)


# --- the kv_b_proj weight rule ------------------------------------------------------------------------------------


class SplitKeyValueHeads(_Expand):
    """`{*}kv_b_proj.weight` (heads * (nope + v), rank) -> `{*}embed_q.weight` (heads, rank, nope), W_k transposed
    per head, and `{*}unembed_out.weight` (heads, v, rank), W_v. `prefix` is a key template ending before
    `kv_b_proj`, e.g. "model.layers.{i}.self_attn."."""

    def __init__(self, prefix: str, heads: int, nope: int, v: int):
        self.prefix, self.heads, self.nope, self.v = prefix, heads, nope, v
        self.regex = template(prefix + "kv_b_proj.weight")

    def pieces(self, key, value, values):
        rows = self.heads * (self.nope + self.v)
        if value.ndim != 2 or value.shape[0] != rows:
            raise ValueError(f"{key}: shape {tuple(value.shape)}, expected ({rows}, kv_lora_rank) for {self.heads} "
                             f"heads of {self.nope} key and {self.v} value dims")
        per_head = value.reshape(self.heads, self.nope + self.v, -1)
        prefix = fill(self.prefix, **values)
        return [(prefix + "embed_q.weight", per_head[:, : self.nope].swapaxes(-1, -2)),
                (prefix + "unembed_out.weight", per_head[:, self.nope :])]

    def inverse(self):
        return JoinKeyValueHeads(self)


class JoinKeyValueHeads(Op):
    """The inverse of SplitKeyValueHeads: embed_q and unembed_out back into one kv_b_proj."""

    def __init__(self, split: SplitKeyValueHeads):
        self.split = split
        self.k_regex = template(split.prefix + "embed_q.weight")

    def apply(self, w):
        out = dict(w)
        for key in w:
            m = self.k_regex.match(key)
            if not m:
                continue
            prefix = fill(self.split.prefix, **m.groupdict())
            wk, wv = out.pop(key), out.pop(prefix + "unembed_out.weight")
            joined = mx.concatenate([wk.swapaxes(-1, -2), wv], axis=1)
            out[prefix + "kv_b_proj.weight"] = joined.reshape(-1, joined.shape[-1])
        return out

    def inverse(self):
        return self.split


# --- DeepSeek Sparse Attention's indexer --------------------------------------------------------------------------


class Indexer(nn.Module):
    """Chooses, per query, the `topk` earlier tokens that attention may read (DeepSeek-V3.2's lightning indexer):
    score(s, t) = sum_h w_h(x_s) * relu(q_h(s) . k(t) / sqrt(head_dim)) / sqrt(heads), with q from the query's
    low-rank residual (`wq_b`), one key per token (`wk`, LayerNorm `k_norm`), both rotated on their first
    `rope.dims` features, and head weights `weights_proj`. Scores are computed in float32 as transformers does."""

    # Kept in full precision by `RoutedModel.quant_predicate`, as transformers keeps it in float32: it only chooses.
    float_children = frozenset({"weights_proj"})

    def __init__(self, hidden_size: int, q_lora_rank: int, heads: int, head_dim: int, topk: int, rope: nn.Module):
        super().__init__()
        self.heads, self.head_dim, self.topk = heads, head_dim, topk
        self.wq_b = nn.Linear(q_lora_rank, heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden_size, heads, bias=False)
        self.rope = rope

    def keys(self, x, offset: int):
        """This chunk's indexer keys (B, 1, L, head_dim), rotated."""
        return self.rope(self.k_norm(self.wk(x))[:, None], offset=offset)

    def select(self, x, q_resid, keys, allowed, offset: int):
        """Boolean (B, 1, L, T): True at the `topk` best keys of each query among those `allowed` ((L, T) or
        (B, 1, L, T) booleans), or None when there are no more than `topk` keys."""
        T = keys.shape[2]
        if T <= self.topk:
            return None
        B, L, _ = x.shape
        q = self.wq_b(q_resid).reshape(B, L, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=offset).astype(mx.float32)
        scores = mx.maximum((q @ keys.astype(mx.float32).swapaxes(-1, -2)) * self.head_dim**-0.5, 0)
        weights = self.weights_proj(x.astype(mx.float32)) * self.heads**-0.5  # (B, L, heads), float32 as in transformers
        index = (weights.transpose(0, 2, 1)[..., None] * scores).sum(axis=1, keepdims=True)  # (B, 1, L, T)
        index = mx.where(allowed, index, -mx.inf)
        chosen = mx.argpartition(-index, kth=self.topk - 1, axis=-1)[..., : self.topk]
        return mx.put_along_axis(mx.zeros(index.shape, mx.bool_), chosen, mx.array(True), axis=-1)


def _boolean_mask(mask, L: int, T: int):
    """The (L, T) or (B, 1, L, T) boolean form of an attention mask that may be None or "causal"."""
    if mask is None:
        return mx.ones((L, T), mx.bool_)
    if isinstance(mask, str):
        return create_causal_mask(L, T - L)
    return mask


# --- the attention layer ------------------------------------------------------------------------------------------


class LatentAttention(nn.Module):
    """MLA (see the module docstring), with DSA's indexer when `indexer` is given. Called as attention(x, mask,
    cache) like every attention layer; its KVCache holds latents and rotary keys."""

    # W_v (in kv_b_proj when not split): its error goes straight into the residual stream through o_proj
    sensitive_children = ("unembed_out", "kv_b_proj")

    def __init__(self, hidden_size: int, n_heads: int, q_lora_rank: Optional[int], kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, rope: nn.Module, scale: float,
                 bias: bool = False, indexer: Optional[Indexer] = None, split_kv: bool = True,
                 q_scale: float = 1.0, latent_scale: float = 1.0):
        super().__init__()
        self.n_heads, self.kv_lora_rank, self.scale = n_heads, kv_lora_rank, scale
        self.q_scale, self.latent_scale = q_scale, latent_scale
        self.nope, self.rope_dims, self.v_dims = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        q_dims = n_heads * (qk_nope_head_dim + qk_rope_head_dim)
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, q_dims, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=bias)
            self.q_a_layernorm = nn.RMSNorm(q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(q_lora_rank, q_dims, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = nn.RMSNorm(kv_lora_rank, eps=1e-6)
        if split_kv:
            self.embed_q = MultiLinear(qk_nope_head_dim, kv_lora_rank, n_heads)
            self.unembed_out = MultiLinear(kv_lora_rank, v_head_dim, n_heads)
        else:
            self.kv_b_proj = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * v_head_dim, hidden_size, bias=bias)
        self.rope = rope
        if indexer is not None:
            self.indexer = indexer

    def queries(self, x):
        """(q_nope, q_rope unrotated) as (B, heads, L, dims), and the low-rank residual the indexer reads."""
        B, L, _ = x.shape
        if "q_proj" in self:
            q, resid = self.q_proj(x), None
        else:
            resid = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(resid)
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        return q[..., : self.nope], q[..., self.nope :], resid

    def __call__(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q_nope, q_rope, q_resid = self.queries(x)
        latent, k_rope = mx.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank], axis=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # (B, 1, L, rank)
        if self.latent_scale != 1.0:
            latent = latent * self.latent_scale
        k_rope = self.rope(k_rope[:, None], offset=offset)
        q_rope = self.rope(q_rope, offset=offset)
        indexer = self.get("indexer")
        # The indexer's keys travel in the cache next to the rotary keys (one buffer of rope + index dims).
        stored = k_rope if indexer is None else mx.concatenate([k_rope, indexer.keys(x, offset)], axis=-1)
        if cache is not None:
            latent, stored = cache.update_and_fetch(latent, stored)
        k_rope = stored[..., : self.rope_dims]
        if indexer is not None:
            allowed = _boolean_mask(mask, L, latent.shape[2])
            chosen = indexer.select(x, q_resid, stored[..., self.rope_dims :], allowed, offset)
            if chosen is not None:
                mask = allowed & chosen
        out = self.attend(q_nope, q_rope, latent, k_rope, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def attend(self, q_nope, q_rope, latent, k_rope, mask):
        """Attention over the latents: expanded into per-head keys and values for a prompt, absorbed for one
        token (split layout only). Returns (B, heads, L, v_head_dim)."""
        if q_nope.shape[2] == 1 and "embed_q" in self:
            q = mx.concatenate([self.embed_q(q_nope), q_rope], axis=-1)
            k = mx.concatenate([latent, k_rope], axis=-1)  # one KV head shared by every query head
            out = scaled_dot_product_attention(q, k, latent, None, self.scale, mask)
            return self.unembed_out(out)
        k_nope, v = self.expand(latent)
        k = mx.concatenate([k_nope, mx.broadcast_to(k_rope, (*k_nope.shape[:3], self.rope_dims))], axis=-1)
        q = mx.concatenate([q_nope, q_rope], axis=-1)
        return scaled_dot_product_attention(q, k, v, None, self.scale, mask)

    def expand(self, latent):
        """Per-head keys (no position) and values of the latents (B, 1, T, rank): (B, heads, T, nope / v)."""
        if "embed_q" in self:
            return self.embed_q(latent, transpose=False), self.unembed_out(latent)
        B, _, T, _ = latent.shape
        kv = self.kv_b_proj(latent[:, 0]).reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)
        return kv[..., : self.nope], kv[..., self.nope :]
