"""The shared mixture-of-experts parts (mlx_arch/core/moe.py): routers against numpy, gathered expert layers against
a per-expert loop, quantized experts against their float twin, routers kept in full precision by a 4-bit
conversion, expert stacking that stays lazy per layer, and the config spellings the MoE families accept. Per-family
parity with transformers is in test_models (cases in data/model_configs.json)."""

import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from transformers import Qwen2MoeConfig

import mlx_arch
from checkpoints import make_checkpoint, make_config
from convert import convert
from convert_helpers import mlx_lm_logits, ours, rel_error
from model_test_runner import CASES
from mlx_arch.core import quant
from mlx_arch.core.layers import MLP
from mlx_arch.core.moe import (QuantizedSwitchLinear, SwitchGLU, SwitchLinear, is_sparse, listed_experts, sigmoid_topk,
                               softmax_topk, softmax_topk_corrected, softmax_topk_pnorm, stack_experts, topk_softmax)
from mlx_arch.core.weights import Move, apply_rules, inverse

RNG = np.random.default_rng(0)


def by_expert(indices, weights) -> list:
    """Per row, {expert: weight}: routers return their k choices in no particular order."""
    return [dict(zip(i.tolist(), w.tolist())) for i, w in zip(np.array(indices), np.array(weights))]


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def top(scores, k):
    return np.argsort(-scores, axis=-1)[..., :k]


# --- routers ------------------------------------------------------------------------------------------------------

LOGITS = RNG.standard_normal((12, 8)).astype(np.float32)


@pytest.mark.parametrize("normalize", [False, True])
def test_softmax_then_top_k(normalize):
    probs = np_softmax(LOGITS.astype(np.float64))
    idx = top(probs, 3)
    w = np.take_along_axis(probs, idx, -1)
    if normalize:
        w = w / w.sum(-1, keepdims=True)
    got = by_expert(*softmax_topk(mx.array(LOGITS), 3, normalize=normalize))
    want = by_expert(idx, w)
    for g, e in zip(got, want):
        assert g.keys() == e.keys() and np.allclose([g[k] for k in e], list(e.values()), atol=1e-6)


def test_top_k_then_softmax():
    idx = top(LOGITS, 3)
    w = np_softmax(np.take_along_axis(LOGITS, idx, -1).astype(np.float64))
    for g, e in zip(by_expert(*topk_softmax(mx.array(LOGITS), 3)), by_expert(idx, w)):
        assert g.keys() == e.keys() and np.allclose([g[k] for k in e], list(e.values()), atol=1e-6)
    # Mixtral's softmax -> top-k -> renormalise picks and weighs exactly like top-k -> softmax.
    for g, e in zip(by_expert(*softmax_topk(mx.array(LOGITS), 3, normalize=True)), by_expert(idx, w)):
        assert g.keys() == e.keys() and np.allclose([g[k] for k in e], list(e.values()), atol=1e-6)


def np_sigmoid_topk(logits, k, bias, scaling, normalize, n_group, topk_group):
    """DeepSeek-V3's router, row by row: choose by score + bias within the best groups, weigh by the score."""
    out = []
    for row in logits.astype(np.float64):
        scores = 1 / (1 + np.exp(-row))
        choice = scores + bias
        groups = choice.reshape(n_group, -1)
        group_score = np.sort(groups, axis=-1)[:, -2:].sum(-1)
        kept = np.argsort(-group_score)[:topk_group]
        masked = np.full_like(groups, -np.inf)
        masked[kept] = groups[kept]
        idx = np.argsort(-masked.reshape(-1))[:k]
        w = scores[idx]
        if normalize:
            w = w / (w.sum() + 1e-20)
        out.append(dict(zip(idx.tolist(), (w * scaling).tolist())))
    return out


