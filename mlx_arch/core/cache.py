"""Key/value caches for autoregressive generation with the models in `mlx_arch`.

Keys and values have shape (B, n_kv_heads, L, head_dim). Attention code calls, per layer and per forward pass,
`mask = cache.make_mask(N, window_size)` and then `keys, values = cache.update_and_fetch(k, v)`; the mask
always describes exactly the keys that the following `update_and_fetch` returns.

- `KVCache`: keeps every token, preallocating in chunks of `step` tokens.
- `QuantizedKVCache`: like KVCache, but stores keys/values quantized along head_dim with `mx.quantize`.
- `ChunkedKVCache`: for chunked attention (Llama 4): a query at position p sees key k iff k <= p and both lie in
  the same chunk of `chunk_size` tokens (k // chunk_size == p // chunk_size), so the cache keeps only the tokens of
  the chunk the next token falls in.
- `StateCache`: the fixed-size state of a recurrent layer (no per-token history, not trimmable).
- `CacheList`: the caches of a decoder layer holding several attention blocks (LongCat-Flash), one per block.
- `RotatingKVCache`: keeps at most `max_size` tokens: the first `keep` ("sink") tokens plus the latest
  `max_size - keep` ones. A query at absolute position p therefore sees key k iff
  k <= p and (k < keep or p - k < max_size - keep), further restricted to p - k < window_size when the model
  passes a window. With keep=0 that is the usual sliding window (p - max_size, p].
"""

from typing import Any, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .base import create_causal_mask


def _plain_mask(N: int, offset: int, window_size: Optional[int]):
    """Mask for N queries appended after `offset` keys kept in temporal order with nothing evicted."""
    if window_size is not None and offset + N > window_size:
        # The window hides the oldest keys from at least the last query: only an explicit mask says so.
        return create_causal_mask(N, offset, window_size=window_size)
    if N == 1:
        return None
    # The fused kernel aligns "causal" bottom-right, i.e. query i sees keys [0, offset + i].
    return "causal"


def _round_up(n: int, step: int) -> int:
    return (n + step - 1) // step * step


class _OffsetCache:
    """What KVCache and QuantizedKVCache share: all tokens kept in temporal order, `offset` of them valid."""

    def __init__(self, step: int):
        self.step = step
        self.offset = 0
        self.keys: Any = None
        self.values: Any = None

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        # Dropping tokens only moves `offset`: the next update overwrites the stale slots.
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    def make_mask(self, N: int, window_size: Optional[int] = None):
        return _plain_mask(N, self.offset, window_size)

    @property
    def nbytes(self) -> int:
        """Bytes held by the (preallocated) buffers."""
        if self.keys is None:
            return 0
        return sum(a.nbytes for a in _leaves(self.keys) + _leaves(self.values))

    def _needs_growth(self, n_new: int) -> bool:
        return self.keys is None or self.offset + n_new > _leaves(self.keys)[0].shape[2]

    def _new_capacity(self, n_new: int) -> int:
        return _round_up(self.offset + n_new, self.step)


def _leaves(x) -> List[mx.array]:
    return list(x) if isinstance(x, tuple) else [x]


def _grow(buffer: Optional[mx.array], valid: int, capacity: int, like: mx.array) -> mx.array:
    """`buffer[..., :valid, :]` followed by zeros up to `capacity` tokens, shaped and typed like `like`."""
    B, H, _, D = like.shape
    if buffer is None:
        return mx.zeros((B, H, capacity, D), like.dtype)
    extra = mx.zeros((B, H, capacity - valid, buffer.shape[3]), buffer.dtype)
    return mx.concatenate([buffer[..., :valid, :], extra], axis=2)


class KVCache(_OffsetCache):
    """Keeps every token; the buffers grow by `step` tokens at a time so decoding rarely reallocates."""

    def __init__(self, step: int = 256):
        super().__init__(step)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        N = keys.shape[2]
        if self._needs_growth(N):
            capacity = self._new_capacity(N)
            self.keys = _grow(self.keys, self.offset, capacity, keys)
            self.values = _grow(self.values, self.offset, capacity, values)
        self.keys[..., self.offset : self.offset + N, :] = keys
        self.values[..., self.offset : self.offset + N, :] = values
        self.offset += N
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self) -> Tuple[mx.array, mx.array]:
        if self.keys is None:
            return None, None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, v: Tuple[mx.array, mx.array]):
        self.keys, self.values = v
        self.offset = 0 if self.keys is None else self.keys.shape[2]

    def to_quantized(self, group_size: int = 64, bits: int = 8) -> "QuantizedKVCache":
        quantized = QuantizedKVCache(group_size=group_size, bits=bits, step=self.step)
        if self.keys is not None:
            keys, values = self.state
            quantized.update_and_fetch(keys, values)
        return quantized


