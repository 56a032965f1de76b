"""Named weight-layout operations that architectures declare as data in `weight_rules()`.

Each operation maps a flat {name: array} dict to a new one and is idempotent: running `sanitize` on weights that
were already sanitized (mlx-lm does this on every load) changes nothing.
"""

import re
from typing import Callable, Dict, Iterable

import mlx.core as mx

Weights = Dict[str, mx.array]
Rule = Callable[[Weights], Weights]


def apply_rules(weights: Weights, rules: Iterable[Rule]) -> Weights:
    for rule in rules:
        weights = rule(weights)
    return weights


def drop(*patterns: str) -> Rule:
    """Drop keys matching any regex (buffers such as rotary inv_freq or causal-mask biases)."""
    regex = re.compile("|".join(f"(?:{p})" for p in patterns))
    return lambda w: {k: v for k, v in w.items() if not regex.search(k)}


def tie_head(head: str = "lm_head.") -> Rule:
    """Drop the output head of a tied-embedding model: the embedding serves as the head."""
    return lambda w: {k: v for k, v in w.items() if not k.startswith(head)}


def rename(pattern: str, replacement: str) -> Rule:
    """Rename keys by regex substitution (anchor the pattern so a second run does not match again)."""
    regex = re.compile(pattern)
    return lambda w: {regex.sub(replacement, k): v for k, v in w.items()}


def transpose(pattern: str, expected_shapes: Callable[[str], tuple]) -> Rule:
    """Transpose 2-D weights matching `pattern` (Conv1D stores (in, out)) unless already in module layout."""
    regex = re.compile(pattern)

    def rule(w):
        out = {}
        for k, v in w.items():
            if regex.search(k) and v.ndim == 2 and tuple(v.shape) != tuple(expected_shapes(k)):
                v = v.T
            out[k] = v
        return out

    return rule


def split(pattern: str, targets: list, sizes: Callable[[str], list], axis: int = 0) -> Rule:
    """Split a fused tensor (e.g. `qkv_proj.weight`) into named parts along `axis`.

    `targets` are replacement strings for `pattern` (one per part); `sizes(key)` gives each part's size.
    """
    regex = re.compile(pattern)

    def rule(w):
        out = {}
        for k, v in w.items():
            if not regex.search(k):
                out[k] = v
                continue
            parts = sizes(k)
            bounds = [sum(parts[:i]) for i in range(1, len(parts))]
            for target, piece in zip(targets, mx.split(v, bounds, axis=axis)):
                out[regex.sub(target, k)] = piece
        return out

    return rule



def rename_with(pattern: str, replacement: str, fn: Callable[[mx.array], mx.array]) -> Rule:
    """Rename keys matching `pattern` and transform their values on the way (e.g. transpose Conv1D (in, out) weights
    while moving them to module names). Anchor the pattern so renamed keys no longer match: a second run changes
    nothing, even for square matrices whose shape cannot tell the two layouts apart."""
    regex = re.compile(pattern)

    def rule(w):
        return {regex.sub(replacement, k): (fn(v) if regex.search(k) else v) for k, v in w.items()}

    return rule
