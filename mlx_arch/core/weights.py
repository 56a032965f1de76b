"""Weight-layout operations, declared as data by each family in `weight_rules()`.

Each operation is a small object with `apply(weights)` (checkpoint layout -> our module tree) and `inverse()` (the
operation that undoes it), so that `inverse(rules)` maps converted weights back to the checkpoint's names and
layouts: the gate loads the weights an output actually holds into the transformers reference this way.

Keys are matched by templates, never by free regexes: literal text plus placeholders
  `{i}`, `{e}`  a decimal index (layer, expert), the same value on both sides of an operation;
  `{*}`         any dotted prefix, possibly empty (drops only).
Every `apply` is idempotent: running `sanitize` on weights that were already sanitized (every load of a converted
folder does) changes nothing, because an operation only matches keys in the layout it converts from.

Operations:
  Rename      literal prefixes, one longest-match pass, checked one-to-one when built.
  Alias       other spellings of a checkpoint prefix (old exports) -> the canonical one; the inverse writes the
              canonical spelling.
  Transpose   declared keys, never guessed from shapes (a square matrix is ambiguous).
  Split / Concat, Stack / Unstack   fused tensors and per-expert tensors, with sizes from the config.
  Drop        declared lossy: buffers and tied heads; `inverse` cannot bring them back, `dropped(key)` says so.
  Move        one key renamed by template, where the name changes mid-key (`{i}` / `{e}` carried over).
"""

import re
from typing import Dict, Iterable, List, Optional, Sequence

import mlx.core as mx

Weights = Dict[str, mx.array]

_PLACEHOLDER = re.compile(r"\{(i|e|\*)\}")


def template(pattern: str) -> re.Pattern:
    """The anchored regex of a key template."""
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        parts.append(re.escape(pattern[pos : m.start()]))
        name = m.group(1)
        parts.append(r"(?:.+\.)?" if name == "*" else rf"(?P<{name}>\d+)")
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("^" + "".join(parts) + "$")


def fill(pattern: str, **values) -> str:
    for name, value in values.items():
        pattern = pattern.replace("{" + name + "}", str(value))
    return pattern


class Op:
    """One weight-layout operation."""

    lossy = False

    def apply(self, w: Weights) -> Weights:
        raise NotImplementedError

    def inverse(self) -> "Op":
        raise NotImplementedError

    def dropped(self, key: str) -> bool:
        """Whether `apply` discards this checkpoint key (declared lossy operations only)."""
        return False


def apply_rules(weights: Weights, rules: Iterable[Op]) -> Weights:
    for rule in rules:
        weights = rule.apply(weights)
    return weights


def inverse(rules: Sequence[Op]) -> List[Op]:
    """The operations that undo `rules`: the reversed list of their inverses."""
    return [rule.inverse() for rule in reversed(list(rules))]


def dropped(rules: Sequence[Op], key: str) -> bool:
    """Whether the rules discard this checkpoint key (so that no inverse can give it back)."""
    return any(rule.dropped(key) for rule in rules)


class Identity(Op):
    def apply(self, w):
        return w

    def inverse(self):
        return self


class Rename(Op):
    """Rename keys by literal prefixes, longest match first, in one pass.

    Built only if one-to-one: two prefixes may not produce the same key, and no produced key may match a prefix
    again (so a second run changes nothing). Two spellings of one input go through `Alias`, never here.
    """

    def __init__(self, table: Dict[str, str]):
        self.table = dict(table)
        _check_one_to_one(self.table)
        _check_one_to_one({v: k for k, v in self.table.items()})
        for target in self.table.values():
            for source in self.table:
                if target.startswith(source):
                    raise ValueError(f"rename target {target!r} starts with source prefix {source!r}: a second run "
                                     "would rename it again")
        self._order = sorted(self.table, key=len, reverse=True)

    def rename(self, key: str) -> str:
        for prefix in self._order:
            if key.startswith(prefix):
                return self.table[prefix] + key[len(prefix) :]
        return key

    def apply(self, w):
        out = {}
        for k, v in w.items():
            new = self.rename(k)
            if new in out:
                raise ValueError(f"two checkpoint keys map to {new!r}")
            out[new] = v
        return out

    def inverse(self):
        return Rename({v: k for k, v in self.table.items()})


def _check_one_to_one(table: Dict[str, str]):
    """Two nested prefixes s1 < s2 = s1 + r must map to t2 = t1 + r, or a key s1 + r + x would not come back."""
    if len(set(table.values())) != len(table):
        raise ValueError(f"rename table maps two prefixes to one: {table}")
    for s1, t1 in table.items():
        for s2, t2 in table.items():
            if s1 != s2 and t2.startswith(t1) and s1 + t2[len(t1) :] not in table:
                raise ValueError(f"rename table is not one-to-one: {s1!r}->{t1!r} and {s2!r}->{t2!r} can give "
                                 f"the same key; list {s1 + t2[len(t1):]!r} explicitly")