@pytest.mark.parametrize("normalize,n_group,topk_group", [(True, 1, 1), (False, 1, 1), (True, 4, 2), (False, 4, 1)])
def test_sigmoid_router_with_correction_bias_and_groups(normalize, n_group, topk_group):
    bias = RNG.standard_normal(8).astype(np.float32) * 0.5  # large enough to change the choice
    got = by_expert(*sigmoid_topk(mx.array(LOGITS), 2, mx.array(bias), scaling=2.5, normalize=normalize,
                                  n_group=n_group, topk_group=topk_group))
    want = np_sigmoid_topk(LOGITS, 2, bias, 2.5, normalize, n_group, topk_group)
    for g, e in zip(got, want):
        assert g.keys() == e.keys() and np.allclose([g[k] for k in e], list(e.values()), atol=1e-6)
    # The bias only chooses: without it the choice differs on some rows, the weights stay plain scores.
    plain = by_expert(*sigmoid_topk(mx.array(LOGITS), 2, None, 2.5, normalize, n_group, topk_group))
    assert any(p.keys() != g.keys() for p, g in zip(plain, got))


# The routers and blocks added for dbrx, ernie4_5_moe, dots1 and minimax_m2 draw from their own generator, so that the
# tests above keep their data.
RNG_ADDED = np.random.default_rng(1)


def assert_same_routing(got, want):
    for g, e in zip(got, want):
        assert g.keys() == e.keys() and np.allclose([g[k] for k in e], list(e.values()), atol=1e-6)


@pytest.mark.parametrize("p", [1.0, 2.0, None])
def test_softmax_top_k_divided_by_the_p_norm(p):
    """DBRX's `moe_normalize_expert_weights`: the p-norm of the chosen probabilities, or none at all."""
    probs = np_softmax(LOGITS.astype(np.float64))
    idx = top(probs, 3)
    w = np.take_along_axis(probs, idx, -1)
    if p is not None:
        w = w / ((w**p).sum(-1, keepdims=True)) ** (1 / p)
    assert_same_routing(by_expert(*softmax_topk_pnorm(mx.array(LOGITS), 3, p)), by_expert(idx, w))
    if p == 1.0:
        assert_same_routing(by_expert(*softmax_topk(mx.array(LOGITS), 3, normalize=True)), by_expert(idx, w))


@pytest.mark.parametrize("norm_min", [1e-12, 0.9])
def test_softmax_router_choosing_with_a_correction_bias(norm_min):
    """ERNIE 4.5: chosen by probability + bias, weighted by the plain probabilities over their sum floored at
    `moe_norm_min` (0.9 exceeds most sums of three probabilities of eight)."""
    bias = RNG_ADDED.standard_normal((1, 8)).astype(np.float32) * 0.1
    probs = np_softmax(LOGITS.astype(np.float64))
    idx = top(probs + bias, 3)
    w = np.take_along_axis(probs, idx, -1)
    w = w / np.maximum(w.sum(-1, keepdims=True), norm_min)
    got = by_expert(*softmax_topk_corrected(mx.array(LOGITS), 3, mx.array(bias), norm_min))
    assert_same_routing(got, by_expert(idx, w))
    plain = by_expert(*softmax_topk(mx.array(LOGITS), 3))
    assert any(p.keys() != g.keys() for p, g in zip(plain, got))


# --- gathered experts ---------------------------------------------------------------------------------------------


def random_switch_glu(hidden=64, inter=64, experts=6, bias=True):
    glu = SwitchGLU(hidden, inter, experts, act="silu", bias=bias)
    glu.update({name: {k: mx.array(RNG.standard_normal(v.shape).astype(np.float32) * 0.2) for k, v in p.items()}
                for name, p in glu.parameters().items()})
    return glu


def np_glu_loop(glu, x, indices):
    """Each token's chosen experts, one at a time."""
    p = {name: {k: np.array(v, np.float64) for k, v in d.items()} for name, d in glu.parameters().items()}

    def linear(name, e, v):
        return p[name]["weight"][e] @ v + (p[name]["bias"][e] if "bias" in p[name] else 0)

    x, indices = np.array(x, np.float64), np.array(indices)
    out = np.zeros(indices.shape + (x.shape[-1],))
    for pos in np.ndindex(indices.shape):
        v, e = x[pos[:-1]], indices[pos]
        g = linear("gate_proj", e, v)
        out[pos] = linear("down_proj", e, g / (1 + np.exp(-g)) * linear("up_proj", e, v))
    return out


