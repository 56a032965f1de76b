"""Mixture-of-experts blocks: routers, gathered ("switch") expert layers, the sparse block with optional shared
experts, which layers are sparse, the weight rules that stack per-expert tensors, and the routers' precision.

Experts are stacked: one `SwitchLinear` holds every expert's weight as (n_experts, out, in) and computes only the
experts each token was routed to (`mx.gather_mm`; `mx.gather_qmm` once quantized). Where mlx-lm reads one module per
expert (dbrx), `listed_experts` runs each on the tokens routed to it. Module names are mlx-lm's
(`gate`, `switch_mlp.{gate,up,down}_proj`, `shared_expert`, `shared_expert_gate`) so that mlx-lm reads our output.

Routers map router logits (..., n_experts) to (indices, weights), both (..., k), in float32 whatever the
activations' dtype (transformers routes in float32 too):
  softmax_topk   softmax over all experts, keep the k largest, optionally renormalise them (mixtral always,
                 qwen2_moe / qwen3_moe / olmoe per `norm_topk_prob`);
  topk_softmax   keep the k largest logits, softmax over those (granitemoe);
  topk_sigmoid   keep the k largest logits, each weighted by its sigmoid (Llama 4);
  sigmoid_topk   sigmoid scores, chosen by score + correction bias within the best groups, weighted by the scores
                 themselves, optionally renormalised, times a routed scaling factor (DeepSeek-V3 style; dots1,
                 minimax_m2);
  softmax_topk_pnorm      softmax_topk divided by the weights' p-norm, or not at all (dbrx);
  softmax_topk_corrected  softmax probabilities, chosen by probability + correction bias, weighted by the
                 probabilities renormalised (ERNIE 4.5), or not renormalised, times a routed scaling factor
                 (LongCat-Flash);
  softmax_group_topk      softmax, the top k within the groups holding the most probable experts, times a routed
                 scaling factor, not renormalised (DeepSeek-V2).

A router's correction bias (`e_score_correction_bias`) is checkpoint data that only chooses experts: the sparse block
keeps it where the checkpoint does (`correction_bias`), and the cast leaves it in its stored dtype, as transformers
keeps it in float32 (a bfloat16 bias moves near-tied choices).

Routers and shared-expert gates stay in full precision when a model is quantized (`RoutedModel.quant_predicate`):
they are a few thousandths of a layer's weights, and their error does not average out like a projection's: it moves
a near-tied token to another expert (or rescales a whole shared MLP), i.e. it changes what is computed rather than
adding noise to it. mlx-lm's own conversions quantize them at 8 bits (qwen3_moe, granitemoe) or at the model's bits
(mixtral, qwen2_moe, olmoe, phimoe); a float router costs nothing measurable, and mlx-lm loads it as float (it
quantizes only layers saved with `scales`).
"""

from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import quant
from .layers import activation
from .weights import Stack

# --- routers ------------------------------------------------------------------------------------------------------


def _top_k(scores: mx.array, k: int) -> mx.array:
    """Indices of the k largest scores along the last axis (in no particular order); constants for gradients (the
    routing weights gathered with them stay differentiable)."""
    return mx.stop_gradient(mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k])


def softmax_topk(logits: mx.array, k: int, normalize: bool = False):
    """Softmax over every expert, then the k most probable; `normalize` makes their weights sum to one."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    indices = _top_k(probs, k)
    weights = mx.take_along_axis(probs, indices, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return indices, weights


def softmax_topk_pnorm(logits: mx.array, k: int, p: Optional[float] = 1.0):
    """Softmax over every expert, the k most probable, divided by their p-norm when `p` is set (p = 1 renormalises
    like `softmax_topk(normalize=True)`; None keeps the probabilities)."""
    indices, weights = softmax_topk(logits, k)
    if p is not None:
        weights = weights / mx.power(mx.power(weights, p).sum(axis=-1, keepdims=True), 1.0 / p)
    return indices, weights


def softmax_topk_corrected(logits: mx.array, k: int, correction_bias: mx.array, norm_min: float = 1e-12,
                           normalize: bool = True, scaling: float = 1.0):
    """Softmax over every expert; the k chosen by probability + `correction_bias`, weighted by their plain
    probabilities divided by their sum (floored at `norm_min`) when `normalize`, times `scaling`."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    indices = _top_k(probs + correction_bias.astype(mx.float32), k)
    weights = mx.take_along_axis(probs, indices, axis=-1)
    if normalize:
        weights = weights / mx.maximum(weights.sum(axis=-1, keepdims=True), norm_min)
    return indices, weights * scaling