class Alias(Op):
    """Other spellings of checkpoint prefixes (e.g. GPT-2's bare `h.` of the original exports) -> the canonical
    spelling that later rules expect. The inverse keeps the canonical spelling."""

    def __init__(self, table: Dict[str, str]):
        self.rename = Rename(table)

    def apply(self, w):
        return self.rename.apply(w)

    def inverse(self):
        return Identity()


class Transpose(Op):
    """Swap the last two axes of the declared keys (Conv1D stores (in, out); Linear wants (out, in)).

    Declare the keys in a layout that a later operation renames away, so a second run does not match again."""

    def __init__(self, *patterns: str):
        self.patterns = patterns
        self.regexes = [template(p) for p in patterns]

    def apply(self, w):
        return {k: (v.swapaxes(-1, -2) if any(r.match(k) for r in self.regexes) else v) for k, v in w.items()}

    def inverse(self):
        return self


class Drop(Op):
    """Discard keys (rotary tables, causal-mask buffers, a head tied to the embeddings). Lossy by declaration."""

    lossy = True

    def __init__(self, *patterns: str, why: str = ""):
        self.patterns, self.why = patterns, why
        self.regexes = [template(p) for p in patterns]

    def dropped(self, key):
        return any(r.match(key) for r in self.regexes)

    def apply(self, w):
        return {k: v for k, v in w.items() if not self.dropped(k)}

    def inverse(self):
        return Identity()


def _groups(w: Weights, regex: re.Pattern, exclude: str = None) -> Dict[tuple, Dict[str, str]]:
    """Matching keys grouped by their placeholder values except `exclude`: {other values: {excluded value: key}}."""
    groups: Dict[tuple, Dict[str, str]] = {}
    for k in w:
        m = regex.match(k)
        if m:
            values = m.groupdict()
            inner = values.pop(exclude, None) if exclude else None
            groups.setdefault(tuple(sorted(values.items())), {})[inner] = k
    return groups


class _Expand(Op):
    """One matching key becomes several: subclasses give `pieces(key, value, placeholders)`."""

    regex: re.Pattern

    def pieces(self, key, value, values: dict) -> list:
        raise NotImplementedError

    def apply(self, w):
        out = {}
        for k, v in w.items():
            m = self.regex.match(k)
            if not m:
                out[k] = v
                continue
            out.update(self.pieces(k, v, m.groupdict()))
        return out


class Split(_Expand):
    """Split a fused tensor into parts along `axis` (`qkv_proj` -> q/k/v, `gate_up_proj` -> gate/up).

    `sizes` are the parts' sizes along the axis, in `targets` order; with `interleave`, the fused axis holds
    `interleave`-wide slices of each part in turn (per-row alternation, as some families store gate/up)."""

    def __init__(self, source: str, targets: Sequence[str], sizes: Sequence[int], axis: int = 0,
                 interleave: Optional[int] = None):
        if len(targets) != len(sizes):
            raise ValueError("Split needs one size per target")
        self.source, self.targets, self.sizes, self.axis, self.interleave = source, list(targets), list(sizes), axis, interleave
        self.regex = template(source)

    def pieces(self, k, v, values):
        if v.shape[self.axis] != sum(self.sizes):
            raise ValueError(f"{k}: axis {self.axis} has {v.shape[self.axis]} entries, expected {sum(self.sizes)}")
        parts = _split(v, self.sizes, self.axis, self.interleave)
        return [(fill(target, **values), part) for target, part in zip(self.targets, parts)]

    def inverse(self):
        return Concat(self.targets, self.source, self.axis, self.interleave, sizes=self.sizes)