@pytest.mark.parametrize("tokens", [3, 40])  # 3 x 2 slots: gathered in place; 40 x 2 x 2: sorted by expert first
def test_switch_glu_matches_a_per_expert_loop(tokens):
    glu = random_switch_glu()
    x = mx.array(RNG.standard_normal((2, tokens, 64)).astype(np.float32))
    indices = mx.array(RNG.integers(0, 6, size=(2, tokens, 2)))
    got = glu(x, indices)
    assert got.shape == (2, tokens, 2, 64)
    np.testing.assert_allclose(np.array(got), np_glu_loop(glu, x, indices), rtol=1e-4, atol=1e-5)


def test_switch_linear_runs_half_precision():
    layer = random_switch_glu().up_proj
    x = mx.array(RNG.standard_normal((5, 1, 1, 64)).astype(np.float32))
    indices = mx.array(RNG.integers(0, 6, size=(5, 2)))
    full = layer(x, indices)
    layer.update({k: v.astype(mx.float16) for k, v in layer.parameters().items()})
    half = layer(x.astype(mx.float16), indices)
    assert half.dtype == mx.float16 and rel_error(np.array(half.astype(mx.float32)), np.array(full)) < 1e-2


@pytest.mark.parametrize("quantized", [False, True])
def test_listed_experts_match_a_per_expert_loop(quantized):
    """Experts kept as separate modules (dbrx): each (token, slot) gets its own expert's output, quantized or not."""
    experts = [MLP(64, 32) for _ in range(5)]
    for e in experts:
        e.update({n: {"weight": mx.array(RNG_ADDED.standard_normal(p["weight"].shape).astype(np.float32) * 0.2)}
                  for n, p in e.parameters().items()})
        if quantized:
            nn.quantize(e, group_size=32, bits=4)
    x = mx.array(RNG_ADDED.standard_normal((2, 7, 64)).astype(np.float32))
    indices = mx.array(RNG_ADDED.integers(0, 5, size=(2, 7, 2)))
    got = listed_experts(experts, x, indices)
    assert got.shape == (2, 7, 2, 64)
    want = mx.stack([mx.stack([mx.stack([experts[int(indices[b, t, j])](x[b, t]) for j in range(2)])
                               for t in range(7)]) for b in range(2)])
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode,bits,group", [("affine", 4, 32), ("affine", 8, 64), ("mxfp4", 4, 32)])
def test_quantized_switch_linear_computes_its_float_twin(mode, bits, group):
    glu = random_switch_glu()
    nn.quantize(glu, group_size=group, bits=bits, mode=mode)  # picks every layer with `to_quantized`
    assert all(isinstance(glu[n], QuantizedSwitchLinear) for n in ("gate_proj", "up_proj", "down_proj"))
    assert ("biases" in glu.up_proj) == (mode == "affine") and glu.up_proj.weight.shape[0] == 6
    twin = random_switch_glu()
    for name in ("gate_proj", "up_proj", "down_proj"):
        float_layer = quant.to_float(glu[name])
        assert isinstance(float_layer, SwitchLinear) and float_layer.weight.dtype == mx.float32
        assert float_layer.weight.shape == twin[name].weight.shape
        twin[name] = float_layer
    x = mx.array(RNG.standard_normal((3, 30, 64)).astype(np.float32))
    indices = mx.array(RNG.integers(0, 6, size=(3, 30, 2)))
    np.testing.assert_allclose(np.array(glu(x, indices)), np.array(twin(x, indices)), rtol=1e-4, atol=1e-5)


# --- weight rules -------------------------------------------------------------------------------------------------


def test_move_renames_mid_key_and_inverts():
    rule = Move("l.{i}.moe.output_linear.weight", "l.{i}.moe.switch_mlp.down_proj.weight")
    w = {"l.3.moe.output_linear.weight": mx.array([1]), "l.3.moe.other.weight": mx.array([2])}
    out = rule.apply(w)
    assert sorted(out) == ["l.3.moe.other.weight", "l.3.moe.switch_mlp.down_proj.weight"]
    assert rule.apply(out).keys() == out.keys()
    assert sorted(apply_rules(out, inverse([rule]))) == sorted(w)
    with pytest.raises(ValueError, match="second run"):
        Move("a.{i}.w", "a.{i}.w")


