"""Linear-attention and gated-recurrence layers of hybrid models: the gated delta rule (qwen3_next, qwen3_5,
olmo_hybrid; Kimi's per-channel variant), decayed linear ("lightning") attention (minimax), the diagonal linear
recurrence under RG-LRU (recurrent_gemma), their gated norm, and the block that makes a recurrent layer's cache.

Every recurrence has two forms that compute the same thing: a chunked form for prompts (matrix products inside
chunks of `chunk` tokens, one Python step per chunk, never per token) and a one-token step for decoding. States are
float32 whatever the activations' dtype (transformers computes them in float32 too), and live in a `StateCache` slot.

Shapes follow transformers: q, k (B, L, H, Dk), v (B, L, H, Dv), per-token log decays g (B, L, H) or, per key
channel, (B, L, H, Dk), update strengths beta (B, L, H); the state is (B, H, Dk, Dv).
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import StateCache
from .layers import ResidualBlock
from .weights import Op, template

CHUNK = 64  # tokens per chunk of the chunked forms (transformers' and FLA's default)


class RecurrentBlock(ResidualBlock):
    """A pre-norm block (under the checkpoint's names) whose mixer is attention or, for a layer of kind
    "recurrent", a layer that keeps a state: its cache is a StateCache with the mixer's `cache_slots`."""

    def make_cache(self):
        if self.kind.attends:
            return super().make_cache()
        return StateCache(self[self.attn_name].cache_slots)


class FoldNormOffset(Op):
    """(1 + w) RMSNorm weights stored as w in the checkpoint <-> the plain weights 1 + w that mlx-lm reads, for the
    declared keys. The checkpoint layout is recognised by a depthwise convolution weight (`marker`) still stored
    (C, 1, K): fold only then (and unfold only then, in the inverse, which runs after the convolution's own rule
    has put it back), so that sanitize can run twice. Folded in float32 (the cast rounds once)."""

    rounding = 2.0**-22  # float32 spacing near 1 + w (|1 + w| < 4): the round trip's largest error

    def __init__(self, marker: str, *patterns: str, sign: float = 1.0):
        self.marker, self.patterns, self.sign = marker, patterns, sign
        self.marker_regex = template(marker)
        self.regexes = [template(p) for p in patterns]

    def _source_layout(self, w) -> bool:
        convs = [v for k, v in w.items() if self.marker_regex.match(k)]
        return any(v.ndim == 3 and v.shape[1] == 1 and v.shape[2] > 1 for v in convs)

    def apply(self, w):
        if not self._source_layout(w):
            return w
        return {k: (v.astype(mx.float32) + self.sign if any(r.match(k) for r in self.regexes) else v)
                for k, v in w.items()}

    def inverse(self):
        return FoldNormOffset(self.marker, *self.patterns, sign=-self.sign)

    def stored_offset(self, key: str) -> float:
        """The constant that the stored form of checkpoint tensor `key` adds to it (for the gate's weight check)."""
        return self.sign if any(r.match(key) for r in self.regexes) else 0.0


def l2norm(x, eps: float = 1e-6):
    """x / sqrt(sum(x^2) + eps) along the last axis (FLA's l2norm, which transformers mirrors)."""
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def repeat_heads(x, heads: int):
    """(B, L, h, D) -> (B, L, heads, D), each head serving heads // h consecutive heads (grouped values)."""
    return x if x.shape[2] == heads else mx.repeat(x, heads // x.shape[2], axis=2)


class GatedRMSNorm(nn.Module):
    """RMSNorm of x times act(gate), in float32 (qwen3_next's RMSNormGated, FLA's FusedRMSNormGated)."""

    def __init__(self, dims: int, eps: float = 1e-6, act=nn.silu):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps, self.act = eps, act

    def __call__(self, x, gate):
        dtype = x.dtype
        y = mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps)
        return (y * self.act(gate.astype(mx.float32))).astype(dtype)


# --- the gated delta rule -----------------------------------------------------------------------------------------


def _unit_lower_inverse(a):
    """(I + a)^-1 for strictly lower-triangular a (..., C, C): the series sum_k (-a)^k, which ends because a is
    nilpotent, as log2(C) products (I - a)(I + a^2)(I + a^4)... (matrix products only, on every device)."""
    eye = mx.eye(a.shape[-1], dtype=a.dtype)
    power, inverse = -a, eye - a
    n = 2
    while n < a.shape[-1]:
        power = power @ power
        inverse = inverse + power @ inverse
        n *= 2
    return inverse


def _chunks(x, chunk: int):
    """(B, H, L, ...) padded with zeros to whole chunks and split: (B, H, n, chunk, ...)."""
    L = x.shape[2]
    pad = -L % chunk
    if pad:
        x = mx.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    return x.reshape(*x.shape[:2], -1, chunk, *x.shape[3:])


def gated_delta_chunked(q, k, v, g, beta, state=None, chunk: int = CHUNK):
    """The gated delta rule over a whole sequence, chunk by chunk: per token t the state decays by exp(g_t), then
    moves toward v_t along k_t by beta_t (S <- S + beta_t k_t (v_t - k_t S)); the output is q_t S. q is expected
    scaled already. g may be per head (B, L, H) or per key channel (B, L, H, Dk). Returns (out (B, L, H, Dv) in
    float32, final state)."""
    B, L, H, Dk = k.shape
    Dv = v.shape[-1]
    f32 = lambda x: x.astype(mx.float32)  # noqa: E731
    q, k, v = (_chunks(f32(x).transpose(0, 2, 1, 3), chunk) for x in (q, k, v))  # (B, H, n, C, D)
    beta = _chunks(f32(beta).transpose(0, 2, 1), chunk)  # (B, H, n, C)
    g = f32(g)
    per_channel = g.ndim == 4
    g = _chunks(g.transpose(0, 2, 1, 3) if per_channel else g.transpose(0, 2, 1)[..., None], chunk)  # (B,H,n,C,d)
    cum = mx.cumsum(g, axis=3)  # log decay from the chunk's start through each token
    causal = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_))
    # Pairwise decays exp(cum_i - cum_j), j <= i, per channel when the gate is: (B, H, n, C, C, d).
    diff = mx.where(causal[..., None], cum[..., :, None, :] - cum[..., None, :, :], -mx.inf)
    pair = mx.exp(diff)
    kb = k * beta[..., None]
    if per_channel:
        dot = lambda a, b: (a[..., :, None, :] * b[..., None, :, :] * pair).sum(-1)  # noqa: E731
    else:
        pair = pair[..., 0]
        dot = lambda a, b: (a @ b.swapaxes(-1, -2)) * pair  # noqa: E731
    strict = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_), k=-1)
    system = mx.where(strict, dot(kb, k), 0)
    solve = _unit_lower_inverse(system)
    values = solve @ (v * beta[..., None])  # the delta rule's corrected values before the old state's share
    decayed_kb = solve @ (kb * mx.exp(cum))  # how each token reads the state from the chunk's start
    inner = mx.where(causal, dot(q, k), 0)
    q_read = q * mx.exp(cum)
    last = cum[..., -1:, :]  # (B, H, n, 1, d)
    k_write = k * mx.exp(last - cum)
    chunk_decay = mx.exp(last).swapaxes(-1, -2)  # (B, H, n, d, 1)
    S = mx.zeros((B, H, Dk, Dv), mx.float32) if state is None else f32(state)
    out = []
    for i in range(q.shape[2]):
        new = values[:, :, i] - decayed_kb[:, :, i] @ S
        out.append(q_read[:, :, i] @ S + inner[:, :, i] @ new)
        S = S * chunk_decay[:, :, i] + k_write[:, :, i].swapaxes(-1, -2) @ new
    out = mx.concatenate(out, axis=2)[:, :, :L]
    return out.transpose(0, 2, 1, 3), S