def _split(v, sizes, axis, interleave):
    if interleave is None:
        bounds = [sum(sizes[:i]) for i in range(1, len(sizes))]
        return mx.split(v, bounds, axis=axis)
    # Slices of `interleave` entries of each part in turn: view the axis as (blocks, parts, interleave).
    if len(set(sizes)) != 1 or sizes[0] % interleave:
        raise ValueError("an interleaved split needs equal parts, each a multiple of the interleave width")
    axis, shape = axis % v.ndim, list(v.shape)
    blocks = v.reshape(shape[:axis] + [sizes[0] // interleave, len(sizes), interleave] + shape[axis + 1 :])
    return [mx.take(blocks, i, axis=axis + 1).reshape(shape[:axis] + [sizes[0]] + shape[axis + 1 :])
            for i in range(len(sizes))]


class Concat(Op):
    """Concatenate parts into one fused tensor along `axis` (the inverse of Split). All parts or none must be
    present."""

    def __init__(self, sources: Sequence[str], target: str, axis: int = 0, interleave: Optional[int] = None,
                 sizes: Optional[Sequence[int]] = None):
        self.sources, self.target, self.axis, self.interleave, self.sizes = list(sources), target, axis, interleave, sizes
        self.regexes = [template(s) for s in self.sources]

    def apply(self, w):
        found: Dict[tuple, Dict[int, str]] = {}
        for k in w:
            for j, r in enumerate(self.regexes):
                m = r.match(k)
                if m:
                    found.setdefault(tuple(sorted(m.groupdict().items())), {})[j] = k
        out = {k: v for k, v in w.items() if not any(r.match(k) for r in self.regexes)}
        for values, parts in found.items():
            if len(parts) != len(self.sources):
                missing = [fill(self.sources[j], **dict(values)) for j in range(len(self.sources)) if j not in parts]
                raise ValueError(f"cannot build {fill(self.target, **dict(values))}: missing {', '.join(missing)}")
            tensors = [w[parts[j]] for j in range(len(self.sources))]
            out[fill(self.target, **dict(values))] = _concat(tensors, self.axis, self.interleave)
        return out

    def inverse(self):
        sizes = self.sizes
        if sizes is None:
            raise ValueError("Concat needs the part sizes to be inverted")
        return Split(self.target, self.sources, sizes, self.axis, self.interleave)


def _concat(tensors, axis, interleave):
    if interleave is None:
        return mx.concatenate(tensors, axis=axis)
    axis, shape = axis % tensors[0].ndim, list(tensors[0].shape)
    blocked = [t.reshape(shape[:axis] + [shape[axis] // interleave, 1, interleave] + shape[axis + 1 :])
               for t in tensors]
    joined = mx.concatenate(blocked, axis=axis + 1)
    return joined.reshape(shape[:axis] + [shape[axis] * len(tensors)] + shape[axis + 1 :])


class Stack(Op):
    """Stack per-expert tensors (`experts.{e}.w1.weight`) into one (n, ...) tensor under `target`.

    `count` is the number of experts from the config; all of them or none must be present."""

    def __init__(self, source: str, target: str, count: int):
        if "{e}" not in source:
            raise ValueError("Stack needs an {e} placeholder in its source")
        self.source, self.target, self.count = source, target, count
        self.regex = template(source)

    def apply(self, w):
        groups = _groups(w, self.regex, exclude="e")
        out = {k: v for k, v in w.items() if not self.regex.match(k)}
        for values, experts in groups.items():
            values = dict(values)
            want = {str(e) for e in range(self.count)}
            if set(experts) != want:
                missing = sorted(want - set(experts), key=int)[:3]
                raise ValueError(f"cannot stack {fill(self.target, **values)}: expected {self.count} experts, "
                                 f"missing {', '.join(fill(self.source, e=e, **values) for e in missing)}")
            out[fill(self.target, **values)] = mx.stack([w[experts[str(e)]] for e in range(self.count)])
        return out

    def inverse(self):
        return Unstack(self.target, self.source, self.count)


class Unstack(_Expand):
    """Split a stacked (n, ...) tensor back into per-expert tensors (the inverse of Stack)."""

    def __init__(self, source: str, target: str, count: int):
        self.source, self.target, self.count = source, target, count
        self.regex = template(source)

    def pieces(self, k, v, values):
        if v.shape[0] != self.count:
            raise ValueError(f"{k}: {v.shape[0]} experts stacked, expected {self.count}")
        return [(fill(self.target, e=e, **values), v[e]) for e in range(self.count)]

    def inverse(self):
        return Stack(self.target, self.source, self.count)


class Move(Op):
    """Rename single keys by template (`layers.{i}.moe.output_linear.weight` -> `layers.{i}.moe.switch_mlp.down_proj
    .weight`): for names that change in the middle of a key, where `Rename`'s literal prefixes cannot reach. The
    placeholders carry over; a target that matches the source template again is refused (a second run would move
    it again)."""

    def __init__(self, source: str, target: str):
        self.source, self.target = source, target
        self.regex = template(source)
        if self.regex.match(target.replace("{i}", "0").replace("{e}", "0")):
            raise ValueError(f"move target {target!r} matches its source {source!r}: a second run would move it again")

    def apply(self, w):
        out = {}
        for k, v in w.items():
            m = self.regex.match(k)
            new = fill(self.target, **m.groupdict()) if m else k
            if new in out:
                raise ValueError(f"two checkpoint keys map to {new!r}")
            out[new] = v
        return out

    def inverse(self):
        return Move(self.target, self.source)