def test_stack_experts_declares_one_stack_per_projection():
    rules = stack_experts("model.layers.{i}.block_sparse_moe", 3, {"w1": "gate_proj", "w2": "down_proj"})
    w = {f"model.layers.{i}.block_sparse_moe.experts.{e}.{n}.weight": mx.full((2, 2), 10 * i + e)
         for i in range(2) for e in range(3) for n in ("w1", "w2")}
    out = apply_rules(w, rules)
    assert sorted(out) == [f"model.layers.{i}.block_sparse_moe.switch_mlp.{n}.weight"
                           for i in range(2) for n in ("down_proj", "gate_proj")]
    stacked = np.array(out["model.layers.1.block_sparse_moe.switch_mlp.gate_proj.weight"])
    assert stacked[:, 0, 0].tolist() == [10, 11, 12]


def test_stack_experts_under_another_switch_name():
    """dots1 keeps its stacked experts under mlx-lm's `experts`."""
    names = ("down_proj", "gate_proj", "up_proj")
    rules = stack_experts("l.{i}.mlp", 2, switch="experts")
    assert sorted(r.target for r in rules) == [f"l.{{i}}.mlp.experts.{n}.weight" for n in names]
    out = apply_rules({f"l.0.mlp.experts.{e}.{n}.weight": mx.zeros((2, 2)) for e in range(2) for n in names}, rules)
    assert sorted(out) == [f"l.0.mlp.experts.{n}.weight" for n in names]
    assert apply_rules(out, rules).keys() == out.keys()


# --- routers stay in full precision -------------------------------------------------------------------------------

FLOAT_CHILDREN = {
    "mixtral": {"block_sparse_moe.gate"},
    "qwen2_moe": {"mlp.gate", "mlp.shared_expert_gate"},
    "qwen3_moe": {"mlp.gate"},
    "olmoe": {"mlp.gate"},
    "granitemoe": {"block_sparse_moe.router.layer"},
    "phimoe": {"block_sparse_moe.gate"},
    "granitemoeshared": {"block_sparse_moe.router.layer"},
    "dbrx": {"ffn.router.layer"},
    "ernie4_5_moe": {"mlp.gate"},
    "hunyuan_v1_moe": {"mlp.gate.wg"},
    "minimax_m2": {"block_sparse_moe.gate"},
    "dots1": {"mlp.gate"},
}
FIRST_CASE = {}
for case in CASES:
    FIRST_CASE.setdefault(case["model_type"], case)


@pytest.mark.parametrize("model_type", sorted(FLOAT_CHILDREN))
def test_quant_predicate_keeps_routers_and_gates_float(model_type):
    config = make_config(model_type, **FIRST_CASE[model_type]["overrides"]).to_dict()
    model = mlx_arch.build_model(config)
    layers = model._roles()["layers"] + "."  # model.layers. (transformer.blocks. in dbrx)
    kept = {path[len(layers):].split(".", 1)[1] for path, m in model.named_modules()
            if hasattr(m, "to_quantized") and path.startswith(layers) and not model.quant_predicate(path, m)}
    assert kept == FLOAT_CHILDREN[model_type]


@pytest.mark.parametrize("model_type", ["ernie4_5_moe", "minimax_m2", "dots1"])
def test_cast_keeps_correction_biases_in_their_stored_dtype(model_type):
    from convert.quantize import cast

    model = mlx_arch.build_model(make_config(model_type, **FIRST_CASE[model_type]["overrides"]).to_dict())
    cast(model, "bfloat16")
    flat = dict(tree_flatten(model.parameters()))
    biases = [k for k in flat if k.endswith(".e_score_correction_bias")]
    assert biases and all(flat[k].dtype == mx.float32 for k in biases)
    assert {v.dtype for k, v in flat.items() if k not in biases} == {mx.bfloat16}


