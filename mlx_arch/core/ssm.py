"""State-space layers: Mamba's selective scan and Mamba-2's state space duality (SSD), their mixers, and the gated
RMS norms that follow the scan.

Every mixer is called as mixer(h, mask, cache) like attention and keeps its state in a `StateCache` with two slots: the last `kernel - 1` convolution inputs and the
recurrent state. A prompt of any length is processed without a per-token Python loop:
  Mamba-1  `selective_scan`: chunks of `SCAN_CHUNK` tokens, each a log-depth associative scan of the affine maps
           h -> a_t h + u_t (the state carried from chunk to chunk);
  Mamba-2  `ssd_chunked`: chunks of the config's `chunk_size`, each the quadratic "attention" form inside the chunk
           plus the state carried across chunks, as transformers' torch path computes it.
A single decoded token takes the recurrent form (`selective_step`, `ssd_step`); both forms compute the same
function, in float32 whatever the activations' dtype (as transformers does).

The small per-channel parameters (`A_log`, `D`, `dt_bias`, the convolution, the norms) are plain arrays or
non-Linear modules, so MLX's quantization never touches them; `SSMModel.quant_predicate` keeps the mixers' tiny dt
projections (`dt_proj`, `x_proj`) in full precision too.
"""

from dataclasses import dataclass
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, StateCache
from .conv import causal_conv, depthwise_conv
from .kinds import KindedLayer, LayerKind

SCAN_CHUNK = 64  # tokens per associative scan in Mamba-1's prefill (memory: B * chunk * channels * state floats)


@dataclass
class Mamba2Fields:
    """The `mamba_*` config keys of the Bamba lineage (bamba, granitemoehybrid, falcon_h1) with transformers'
    defaults; each family resolves `mamba_d_head: "auto"` over its own mixer width."""

    mamba_n_heads: int = 128
    mamba_d_head: Union[int, str] = "auto"
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: Optional[Union[list, tuple]] = (0.0, float("inf"))



# --- Mamba-1: the selective scan ------------------------------------------------------------------------------------


def _associative_scan(a: mx.array, u: mx.array):
    """Inclusive scan along axis 1 of the affine maps h -> a_t h + u_t (Hillis-Steele, log2(T) steps): returns the
    composed (a_1..t, u_1..t) for every t, so that h_t = a_1..t h_0 + u_1..t."""
    step = 1
    while step < a.shape[1]:
        u = mx.concatenate([u[:, :step], a[:, step:] * u[:, :-step] + u[:, step:]], axis=1)
        a = mx.concatenate([a[:, :step], a[:, step:] * a[:, :-step]], axis=1)
        step *= 2
    return a, u


def selective_scan(x, dt, A, B, C, state=None, chunk: int = SCAN_CHUNK):
    """Mamba's selective scan h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = h_t C_t (no D term, no gate).

    x, dt (batch, L, channels) with dt already positive; A (channels, state); B, C (batch, L, state); state
    (batch, channels, state) or None for zeros. Returns y (batch, L, channels) in float32 and the last state."""
    x, dt, B, C = (t.astype(mx.float32) for t in (x, dt, B, C))
    if state is None:
        state = mx.zeros((x.shape[0], x.shape[2], A.shape[1]), mx.float32)
    ys = []
    for start in range(0, x.shape[1], chunk):
        d, b, c = dt[:, start : start + chunk, :, None], B[:, start : start + chunk, None], C[:, start : start + chunk]
        a, u = _associative_scan(mx.exp(d * A), d * b * x[:, start : start + chunk, :, None])
        h = u + a * state[:, None]
        ys.append((h @ c[..., None]).squeeze(-1))
        state = h[:, -1]
    return mx.concatenate(ys, axis=1), state