def topk_softmax(logits: mx.array, k: int):
    """The k largest logits, then a softmax over those k only."""
    logits = logits.astype(mx.float32)
    indices = _top_k(logits, k)
    return indices, mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1)


def topk_sigmoid(logits: mx.array, k: int):
    """The k largest logits, each weighted by its own sigmoid."""
    logits = logits.astype(mx.float32)
    indices = _top_k(logits, k)
    return indices, mx.sigmoid(mx.take_along_axis(logits, indices, axis=-1))


def sigmoid_topk(logits: mx.array, k: int, correction_bias: Optional[mx.array] = None, scaling: float = 1.0,
                 normalize: bool = True, n_group: int = 1, topk_group: int = 1):
    """DeepSeek-V3 routing. Experts are chosen by sigmoid(logits) + correction_bias, only among the `topk_group`
    groups (of `n_group` equal groups) whose two best choice scores sum highest; their weights are the plain sigmoid
    scores, renormalised when `normalize`, times `scaling`."""
    scores = mx.sigmoid(logits.astype(mx.float32))
    choice = scores if correction_bias is None else scores + correction_bias.astype(mx.float32)
    if n_group > 1:
        grouped = choice.reshape(*choice.shape[:-1], n_group, -1)
        best_two = mx.topk(grouped, 2, axis=-1).sum(axis=-1)  # (..., n_group)
        kept = mx.put_along_axis(mx.zeros(best_two.shape, mx.bool_), _top_k(best_two, topk_group),
                                 mx.array(True), axis=-1)
        choice = mx.where(kept[..., None], grouped, -mx.inf).reshape(choice.shape)
    indices = _top_k(choice, k)
    weights = mx.take_along_axis(scores, indices, axis=-1)
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return indices, weights * scaling


def softmax_group_topk(logits: mx.array, k: int, scaling: float = 1.0, n_group: int = 1, topk_group: int = 1):
    """DeepSeek-V2 routing (`greedy`, or `group_limited_greedy` when n_group > 1): softmax over every expert, the k
    most probable among the `topk_group` groups (of `n_group` equal groups) whose best expert is most probable;
    weights are those probabilities times `scaling`, never renormalised."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    choice = probs
    if n_group > 1:
        grouped = probs.reshape(*probs.shape[:-1], n_group, -1)
        kept = mx.put_along_axis(mx.zeros(grouped.shape[:-1], mx.bool_), _top_k(grouped.max(axis=-1), topk_group),
                                 mx.array(True), axis=-1)
        choice = mx.where(kept[..., None], grouped, 0.0).reshape(probs.shape)
    indices = _top_k(choice, k)
    return indices, mx.take_along_axis(probs, indices, axis=-1) * scaling


# --- gathered expert layers ---------------------------------------------------------------------------------------


def _expert_bias(layer, y, indices):
    """y plus each chosen expert's bias (bias (n_experts, out) -> (..., 1, out) per index)."""
    return y + mx.expand_dims(layer.bias[indices], -2) if "bias" in layer else y