class QuantizedKVCache(_OffsetCache):
    """KVCache whose buffers hold `mx.quantize(x, group_size, bits)` triples (weights, scales, biases).

    `update_and_fetch` returns those triples for keys and values, which `base._explicit_attention` consumes.
    head_dim must be divisible by `group_size`.
    """

    def __init__(self, group_size: int = 64, bits: int = 8, step: int = 256):
        super().__init__(step)
        self.group_size = group_size
        self.bits = bits

    def _quantize(self, x: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def _grow_all(self, stored, new, capacity: int):
        stored = stored if stored is not None else (None,) * len(new)
        return tuple(_grow(s, self.offset, capacity, n) for s, n in zip(stored, new))

    def _fetch(self, stored):
        return tuple(a[..., : self.offset, :] for a in stored)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        N = keys.shape[2]
        qk, qv = self._quantize(keys), self._quantize(values)
        if self._needs_growth(N):
            capacity = self._new_capacity(N)
            self.keys = self._grow_all(self.keys, qk, capacity)
            self.values = self._grow_all(self.values, qv, capacity)
        for stored, new in zip(self.keys + self.values, qk + qv):
            stored[..., self.offset : self.offset + N, :] = new
        self.offset += N
        return self._fetch(self.keys), self._fetch(self.values)

    @property
    def state(self):
        if self.keys is None:
            return None, None
        return self._fetch(self.keys), self._fetch(self.values)

    @state.setter
    def state(self, v):
        self.keys, self.values = v
        self.offset = 0 if self.keys is None else self.keys[0].shape[2]


class RotatingKVCache:
    """Bounded cache for sliding-window layers: the first `keep` tokens plus the latest `max_size - keep`.

    Single-token updates write in place into a circular buffer of `max_size` slots (slots [0, keep) are
    never overwritten), so the returned keys are in slot order, not temporal order; `make_mask` accounts for
    that. A multi-token update (prefill, or a chat turn after decoding) returns keys in temporal order: the sink
    tokens, the `max_size - keep - 1` latest old tokens and the new ones, so that every new query has its whole
    window; afterwards the cache keeps only `max_size` of them again. `offset` counts every token ever seen.
    """

    def __init__(self, max_size: int, keep: int = 0, step: int = 256):
        if not 0 <= keep < max_size:
            raise ValueError(f"RotatingKVCache needs 0 <= keep < max_size, got keep={keep}, max_size={max_size}")
        self.max_size = max_size
        self.keep = keep
        self.step = step
        self.offset = 0
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        # Slot the next single token is written to. Slots [0, keep) hold the sinks; once the buffer is full,
        # slot _idx also holds the oldest non-sink token.
        self._idx = 0

    # ----- layout bookkeeping -----

    @property
    def _recent(self) -> int:
        """How many non-sink tokens the cache holds at most."""
        return self.max_size - self.keep

    def _size(self) -> int:
        """Tokens currently stored."""
        return min(self.offset, self.max_size)

    def _is_full(self) -> bool:
        return self.offset >= self.max_size

    def _ring_positions(self, newest_slot: int, newest_pos: int) -> np.ndarray:
        """Absolute positions of all slots of a full buffer whose newest token sits at `newest_slot`."""
        ring = np.arange(self.keep, self.max_size)
        ring_pos = newest_pos - (newest_slot - ring) % self._recent
        return np.concatenate([np.arange(self.keep), ring_pos])

    def _concat_layout(self, N: int) -> Tuple[int, int]:
        """(sinks, start) for a multi-token update: it returns positions [0, sinks) ++ [start, offset + N).

        `start` is chosen so that the first new query (position offset) still sees `max_size - keep` recent
        tokens, itself included.
        """
        sinks = min(self.keep, self.offset)
        start = max(sinks, self.offset - self._recent + 1)
        return sinks, start

    def _fetch_positions(self, N: int) -> np.ndarray:
        """Absolute positions of the keys the next `update_and_fetch` with N tokens returns, in that order."""
        if N == 1 and self._is_full():
            slot = self._idx if self._idx < self.max_size else self.keep
            return self._ring_positions(slot, self.offset)
        if N == 1:
            return np.arange(self.offset + 1)
        sinks, start = self._concat_layout(N)
        return np.concatenate([np.arange(sinks), np.arange(start, self.offset + N)])

    def _visible(self, q, k, window_size: Optional[int]):
        """Whether query position q may attend to key position k (numpy or mlx arrays, broadcasting)."""
        ok = (k <= q) & ((k < self.keep) | (q - k < self._recent))
        if window_size is not None:
            ok = ok & (q - k < window_size)
        return ok

    # ----- mask -----

    def make_mask(self, N: int, window_size: Optional[int] = None):
        """Mask for the N queries about to be added, over the keys the next `update_and_fetch` returns.

        `window_size=None` means the model imposes no window of its own, so only the cache's limit applies
        (the sinks plus the latest max_size - keep tokens).
        """
        positions = self._fetch_positions(N)
        last = self.offset + N - 1
        sees_all = bool(self._visible(last, positions, window_size).all())
        contiguous = positions[-1] - positions[0] + 1 == len(positions)
        # A query sees a key iff the last query does (the conditions only depend on q - k), so if the last one
        # sees everything the plain bottom-right causal pattern is exact.
        if sees_all and N == 1:
            return None
        if sees_all and contiguous:
            return "causal"
        queries = mx.arange(self.offset, self.offset + N)[:, None]
        return self._visible(queries, mx.array(positions)[None], window_size)

    # ----- updates -----

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        if keys.shape[2] == 1:
            return self._update_in_place(keys, values)
        return self._update_concat(keys, values)

    def _update_in_place(self, keys: mx.array, values: mx.array):
        if self._is_full():
            if self._idx >= self.max_size:
                self._idx = self.keep  # wrap around past the sinks
        elif self.keys is None or self.offset >= self.keys.shape[2]:
            capacity = min(self.max_size, _round_up(self.offset + 1, self.step))
            self.keys = _grow(self.keys, self.offset, capacity, keys)
            self.values = _grow(self.values, self.offset, capacity, values)
        self.keys[..., self._idx : self._idx + 1, :] = keys
        self.values[..., self._idx : self._idx + 1, :] = values
        self.offset += 1
        self._idx += 1
        size = self._size()
        return self.keys[..., :size, :], self.values[..., :size, :]

    def _temporal(self, buffer: mx.array) -> mx.array:
        """The stored tokens of `buffer` in temporal order (the sinks first)."""
        if not self._is_full():
            return buffer[..., : self.offset, :]
        oldest = self._idx if self._idx < self.max_size else self.keep
        if oldest == self.keep:
            return buffer
        parts = [buffer[..., : self.keep, :], buffer[..., oldest:, :], buffer[..., self.keep : oldest, :]]
        return mx.concatenate(parts, axis=2)

    def _context(self, buffer: Optional[mx.array], new: mx.array, sinks: int, start: int) -> mx.array:
        """Sinks ++ old tokens from `start` on ++ new tokens: what a multi-token update returns."""
        if buffer is None:
            return new
        old = self._temporal(buffer)
        recent = self.offset - start
        parts = [old[..., :sinks, :], old[..., old.shape[2] - recent :, :], new]
        return mx.concatenate(parts, axis=2)

    def _shrink(self, full: mx.array) -> mx.array:
        """Back to at most max_size tokens in temporal order: the sinks and the latest non-sink tokens."""
        if full.shape[2] <= self.max_size:
            return full
        parts = [full[..., : self.keep, :], full[..., full.shape[2] - self._recent :, :]]
        return mx.concatenate(parts, axis=2)

    def _update_concat(self, keys: mx.array, values: mx.array):
        sinks, start = self._concat_layout(keys.shape[2])
        all_keys = self._context(self.keys, keys, sinks, start)
        all_values = self._context(self.values, values, sinks, start)
        self.keys, self.values = self._shrink(all_keys), self._shrink(all_values)
        self.offset += keys.shape[2]
        # Stored in temporal order now: the next single token goes to the end, or over the oldest non-sink.
        self._idx = self.keys.shape[2] if not self._is_full() else self.keep
        return all_keys, all_values

    # ----- the rest of the cache interface -----

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def is_trimmable(self) -> bool:
        # Once tokens are evicted, removing the latest ones cannot bring the evicted ones back.
        return self.offset <= self.max_size

    def trim(self, n: int) -> int:
        n = max(0, min(self.offset, n))
        if n and not self.is_trimmable():
            raise NotImplementedError(
                f"RotatingKVCache cannot trim after evicting tokens (offset {self.offset} > max_size "
                f"{self.max_size}); check is_trimmable() first"
            )
        self.offset -= n
        # Nothing was evicted, so the buffer is in temporal order and the next token goes right after.
        self._idx = self.offset
        return n

    @property
    def state(self) -> Tuple[mx.array, mx.array]:
        """The stored keys/values (at most max_size tokens) in temporal order; `meta_state` holds the offset."""
        if self.keys is None:
            return None, None
        return self._temporal(self.keys), self._temporal(self.values)

    @state.setter
    def state(self, v: Tuple[mx.array, mx.array]):
        keys, values = v
        if keys is not None and keys.shape[2] > self.max_size:
            raise ValueError(f"RotatingKVCache state holds {keys.shape[2]} tokens, more than max_size")
        self.keys, self.values = keys, values
        # Assume nothing was evicted; set `meta_state` afterwards to restore a larger offset.
        self.offset = 0 if keys is None else keys.shape[2]
        self._idx = self.offset if not self._is_full() else self.keep

    @property
    def meta_state(self) -> Tuple[int, int, int]:
        return self.max_size, self.keep, self.offset

    @meta_state.setter
    def meta_state(self, v: Tuple[int, int, int]):
        self.max_size, self.keep, self.offset = (int(x) for x in v)
        stored = 0 if self.keys is None else self.keys.shape[2]
        if stored != self._size():
            raise ValueError(f"meta_state offset {self.offset} does not match the {stored} stored tokens")
        # `state` stores temporal order, so the oldest non-sink token is at slot keep when full.
        self._idx = self.offset if not self._is_full() else self.keep

    def to_quantized(self, group_size: int = 64, bits: int = 8):
        raise NotImplementedError("RotatingKVCache has no quantized variant; use KVCache.to_quantized instead")


def chunked_mask(queries, keys, chunk_size: int):
    """Whether each query position sees each key position under chunked attention (mx arrays, broadcasting)."""
    return (keys <= queries) & (keys // chunk_size == queries // chunk_size)


class ChunkedKVCache(_OffsetCache):
    """Cache of a chunked-attention layer: the keys and values from `start`, the first position of the chunk that
    the next token falls in, up to `offset`. An update returns the keys from the chunk start of its first query on
    (so a multi-token update may cross chunk boundaries); afterwards the tokens of finished chunks are dropped."""

    def __init__(self, chunk_size: int, step: int = 256):
        if chunk_size < 1:
            raise ValueError(f"ChunkedKVCache needs a chunk size of at least 1, got {chunk_size}")
        super().__init__(step)
        self.chunk_size = chunk_size
        self.start = 0  # absolute position of the first stored token

    def _stored(self) -> int:
        return self.offset - self.start

    def make_mask(self, N: int, window_size: Optional[int] = None):
        """Mask for the N queries about to be added over the keys [start, offset + N) the update returns."""
        if window_size is not None and window_size != self.chunk_size:
            raise ValueError(f"a chunked cache of {self.chunk_size}-token chunks was asked for window {window_size}")
        if (self.offset + N - 1) // self.chunk_size == self.start // self.chunk_size:  # one chunk: plain causal
            return None if N == 1 else "causal"
        queries = mx.arange(self.offset, self.offset + N)[:, None]
        return chunked_mask(queries, mx.arange(self.start, self.offset + N)[None], self.chunk_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        N, stored = keys.shape[2], self._stored()
        if self._needs_growth(N):
            capacity = self._new_capacity(N)
            self.keys = _grow(self.keys, stored, capacity, keys)
            self.values = _grow(self.values, stored, capacity, values)
        self.keys[..., stored : stored + N, :] = keys
        self.values[..., stored : stored + N, :] = values
        fetched = self.keys[..., : stored + N, :], self.values[..., : stored + N, :]
        self.offset += N
        finished = self.offset // self.chunk_size * self.chunk_size - self.start
        if finished > 0:  # the next token starts a new chunk: nothing before it is seen again
            self.keys, self.values = self.keys[..., finished:, :], self.values[..., finished:, :]
            self.start += finished
        return fetched

    def _needs_growth(self, n_new: int) -> bool:
        return self.keys is None or self._stored() + n_new > self.keys.shape[2]

    def _new_capacity(self, n_new: int) -> int:
        return _round_up(self._stored() + n_new, self.step)

    def trim(self, n: int) -> int:
        """Drop the last n tokens; only those of the current chunk can go (the earlier chunks are gone)."""
        n = max(0, min(self.offset, n))
        if n > self._stored():
            raise NotImplementedError(f"ChunkedKVCache keeps only the current chunk ({self._stored()} tokens) and "
                                      f"cannot trim {n}; rebuild the cache and prefill the shorter prompt")
        self.offset -= n
        return n

    @property
    def state(self) -> Tuple[mx.array, mx.array]:
        if self.keys is None:
            return None, None
        stored = self._stored()
        return self.keys[..., :stored, :], self.values[..., :stored, :]

    @state.setter
    def state(self, v: Tuple[mx.array, mx.array]):
        self.keys, self.values = v
        self.start, self.offset = 0, 0 if self.keys is None else self.keys.shape[2]

    @property
    def meta_state(self) -> Tuple[int, int, int]:
        return self.chunk_size, self.start, self.offset

    @meta_state.setter
    def meta_state(self, v: Tuple[int, int, int]):
        self.chunk_size, self.start, self.offset = (int(x) for x in v)

    def to_quantized(self, group_size: int = 64, bits: int = 8):
        raise NotImplementedError("ChunkedKVCache has no quantized variant")


class StateCache:
    """The state of a recurrent layer (state-space, short convolution, linear attention, delta rule): a fixed number
    of slots (e.g. the last convolution inputs and the recurrent state), each replaced as tokens arrive. It keeps no
    per-token history, so it has no token offset (positions come from the attention caches of a hybrid model, or
    from an explicit offset) and cannot be rewound."""

    def __init__(self, slots: int = 2):
        self.slots: List[Optional[mx.array]] = [None] * slots
        self.seen = 0  # tokens folded into the state so far

    def __getitem__(self, i: int) -> Optional[mx.array]:
        return self.slots[i]

    def __setitem__(self, i: int, value: Optional[mx.array]):
        self.slots[i] = value

    def advance(self, n: int):
        self.seen += n

    def empty(self) -> bool:
        return all(s is None for s in self.slots)

    def make_mask(self, N: int, window_size: Optional[int] = None):
        return None  # a recurrent layer is causal by construction

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots if s is not None)

    def is_trimmable(self) -> bool:
        return False

    def trim(self, n: int) -> int:
        raise ValueError("a recurrent layer's state cannot be rewound by tokens; rebuild the cache and prefill the "
                         "shorter prompt again")

    @property
    def state(self) -> list:
        return list(self.slots)

    @state.setter
    def state(self, v: list):
        self.slots = list(v)

    @property
    def meta_state(self) -> Tuple[int]:
        return (self.seen,)

    @meta_state.setter
    def meta_state(self, v):
        self.seen = int(v[0])


class CacheList:
    """One decoder layer's caches when the layer holds several attention blocks (LongCat-Flash has two), indexed
    like the blocks. They see the same tokens, so the layer's token offset and mask are its first cache's."""

    def __init__(self, *caches):
        self.caches = list(caches)

    def __getitem__(self, i: int):
        return self.caches[i]

    def __len__(self) -> int:
        return len(self.caches)

    @property
    def offset(self) -> int:
        return self.caches[0].offset

    def make_mask(self, N: int, window_size: Optional[int] = None):
        return self.caches[0].make_mask(N, window_size=window_size)

    def empty(self) -> bool:
        return self.caches[0].empty()

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def is_trimmable(self) -> bool:
        return all(c.is_trimmable() for c in self.caches)

    def trim(self, n: int) -> int:
        return [c.trim(n) for c in self.caches][0]

    @property
    def state(self) -> list:
        return [c.state for c in self.caches]

    @state.setter
    def state(self, v: list):
        for c, s in zip(self.caches, v):
            c.state = s


def make_prompt_cache(model: Any, max_kv_size: Optional[int] = None) -> list:
    """One cache per layer: the model's own `make_cache()` if it has one, else KVCache (or RotatingKVCache)."""
    if hasattr(model, "make_cache"):
        return model.make_cache()
    if max_kv_size is not None:
        # Keep a few leading tokens: dropping the very first ones hurts generation far more than later ones.
        return [RotatingKVCache(max_kv_size, keep=4) for _ in model.layers]
    return [KVCache() for _ in model.layers]


def can_trim_prompt_cache(cache: list) -> bool:
    return all(c.is_trimmable() for c in cache)


def trim_prompt_cache(cache: list, n: int) -> int:
    """Remove the last n tokens from every layer's cache; returns how many were removed (0 if impossible)."""
    if not cache or not can_trim_prompt_cache(cache):
        return 0
    return [c.trim(n) for c in cache][0]