def selective_step(x, dt, A, B, C, state=None):
    """One token of the selective scan in its recurrent form: x, dt (batch, 1, channels), B, C (batch, 1, state)."""
    x, dt, B, C = (t[:, 0].astype(mx.float32) for t in (x, dt, B, C))
    h = dt[..., None] * B[:, None] * x[..., None]
    if state is not None:
        h = h + mx.exp(dt[..., None] * A) * state
    return (h @ C[..., None]).squeeze(-1)[:, None], h


def rms(x, eps: float, weight=None):
    """x / rms(x) over the last axis (times `weight`), computed in float32, returned in x's dtype."""
    return mx.fast.rms_norm(x.astype(mx.float32), weight, eps).astype(x.dtype)


class MambaMixer(nn.Module):
    """Mamba-1 mixer (transformers' MambaMixer): in_proj -> [x | gate], causal conv + act on x, x_proj -> (dt, B, C),
    dt_proj + softplus, selective scan, + D x, times silu(gate) (whatever `act`), out_proj.

    `bcdt_norm` normalises dt (before dt_proj), B and C: "weightless" RMS norms with eps `norm_eps` (FalconMamba) or
    "weighted" RMS norms `dt_layernorm` / `b_layernorm` / `c_layernorm` (Jamba)."""

    sensitive_children = ("out_proj",)
    cache_slots = 2  # the convolution's last inputs, the recurrent state (core/linear.py's RecurrentBlock reads it)

    def __init__(self, hidden_size: int, intermediate_size: int, state_size: int, conv_kernel: int, dt_rank: int,
                 bias: bool = False, conv_bias: bool = True, act: str = "silu", bcdt_norm: Optional[str] = None,
                 norm_eps: float = 1e-6):
        super().__init__()
        from .layers import activation

        self.state_size, self.dt_rank = state_size, dt_rank
        self.in_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.conv1d = depthwise_conv(intermediate_size, conv_kernel, bias=conv_bias)
        self.x_proj = nn.Linear(intermediate_size, dt_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(dt_rank, intermediate_size, bias=True)
        self.A_log = mx.zeros((intermediate_size, state_size))
        self.D = mx.ones((intermediate_size,))
        self.out_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation(act)
        self.bcdt_norm, self.norm_eps = bcdt_norm, norm_eps
        if bcdt_norm == "weighted":
            self.dt_layernorm = nn.RMSNorm(dt_rank, eps=norm_eps)
            self.b_layernorm = nn.RMSNorm(state_size, eps=norm_eps)
            self.c_layernorm = nn.RMSNorm(state_size, eps=norm_eps)
        elif bcdt_norm not in (None, "weightless"):
            raise ValueError(f"unknown bcdt_norm {bcdt_norm!r}")

    def _normed(self, dt, B, C):
        if self.bcdt_norm == "weighted":
            return self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        if self.bcdt_norm == "weightless":
            return tuple(rms(t, self.norm_eps) for t in (dt, B, C))
        return dt, B, C

    def __call__(self, h, mask=None, cache: Optional[StateCache] = None):
        x, gate = mx.split(self.in_proj(h), 2, axis=-1)
        x = self.act(causal_conv(self.conv1d, x, cache, slot=0))
        dt, B, C = self._normed(*mx.split(self.x_proj(x), [self.dt_rank, self.dt_rank + self.state_size], axis=-1))
        dt = nn.softplus(self.dt_proj(dt).astype(mx.float32))
        A = -mx.exp(self.A_log.astype(mx.float32))
        state = cache[1] if cache is not None else None
        if x.shape[1] == 1 and state is not None:
            y, state = selective_step(x, dt, A, B, C, state)
        else:
            y, state = selective_scan(x, dt, A, B, C, state)
        if cache is not None:
            cache[1] = state
            cache.advance(x.shape[1])
        y = (y + x.astype(mx.float32) * self.D.astype(mx.float32)) * nn.silu(gate.astype(mx.float32))
        return self.out_proj(y.astype(h.dtype))


# --- Mamba-2: state space duality -----------------------------------------------------------------------------------


def _segment_sum(a: mx.array) -> mx.array:
    """(..., Q) -> (..., Q, Q): [t, s] = a_{s+1} + ... + a_t for s <= t, -inf above the diagonal; summed from the
    masked terms rather than as a difference of cumulative sums, which loses precision far into a chunk."""
    Q = a.shape[-1]
    below = mx.tril(mx.ones((Q, Q), mx.bool_), -1)
    sums = mx.cumsum(mx.where(below, a[..., :, None], 0.0), axis=-2)
    return mx.where(mx.tril(mx.ones((Q, Q), mx.bool_)), sums, -mx.inf)


def _heads(t: mx.array, heads: int) -> mx.array:
    """B or C (batch, L, groups, state) -> (batch, heads, L, state): head h reads group h // (heads / groups)."""
    return mx.repeat(t, heads // t.shape[2], axis=2).transpose(0, 2, 1, 3)


def ssd_chunked(x, dt, A, B, C, chunk_size: int, state=None):
    """Mamba-2's scan h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t per head, chunk by chunk.

    x (batch, L, heads, head_dim); dt (batch, L, heads), already positive; A (heads,); B, C (batch, L, groups,
    state); state (batch, heads, head_dim, state) or None. Returns y (batch, L, heads, head_dim) in float32 (no D
    term) and the last state."""
    b, L, h, p = x.shape
    x, dt = x.astype(mx.float32).transpose(0, 2, 1, 3), dt.astype(mx.float32).transpose(0, 2, 1)
    B, C = _heads(B.astype(mx.float32), h), _heads(C.astype(mx.float32), h)
    if state is None:
        state = mx.zeros((b, h, p, B.shape[-1]), mx.float32)
    ys = []
    for s in range(0, L, chunk_size):
        xc, dA = x[:, :, s : s + chunk_size] * dt[:, :, s : s + chunk_size, None], dt[:, :, s : s + chunk_size] * A[:, None]
        Bc, Cc = B[:, :, s : s + chunk_size], C[:, :, s : s + chunk_size]
        cum = mx.cumsum(dA, axis=-1)  # (b, h, Q)
        inside = (Cc @ Bc.swapaxes(-1, -2)) * mx.exp(_segment_sum(dA))  # (b, h, Q, Q)
        y = inside @ xc + mx.exp(cum)[..., None] * (Cc @ state.swapaxes(-1, -2))
        decay = mx.exp(cum[..., -1:] - cum)  # from each position to the chunk's end
        state = mx.exp(cum[..., -1])[..., None, None] * state + (xc * decay[..., None]).swapaxes(-1, -2) @ Bc
        ys.append(y)
    return mx.concatenate(ys, axis=2).transpose(0, 2, 1, 3), state


def ssd_step(x, dt, A, B, C, state=None):
    """One token of Mamba-2's scan in its recurrent form: x (batch, 1, heads, head_dim), dt (batch, 1, heads),
    B, C (batch, 1, groups, state)."""
    h = x.shape[2]
    x, dt = x[:, 0].astype(mx.float32), dt[:, 0].astype(mx.float32)
    B, C = _heads(B.astype(mx.float32), h)[:, :, 0], _heads(C.astype(mx.float32), h)[:, :, 0]  # (b, h, n)
    new = (dt[..., None] * x)[..., None] * B[:, :, None]  # (b, h, p, n)
    if state is not None:
        new = new + mx.exp(dt * A)[..., None, None] * state
    return (new @ C[..., None]).squeeze(-1)[:, None], new


class GatedRMSNorm(nn.Module):
    """RMS norm over `groups` equal groups of channels, with the gate act(z) applied before the norm (Mamba-2,
    Bamba, Nemotron-H, Granite-4, Zamba2) or after it (`norm_before_gate`, Falcon-H1's option); float32 inside."""

    def __init__(self, dims: int, groups: int = 1, eps: float = 1e-6, norm_before_gate: bool = False):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.groups, self.eps, self.norm_before_gate = groups, eps, norm_before_gate

    def __call__(self, x, gate=None):
        dtype = x.dtype
        x = x.astype(mx.float32)
        gate = nn.silu(gate.astype(mx.float32)) if gate is not None else None
        if gate is not None and not self.norm_before_gate:
            x = x * gate
        grouped = x.reshape(*x.shape[:-1], self.groups, -1)
        x = mx.fast.rms_norm(grouped, None, self.eps).reshape(x.shape)
        if gate is not None and self.norm_before_gate:
            return (self.weight.astype(mx.float32) * x * gate).astype(dtype)
        return (self.weight * x.astype(dtype)).astype(dtype)


def _json_float(v) -> float:
    """A float of config.json: transformers 5 writes infinities as {"__float__": "Infinity"}."""
    return float(v["__float__"] if isinstance(v, dict) else v)


def time_step_bounds(limit) -> tuple:
    """The (min, max) a Mamba-2 dt is clipped to; None means no bounds."""
    low, high = limit if limit is not None else (0.0, float("inf"))
    return _json_float(low), _json_float(high)


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer (transformers' Mamba2Mixer and its copies): in_proj -> [gate | x B C | dt], causal conv + act
    on [x B C], dt = clip(softplus(dt + dt_bias), time_step_limit), SSD scan + D x, gated RMS norm, out_proj.

    `norm` is the gated norm (a GatedRMSNorm) or None for a plain act(gate) product (Falcon-H1 without
    `mamba_rms_norm`). `in_multiplier` scales the input and `mup_vector` (registered by the family when it has one)
    the projected channels (Falcon-H1)."""

    sensitive_children = ("out_proj",)
    cache_slots = 2  # the convolution's last inputs, the recurrent state (core/linear.py's RecurrentBlock reads it)

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, state_size: int, n_groups: int,
                 conv_kernel: int, chunk_size: int, time_step_limit=(0.0, float("inf")), bias: bool = False,
                 conv_bias: bool = True, act: str = "silu", norm: Optional[nn.Module] = None, out_bias=None,
                 in_multiplier: float = 1.0):
        super().__init__()
        from .layers import activation

        self.num_heads, self.head_dim, self.state_size, self.n_groups = num_heads, head_dim, state_size, n_groups
        self.chunk_size, self.in_multiplier = chunk_size, in_multiplier
        self.time_step_limit = time_step_bounds(time_step_limit)
        self.intermediate_size = num_heads * head_dim
        self.conv_dim = self.intermediate_size + 2 * n_groups * state_size
        self.in_proj = nn.Linear(hidden_size, self.intermediate_size + self.conv_dim + num_heads, bias=bias)
        self.conv1d = depthwise_conv(self.conv_dim, conv_kernel, bias=conv_bias)
        self.dt_bias = mx.ones((num_heads,))
        self.A_log = mx.zeros((num_heads,))
        self.D = mx.ones((num_heads,))
        if norm is not None:
            self.norm = norm
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=bias if out_bias is None else out_bias)
        self.act = activation(act)

    def project(self, h):
        projected = self.in_proj(h * self.in_multiplier if self.in_multiplier != 1.0 else h)
        if "mup_vector" in self:
            projected = projected * self.mup_vector
        return projected

    def scan(self, x, dt, B, C, cache):
        """SSD of the conv outputs, chunked for a prompt and recurrent for one decoded token; updates the cache."""
        b, L, _ = x.shape
        x = x.reshape(b, L, self.num_heads, self.head_dim)
        B = B.reshape(b, L, self.n_groups, self.state_size)
        C = C.reshape(b, L, self.n_groups, self.state_size)
        dt = mx.clip(nn.softplus(dt.astype(mx.float32) + self.dt_bias.astype(mx.float32)), *self.time_step_limit)
        A = -mx.exp(self.A_log.astype(mx.float32))
        state = cache[1] if cache is not None else None
        if L == 1 and state is not None:
            y, state = ssd_step(x, dt, A, B, C, state)
        else:
            y, state = ssd_chunked(x, dt, A, B, C, self.chunk_size, state)
        if cache is not None:
            cache[1] = state
            cache.advance(L)
        y = y + x.astype(mx.float32) * self.D.astype(mx.float32)[:, None]
        return y.reshape(b, L, -1)

    def __call__(self, h, mask=None, cache: Optional[StateCache] = None):
        gate, xBC, dt = mx.split(self.project(h), [self.intermediate_size, self.intermediate_size + self.conv_dim],
                                 axis=-1)
        xBC = self.act(causal_conv(self.conv1d, xBC, cache, slot=0))
        n = self.n_groups * self.state_size
        x, B, C = mx.split(xBC, [self.intermediate_size, self.intermediate_size + n], axis=-1)
        y = self.scan(x, dt, B, C, cache)
        if "norm" in self:
            y = self.norm(y.astype(h.dtype), gate)
        else:
            y = (y * nn.silu(gate.astype(mx.float32))).astype(h.dtype)
        return self.out_proj(y)


# --- the model side -------------------------------------------------------------------------------------------------

RECURRENT = LayerKind("recurrent")


class MixerBlock(KindedLayer, nn.Module):
    """Pre-norm residual block around a mixer (Mamba, Mamba-2): x + mixer(norm(x)), under `norm` / `mixer`."""

    kind = RECURRENT

    def __init__(self, mixer: nn.Module, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.mixer = mixer

    def __call__(self, x, mask=None, cache=None):
        return x + self.mixer(self.norm(x), None, cache)

    def make_cache(self):
        return StateCache(self.mixer.cache_slots)


# Linear layers of the mixers kept in full precision: Mamba-1's dt path is a few thousandths of a layer's weights
# (dt_rank = hidden / 16) and its error goes through softplus and exp into every later token's state.
FLOAT_LINEARS = ("dt_proj", "x_proj")


class SSMModel:
    """Mixin for the `Model` of a family with state-space mixers: its `quant_predicate` keeps the mixers' dt
    projections in full precision (everything else the mixers hold is not a Linear and never quantized), and
    composes with a parent's predicate (MoE routers)."""

    # transformers' mixers read their convolution's and dt projection's weights without calling those modules: the
    # gate's streamed reference loads each block's weights as a whole.
    reference_reads_children = True

    def quant_predicate(self, path: str, module) -> bool:
        if path.rsplit(".", 1)[-1] in FLOAT_LINEARS:
            return False
        parent = getattr(super(), "quant_predicate", None)
        return parent(path, module) if parent is not None else True


class KVStateCache(KVCache):
    """The cache of a layer that runs attention and a state-space mixer side by side on the same tokens (Falcon-H1):
    a KVCache for the attention (offset, mask, keys and values) that also holds the mixer's state slots
    (`cache[0]`, `cache[1]`, `advance`, as a StateCache). Not trimmable: the state cannot be rewound."""

    def __init__(self, slots: int = 2):
        super().__init__()
        self.recurrent = StateCache(slots)

    def __getitem__(self, i: int):
        return self.recurrent[i]

    def __setitem__(self, i: int, value):
        self.recurrent[i] = value

    def advance(self, n: int):
        self.recurrent.advance(n)

    def is_trimmable(self) -> bool:
        return False

    def trim(self, n: int) -> int:
        return self.recurrent.trim(n)

    def to_quantized(self, group_size: int = 64, bits: int = 8):
        raise NotImplementedError("KVStateCache has no quantized variant (it also holds a recurrent state)")

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.recurrent.nbytes()

    @property
    def state(self) -> list:
        return [KVCache.state.fget(self), self.recurrent.state]

    @state.setter
    def state(self, v: list):
        KVCache.state.fset(self, v[0])
        self.recurrent.state = v[1]

    @property
    def meta_state(self) -> tuple:
        return self.recurrent.meta_state

    @meta_state.setter
    def meta_state(self, v):
        self.recurrent.meta_state = v