class SwitchLinear(nn.Module):
    """`n_experts` linear layers in one: weight (n_experts, out, in), optional bias (n_experts, out).

    Called with x (..., M, in) and integer `indices` broadcastable with x's batch axes (...), returns
    (..., M, out): each batch entry multiplied by the expert its index names. `sorted_indices` tells the kernel
    that equal indices are adjacent (faster for many tokens)."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))  # lazy: replaced by the loaded weights
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    def __call__(self, x, indices, sorted_indices: bool = False):
        w = self.weight.swapaxes(-1, -2)
        if x.dtype != mx.float32 and mx.default_device().type == mx.cpu:
            # MLX's CPU kernel of gather_mm takes float32 only (0.32): compute there in float32.
            y = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32), rhs_indices=indices,
                             sorted_indices=sorted_indices).astype(x.dtype)
        else:
            y = mx.gather_mm(x, w, rhs_indices=indices, sorted_indices=sorted_indices)
        return _expert_bias(self, y, indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> "QuantizedSwitchLinear":
        """What `nn.quantize` calls: the quantized twin holding this layer's experts."""
        num_experts, output_dims, input_dims = self.weight.shape
        q = QuantizedSwitchLinear(input_dims, output_dims, num_experts, "bias" in self, group_size, bits, mode)
        q.quantize_weight(self.weight)  # the placeholder's quantization stays an unevaluated graph, dropped here
        if "bias" in self:
            q.bias = self.bias
        return q