def gated_delta_step(q, k, v, g, beta, state=None):
    """The gated delta rule one token at a time (L = 1 in decoding; any L for tests): the recurrent form."""
    B, L, H, Dk = k.shape
    f32 = lambda x: x.astype(mx.float32)  # noqa: E731
    S = mx.zeros((B, H, Dk, v.shape[-1]), mx.float32) if state is None else f32(state)
    decay = mx.exp(f32(g))
    out = []
    for t in range(L):
        d = decay[:, t][..., None] if decay.ndim == 4 else decay[:, t][..., None, None]
        S = S * d
        k_t = f32(k[:, t])
        delta = (f32(v[:, t]) - (S * k_t[..., None]).sum(-2)) * f32(beta[:, t])[..., None]
        S = S + k_t[..., None] * delta[..., None, :]
        out.append((S * f32(q[:, t])[..., None]).sum(-2))
    return mx.stack(out, axis=1), S


def gated_delta(q, k, v, g, beta, cache: Optional[StateCache] = None, slot: int = 0, chunk: int = CHUNK):
    """The gated delta rule with its state in `cache[slot]`: the recurrent step for a single token after a prefill,
    the chunked form otherwise. Output in float32."""
    state = cache[slot] if cache is not None else None
    if q.shape[1] == 1 and state is not None:
        out, state = gated_delta_step(q, k, v, g, beta, state)
    else:
        out, state = gated_delta_chunked(q, k, v, g, beta, state, chunk)
    if cache is not None:
        cache[slot] = state
    return out


def gated_delta_by_chunk(q, k, v, g, beta, cache: Optional[StateCache] = None, slot: int = 0, chunk: int = CHUNK):
    """`gated_delta` for per-key-channel decays (Kimi Delta Attention): a prompt goes through the chunked form one
    chunk per call, the state carried between calls, so that the pairwise decays (chunk x chunk x Dk per head) exist
    for one chunk at a time rather than for the whole prompt at once."""
    state = cache[slot] if cache is not None else None
    if q.shape[1] == 1 and state is not None:
        out, state = gated_delta_step(q, k, v, g, beta, state)
    else:
        parts = []
        for s in range(0, q.shape[1], chunk):
            part, state = gated_delta_chunked(q[:, s : s + chunk], k[:, s : s + chunk], v[:, s : s + chunk],
                                              g[:, s : s + chunk], beta[:, s : s + chunk], state, chunk)
            parts.append(part)
        out = mx.concatenate(parts, axis=1)
    if cache is not None:
        cache[slot] = state
    return out