def test_correction_bias_buffers_are_randomized_after_the_parameters(monkeypatch):
    """tests/checkpoints.py redraws the correction-bias buffers (zeros as built) after every parameter: the
    parameters are those drawn without it, so no other family's checkpoint changes."""
    import torch
    from transformers import AutoModelForCausalLM

    import checkpoints

    config = make_config("dots1", **FIRST_CASE["dots1"]["overrides"])
    drawn = checkpoints.randomize(AutoModelForCausalLM.from_config(config))
    monkeypatch.setattr(checkpoints, "_DATA_BUFFERS", re.compile("(?!)"))
    plain = checkpoints.randomize(AutoModelForCausalLM.from_config(config))
    biases = [(n, b) for n, b in drawn.named_buffers() if n.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().min() > 0 for _, b in biases)
    assert all(not plain.get_buffer(n).any() for n, _ in biases)
    assert all(torch.equal(p, plain.get_parameter(n)) for n, p in drawn.named_parameters())


@pytest.fixture(scope="module")
def qwen2_moe_4bit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe4")
    src = make_checkpoint(tmp / "src", "qwen2_moe", **FIRST_CASE["qwen2_moe"]["overrides"])
    return convert(str(src), tmp / "out", quantize=True, q_group_size=32, skip_validation=True)


def test_4bit_conversion_stores_routers_float_and_mlx_lm_reads_them_so(qwen2_moe_4bit):
    path = qwen2_moe_4bit.path
    weights = mx.load(str(path / "model.safetensors"))
    quant_config = json.loads((path / "config.json").read_text())["quantization"]
    for i in range(2):
        for gate in ("gate", "shared_expert_gate"):
            key = f"model.layers.{i}.mlp.{gate}"
            assert f"{key}.scales" not in weights and weights[f"{key}.weight"].dtype == mx.float32
            assert not quant_config.get(key)
        assert f"model.layers.{i}.mlp.switch_mlp.down_proj.scales" in weights
    from mlx_lm import load

    model, _ = load(str(path))
    assert type(model.model.layers[0].mlp.gate) is nn.Linear
    assert rel_error(mlx_lm_logits(path), ours(path)) <= 1e-5


def test_4bit_conversion_records_routers_as_false(qwen2_moe_4bit):
    quant_config = json.loads((qwen2_moe_4bit.path / "config.json").read_text())["quantization"]
    for i in range(2):
        assert quant_config.get(f"model.layers.{i}.mlp.gate") is False
        assert quant_config.get(f"model.layers.{i}.mlp.shared_expert_gate") is False
    card = (qwen2_moe_4bit.path / "README.md").read_text()
    assert "- Kept in full precision: 4 layers the architecture keeps in full precision (gate, shared_expert_gate" in card


# --- memory -------------------------------------------------------------------------------------------------------


def test_stacking_experts_stays_lazy_per_layer(tmp_path):
    """Converting evaluates one stacked tensor at a time: the peak stays below one layer's experts, a sixth of the
    model's, where stacking everything up front would hold them all."""
    layers, experts, inter, hidden = 6, 32, 256, 64
    src = make_checkpoint(tmp_path / "src", "mixtral", dtype="bfloat16", num_hidden_layers=layers,
                          num_local_experts=experts, intermediate_size=inter)
    layer_experts = experts * 3 * inter * hidden * 2  # bytes in bfloat16
    # rtn: what is measured is the save's streaming (calibration holds its own activations and Hessians)
    for options in ({}, dict(quantize=True, q_group_size=32, q_method="rtn")):
        mx.clear_cache()
        mx.reset_peak_memory()
        convert(str(src), tmp_path / f"out{len(options)}", skip_validation=True, **options)
        peak = mx.get_peak_memory()
        assert peak < layer_experts, f"peak {peak / 2**20:.1f} MiB, one layer's experts {layer_experts / 2**20:.1f} MiB"


