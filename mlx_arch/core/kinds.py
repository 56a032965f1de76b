"""Layer kinds: what a decoder layer attends over, declared once per layer from the config's `layer_types`.

The kind decides the layer's cache and its mask; nothing else in the model guesses them from attributes. A kind is
hashable, so layers of the same kind share one mask.

- full:      attends over every earlier token; KVCache.
- sliding:   attends over the last `window` tokens; RotatingKVCache(window).
- chunked:   attends within fixed chunks of `window` tokens (Llama 4); ChunkedKVCache(window).
- recurrent: keeps a state instead of keys and values (state-space, convolution, linear attention); the layer
             makes its own cache and takes no mask.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from .base import create_attention_mask
from .cache import ChunkedKVCache, KVCache, RotatingKVCache, chunked_mask

ATTENTION_KINDS = ("full", "sliding", "chunked", "recurrent")

# transformers' `layer_types` entries -> our kind names.
_LAYER_TYPES = {
    "full_attention": "full",
    "attention": "full",
    "global": "full",
    "sliding_attention": "sliding",
    "local": "sliding",
    "chunked_attention": "chunked",
    "indexed_attention": "full",  # DeepSeek-V3.2 / GLM-MoE-DSA: full attention whose indexer picks top-k keys
    "linear_attention": "recurrent",
    "mamba": "recurrent",
    "conv": "recurrent",
    "recurrent": "recurrent",
}


@dataclass(frozen=True)
class LayerKind:
    name: str = "full"
    window: Optional[int] = None  # the sliding window or the chunk size

    def __post_init__(self):
        if self.name not in ATTENTION_KINDS:
            raise ValueError(f"unknown layer kind {self.name!r}; known: {', '.join(ATTENTION_KINDS)}")
        if self.name in ("sliding", "chunked") and not self.window:
            raise ValueError(f"a {self.name} layer needs a window size")

    @property
    def attends(self) -> bool:
        return self.name != "recurrent"

    def make_cache(self):
        if self.name == "full":
            return KVCache()
        if self.name == "sliding":
            return RotatingKVCache(self.window)
        if self.name == "chunked":
            return ChunkedKVCache(self.window)
        raise NotImplementedError(f"{self.name} layers make their own cache")

    def mask(self, h, cache=None):
        """The attention mask of hidden states h (B, L, D) arriving at a layer of this kind with `cache`."""
        if not self.attends:
            return None
        if self.name == "chunked":
            return self._chunked_mask(h.shape[1], cache)
        return create_attention_mask(h, cache, window_size=self.window)

    def _chunked_mask(self, N: int, cache=None):
        if cache is not None:
            return cache.make_mask(N)
        if N <= self.window:  # one chunk
            return None if N == 1 else "causal"
        positions = mx.arange(N)
        return chunked_mask(positions[:, None], positions[None], self.window)


FULL = LayerKind()


def sliding(window: Optional[int]) -> LayerKind:
    """A sliding kind, or full attention when there is no window."""
    return LayerKind("sliding", window) if window else FULL


def layer_kinds(layer_types, n_layers: int, window: Optional[int] = None, chunk: Optional[int] = None) -> list:
    """One kind per layer from transformers' `layer_types`; without them every layer is full, or sliding when a
    window is given (mistral, starcoder2, phi3)."""
    if not layer_types:
        return [sliding(window)] * n_layers
    if len(layer_types) < n_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {n_layers} layers")
    kinds = []
    for t in layer_types[:n_layers]:
        if t not in _LAYER_TYPES:
            raise ValueError(f"unknown layer type {t!r} in layer_types; known: {', '.join(sorted(_LAYER_TYPES))}")
        name = _LAYER_TYPES[t]
        if name == "sliding":
            kinds.append(sliding(window))
        elif name == "chunked":
            kinds.append(LayerKind("chunked", chunk))
        else:
            kinds.append(LayerKind(name))
    return kinds


def cache_offset(cache) -> int:
    """The position of the next token: the offset of any cache that counts tokens (recurrent caches do not)."""
    for c in cache or ():
        if c is not None and hasattr(c, "offset"):
            return c.offset
    return 0


class KindedLayer:
    """Mixin for decoder layers: `kind` says what the layer attends over and makes its cache. `window` reads (and,
    for tests that switch a window off, sets) the kind's window."""

    kind: LayerKind = FULL

    @property
    def window(self) -> Optional[int]:
        return self.kind.window

    @window.setter
    def window(self, value: Optional[int]):
        self.kind = sliding(value)

    def make_cache(self):
        return self.kind.make_cache()