class QuantizedSwitchLinear(nn.Module):
    """SwitchLinear with its weight stored as `mx.quantize` packs it (each expert's rows in groups along the input
    axis), computed with `mx.gather_qmm`."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False,
                 group_size: int = 64, bits: int = 4, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.quantize_weight(mx.zeros((num_experts, output_dims, input_dims)))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        self.freeze()

    def quantize_weight(self, weight):
        self.weight, self.scales, *biases = mx.quantize(weight, self.group_size, self.bits, mode=self.mode)
        if biases:  # affine mode only
            self.biases = biases[0]

    def __call__(self, x, indices, sorted_indices: bool = False):
        y = mx.gather_qmm(x, self.weight, self.scales, self.get("biases"), rhs_indices=indices, transpose=True,
                          group_size=self.group_size, bits=self.bits, mode=self.mode,
                          sorted_indices=sorted_indices)
        return _expert_bias(self, y, indices)


def _switch_to_float(module: QuantizedSwitchLinear) -> SwitchLinear:
    weight = quant.dequantized_weight(module)
    layer = SwitchLinear(weight.shape[2], weight.shape[1], weight.shape[0], bias="bias" in module)
    layer.weight = weight
    if "bias" in module:
        layer.bias = module.bias.astype(mx.float32)
    return layer


quant.register(QuantizedSwitchLinear, _switch_to_float)

# Routed token slots from which tokens are grouped by expert before the gathered products: sorted indices let the
# kernels read each expert's weights once instead of once per token.
SORT_FROM = 64


class SwitchGLU(nn.Module):
    """Gated expert MLPs: down(act(gate(x)) * up(x)) with each token's own experts. x (..., D), indices (..., k)
    -> (..., k, D), one output per chosen expert (the caller weights and sums them)."""

    sensitive_children = ("down_proj",)

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, act: str = "silu",
                 bias: bool = False):
        super().__init__()
        self.gate_proj = SwitchLinear(hidden_size, intermediate_size, num_experts, bias)
        self.up_proj = SwitchLinear(hidden_size, intermediate_size, num_experts, bias)
        self.down_proj = SwitchLinear(intermediate_size, hidden_size, num_experts, bias)
        self.act = activation(act)

    def experts(self, x, indices, sorted_indices: bool = False):
        h = self.act(self.gate_proj(x, indices, sorted_indices)) * self.up_proj(x, indices, sorted_indices)
        return self.down_proj(h, indices, sorted_indices)

    def __call__(self, x, indices):
        """x (..., D), or one input per chosen expert (..., k, D) (Llama 4 scales each expert's input)."""
        indices = mx.stop_gradient(indices)
        per_slot = x.ndim == indices.ndim + 1
        if indices.size < SORT_FROM:
            # x as (..., 1, 1, D) (or (..., k, 1, D)): its batch axes broadcast against the indices (..., k).
            return self.experts(mx.expand_dims(x, -2) if per_slot else mx.expand_dims(x, (-2, -3)),
                                indices).squeeze(-2)
        # One row per (token, slot), ordered by expert; put back in token order afterwards.
        k, flat = indices.shape[-1], indices.reshape(-1)
        order = mx.argsort(flat)
        rows = x.reshape(-1, 1, x.shape[-1])[order if per_slot else order // k]
        y = self.experts(rows, flat[order], sorted_indices=True)[mx.argsort(order)]
        return y.reshape(*indices.shape, -1)


def listed_experts(experts: Sequence[nn.Module], x: mx.array, indices: mx.array) -> mx.array:
    """SwitchGLU's computation for experts kept as separate modules (the layout mlx-lm reads for dbrx): x (..., D),
    indices (..., k) -> (..., k, D). Each expert runs once, on the rows routed to it; the routing is read on the
    host (one synchronisation per call), as transformers' expert loop does."""
    k, dims = indices.shape[-1], x.shape[-1]
    rows_of = np.array(indices.reshape(-1, k))
    flat = x.reshape(-1, dims)
    out = mx.zeros((flat.shape[0], k, dims), x.dtype)
    for e in np.unique(rows_of):
        rows, slots = (mx.array(a) for a in np.nonzero(rows_of == e))
        out[rows, slots] = experts[int(e)](flat[rows]).astype(x.dtype)
    return out.reshape(*indices.shape, dims)


class NestedGate(nn.Module):
    """A router's linear layer one level down, under `name` (dbrx's `router.layer`, hunyuan's `gate.wg`)."""

    def __init__(self, hidden_size: int, num_experts: int, name: str):
        super().__init__()
        self.linear_name = name
        self[name] = nn.Linear(hidden_size, num_experts, bias=False)

    def __call__(self, x):
        return self[self.linear_name](x)


# --- the sparse block ---------------------------------------------------------------------------------------------


class SparseMoE(nn.Module):
    """Routed experts, plus a shared expert that every token goes through when the family has one:
    y = sum_k w_k expert_{i_k}(x) + [sigmoid(shared_expert_gate(x)) *] shared_expert(x).

    `route(logits) -> (indices, weights)` is a router above with the config's settings. `gate` replaces the plain
    linear router where a family stores it otherwise (granitemoe's `router.layer`), under `gate_name`.

    Where families store the other parts under other names (mlx-lm's, which follow the checkpoints'):
      switch / switch_name  the experts: a SwitchGLU under `switch_mlp` by default; a list of expert modules is
                            computed by `listed_experts` (dbrx's `experts`);
      shared_name           the shared expert (`shared_experts`, `shared_mlp`);
      correction_bias       the dotted path, inside the block, of the router's correction bias (created there as
                            zeros (num_experts,) unless present), passed to `route` as `correction_bias`."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, route: Callable,
                 act: str = "silu", bias: bool = False, shared: Optional[nn.Module] = None,
                 shared_gate: bool = False, gate: Optional[nn.Module] = None, gate_name: str = "gate",
                 switch=None, switch_name: str = "switch_mlp", shared_name: str = "shared_expert",
                 correction_bias: Optional[str] = None):
        super().__init__()
        self.gate_name, self.switch_name, self.shared_name = gate_name, switch_name, shared_name
        self[gate_name] = gate if gate is not None else nn.Linear(hidden_size, num_experts, bias=False)
        self[switch_name] = switch if switch is not None else SwitchGLU(hidden_size, intermediate_size,
                                                                        num_experts, act, bias)
        if shared is not None:
            self[shared_name] = shared
            if shared_gate:
                self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        self.correction_bias_path = correction_bias
        if correction_bias is not None:
            *holders, leaf = correction_bias.split(".")
            holder = self
            for name in holders:
                if name not in holder:
                    holder[name] = nn.Module()
                holder = holder[name]
            if leaf not in holder:
                holder[leaf] = mx.zeros((num_experts,))
        self.route = route
        # Kept in full precision by `RoutedModel.quant_predicate` (see the module docstring).
        self.float_children = frozenset({gate_name, "shared_expert_gate"})

    def child(self, path: str):
        """The module or array at a dotted path inside this block."""
        node = self
        for name in path.split("."):
            node = node[name]
        return node

    def __call__(self, x):
        logits = self[self.gate_name](x)
        if self.correction_bias_path is None:
            indices, weights = self.route(logits)
        else:
            indices, weights = self.route(logits, correction_bias=self.child(self.correction_bias_path))
        experts = self[self.switch_name]
        y = listed_experts(experts, x, indices) if isinstance(experts, list) else experts(x, indices)
        y = (y * weights[..., None].astype(x.dtype)).sum(axis=-2)
        if self.shared_name in self:
            shared = self[self.shared_name](x)
            if "shared_expert_gate" in self:
                shared = mx.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y


def is_sparse(index: int, num_experts: int, decoder_sparse_step: int = 1, mlp_only_layers: Sequence[int] = (),
              first_dense: int = 0, last_sparse: Optional[int] = None) -> bool:
    """Whether decoder layer `index` has the MoE block rather than a dense MLP: not among the first `first_dense`
    layers (DeepSeek's `first_k_dense_replace`, ERNIE's `moe_layer_start_index`), nor after `last_sparse` (ERNIE's
    `moe_layer_end_index`), nor in `mlp_only_layers`, and every `decoder_sparse_step`-th layer (counting from one),
    as qwen2_moe / qwen3_moe decide."""
    if num_experts <= 0 or index < first_dense or index in (mlp_only_layers or ()):
        return False
    if last_sparse is not None and index > last_sparse:
        return False
    return (index + 1) % decoder_sparse_step == 0


def mlp_kinds(n_layers: int, mlp_layer_types: Optional[Sequence[str]] = None, first_dense: int = 0) -> list:
    """"dense" or "sparse" per layer: transformers' `mlp_layer_types` when the config has them, else the first
    `first_dense` layers dense (DeepSeek's `first_k_dense_replace`) and the rest sparse."""
    if mlp_layer_types:
        if len(mlp_layer_types) < n_layers or not set(mlp_layer_types) <= {"dense", "sparse"}:
            raise ValueError(f"mlp_layer_types must give 'dense' or 'sparse' for each of the {n_layers} layers, got "
                             f"{list(mlp_layer_types)}")
        return list(mlp_layer_types[:n_layers])
    first_dense = min(first_dense or 0, n_layers)
    return ["dense"] * first_dense + ["sparse"] * (n_layers - first_dense)


# --- weights and quantization -------------------------------------------------------------------------------------


GLU_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def stack_experts(block: str, count: int, names: Optional[dict] = None,
                  leaves: Sequence[str] = ("weight",), switch: str = "switch_mlp") -> list:
    """Weight rules stacking per-expert checkpoint tensors `{block}.experts.{e}.{name}.{leaf}` into
    `{block}.{switch}.{ours}.{leaf}` for each `name: ours` of `names` (e.g. mixtral's {"w1": "gate_proj", ...});
    by default the checkpoint already uses our names. `block` is a key template such as "model.layers.{i}.mlp";
    `switch` the SparseMoE's `switch_name`."""
    names = names or {name: name for name in GLU_PROJECTIONS}
    return [Stack(f"{block}.experts.{{e}}.{name}.{leaf}", f"{block}.{switch}.{ours}.{leaf}", count)
            for name, ours in names.items() for leaf in leaves]


class RoutedModel:
    """Mixin for the `Model` of a family with MoE blocks: its `quant_predicate` keeps each block's routers and
    shared-expert gates (the blocks list them in `float_children`) in full precision."""

    def float_paths(self) -> frozenset:
        if "_float_paths" not in self.__dict__:
            self.__dict__["_float_paths"] = frozenset(
                f"{path}.{name}" for path, m in self.named_modules() for name in getattr(m, "float_children", ())
                if name in m)
        return self.__dict__["_float_paths"]

    def quant_predicate(self, path: str, module) -> bool:
        return not any(path == p or path.startswith(p + ".") for p in self.float_paths())

    def cast_predicate(self, path: str) -> bool:
        """Routers' correction biases keep their stored dtype (see the module docstring)."""
        return not path.endswith(".e_score_correction_bias")