# --- config spellings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type,key,field", [
    ("mixtral", "num_experts", "num_local_experts"), ("mixtral", "num_local_experts", "num_local_experts"),
    ("qwen3_moe", "num_experts", "num_experts"), ("qwen3_moe", "num_local_experts", "num_experts"),
    ("olmoe", "num_experts", "num_experts"), ("olmoe", "num_local_experts", "num_experts"),
])
def test_expert_count_under_either_name(model_type, key, field):
    """transformers maps these names onto each other (attribute_map); Hub configs use either."""
    args = mlx_arch.get_architecture(model_type).ModelArgs.from_dict({"model_type": model_type, key: 5})
    assert getattr(args, field) == 5


@pytest.mark.parametrize("use,max_window_layers", [(True, 3), (True, 1), (False, 28)])
def test_qwen2_moe_layer_types_without_the_key_follow_transformers(use, max_window_layers):
    """Configs written by transformers 4 have no `layer_types`: derive them as Qwen2MoeConfig does (its own rule,
    not Qwen2's)."""
    config = Qwen2MoeConfig(num_hidden_layers=5, use_sliding_window=use, sliding_window=6,
                            max_window_layers=max_window_layers, hidden_size=64, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, vocab_size=32).to_dict()
    expected = config.pop("layer_types")
    model = mlx_arch.build_model(config)
    assert model.args.layer_types == expected
    assert [layer.kind.window for layer in model.layers] == [6 if t == "sliding_attention" else None for t in expected]


def test_no_sparse_layer_after_the_last():
    """ERNIE 4.5's `moe_layer_end_index`."""
    assert is_sparse(3, 8, last_sparse=3) and not is_sparse(4, 8, last_sparse=3) and is_sparse(4, 8)


def test_minimax_m2_rotary_dim_is_the_rotated_fraction():
    """Released MiniMax-M2 configs give `rotary_dim` rather than `partial_rotary_factor`; the export writes it back
    for mlx-lm, with the `shared_intermediate_size` it requires."""
    args = mlx_arch.get_architecture("minimax_m2").ModelArgs.from_dict(
        {"model_type": "minimax_m2", "head_dim": 32, "rotary_dim": 8})
    assert args.partial_rotary_factor == 0.25
    config = make_config("minimax_m2", **FIRST_CASE["minimax_m2"]["overrides"]).to_dict()
    exported = mlx_arch.build_model(config).export_config(config)
    assert exported["rotary_dim"] == 8 and exported["shared_intermediate_size"] == 0


def test_ernie4_5_moe_drops_the_multi_token_prediction_layers():
    """Released ERNIE 4.5 MoE checkpoints carry MTP layers that transformers ignores on load."""
    from mlx_arch.core.weights import dropped

    model = mlx_arch.build_model(make_config("ernie4_5_moe", **FIRST_CASE["ernie4_5_moe"]["overrides"]).to_dict())
    mtp = ["model.mtp_block.0.self_attn.q_proj.weight", "model.mtp_block.0.mlp.experts.3.up_proj.weight",
           "model.mtp_block.0.mlp.moe_statics.e_score_correction_bias", "model.mtp_emb_norm.0.weight",
           "model.mtp_hidden_norm.0.weight", "model.mtp_linear_proj.0.weight"]
    assert all(dropped(model.weight_rules(), k) for k in mtp)
    assert model.sanitize({k: mx.zeros((1,)) for k in mtp}) == {}


def test_dbrx_rope_base_is_the_top_level_one_and_exported_for_mlx_lm():
    """transformers 5 ignores `attn_config.rope_theta` (which mlx-lm reads): the export states the base used."""
    config = make_config("dbrx", **FIRST_CASE["dbrx"]["overrides"]).to_dict()
    assert config["attn_config"]["rope_theta"] == 500000.0
    model = mlx_arch.build_model(config)
    assert model.args.rope_theta == 50000.0
    assert model.export_config(config)["attn_config"]["rope_theta"] == 50000.0


@pytest.mark.parametrize("index,step,only,first,sparse", [
    (0, 1, [], 0, True), (0, 2, [], 0, False), (1, 2, [], 0, True), (3, 2, [3], 0, False), (1, 1, [], 2, False),
])
def test_which_layers_are_sparse(index, step, only, first, sparse):
    assert is_sparse(index, 8, step, only, first) is sparse
    assert not is_sparse(index, 0, step, only, first)  # no experts: every layer dense