# --- decayed linear attention (lightning attention) ---------------------------------------------------------------


def decayed_linear_chunked(q, k, v, g, state=None, chunk: int = CHUNK):
    """Linear attention with a per-token, per-head log decay g (B, L, H): S_t = exp(g_t) S_{t-1} + k_t^T v_t,
    out_t = q_t S_t (MiniMax's lightning attention, g = -slope), chunk by chunk. Returns (out float32, state)."""
    B, L, H, Dk = k.shape
    f32 = lambda x: x.astype(mx.float32)  # noqa: E731
    q, k, v = (_chunks(f32(x).transpose(0, 2, 1, 3), chunk) for x in (q, k, v))  # (B, H, n, C, D)
    cum = mx.cumsum(_chunks(f32(g).transpose(0, 2, 1), chunk), axis=3)[..., None]  # (B, H, n, C, 1)
    causal = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_))
    pair = mx.exp(mx.where(causal, cum - cum.swapaxes(-1, -2), -mx.inf))
    inner = (q @ k.swapaxes(-1, -2)) * pair @ v  # within the chunk
    q_read, last = q * mx.exp(cum), cum[..., -1:, :]
    k_write = k * mx.exp(last - cum)
    S = mx.zeros((B, H, Dk, v.shape[-1]), mx.float32) if state is None else f32(state)
    out = []
    for i in range(q.shape[2]):
        out.append(q_read[:, :, i] @ S + inner[:, :, i])
        S = S * mx.exp(last[:, :, i]) + k_write[:, :, i].swapaxes(-1, -2) @ v[:, :, i]
    return mx.concatenate(out, axis=2)[:, :, :L].transpose(0, 2, 1, 3), S


def decayed_linear_step(q, k, v, g, state=None):
    """The same recurrence one token at a time (the decoding form)."""
    B, L, H, Dk = k.shape
    f32 = lambda x: x.astype(mx.float32)  # noqa: E731
    S = mx.zeros((B, H, Dk, v.shape[-1]), mx.float32) if state is None else f32(state)
    out = []
    for t in range(L):
        S = S * mx.exp(f32(g[:, t]))[..., None, None] + f32(k[:, t])[..., None] * f32(v[:, t])[..., None, :]
        out.append((f32(q[:, t])[..., None] * S).sum(-2))
    return mx.stack(out, axis=1), S


def decayed_linear(q, k, v, g, cache: Optional[StateCache] = None, slot: int = 0, chunk: int = CHUNK):
    """Decayed linear attention with its state in `cache[slot]`: the step for one token after a prefill, else
    chunked."""
    state = cache[slot] if cache is not None else None
    if q.shape[1] == 1 and state is not None:
        out, state = decayed_linear_step(q, k, v, g, state)
    else:
        out, state = decayed_linear_chunked(q, k, v, g, state, chunk)
    if cache is not None:
        cache[slot] = state
    return out


# --- the diagonal linear recurrence (RG-LRU) ----------------------------------------------------------------------


def diagonal_recurrence_chunked(a, x, state=None, chunk: int = CHUNK):
    """h_t = a_t * h_{t-1} + x_t elementwise over a whole sequence (recurrent_gemma's RG-LRU scan): chunks of `chunk`
    tokens, each a log-depth associative scan, the state carried from chunk to chunk. a, x (B, L, D); state (B, D)
    or None for zeros. Returns (h (B, L, D) float32, last state)."""
    from .ssm import _associative_scan

    a, x = a.astype(mx.float32), x.astype(mx.float32)
    state = mx.zeros((x.shape[0], x.shape[2]), mx.float32) if state is None else state.astype(mx.float32)
    out = []
    for start in range(0, x.shape[1], chunk):
        decay, h = _associative_scan(a[:, start : start + chunk], x[:, start : start + chunk])
        h = h + decay * state[:, None]
        out.append(h)
        state = h[:, -1]
    return mx.concatenate(out, axis=1), state


def diagonal_recurrence_step(a, x, state=None):
    """The same recurrence one token at a time (the decoding form; any L for tests)."""
    state = mx.zeros((x.shape[0], x.shape[2]), mx.float32) if state is None else state.astype(mx.float32)
    out = []
    for t in range(x.shape[1]):
        state = a[:, t].astype(mx.float32) * state + x[:, t].astype(mx.float32)
        out.append(state)
    return mx.stack(out, axis=1), state


def diagonal_recurrence(a, x, cache: Optional[StateCache] = None, slot: int = 0, chunk: int = CHUNK):
    """The diagonal recurrence with its state in `cache[slot]`: the step for one token after a prefill, else the
    chunked scan. Output in float32."""
    state = cache[slot] if cache is not None else None
    if x.shape[1] == 1 and state is not None:
        out, state = diagonal_recurrence_step(a, x, state)
    else:
        out, state = diagonal_recurrence_chunked(a, x, state, chunk)
    if cache is not None:
        cache[slot] = state
    return out
