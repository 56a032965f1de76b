"""Weight rules are invertible data: for every family, sanitize then its inverse gives back the checkpoint's
tensors exactly (except the declared drops); each operation is checked against numpy slicing."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_arch
from checkpoints import make_checkpoint
from mlx_arch.core.weights import (Alias, Concat, Drop, Rename, Split, Stack, Transpose, Unstack, apply_rules, dropped,
                                   inverse)
from model_test_runner import CASES

FIRST_CASE = {}
for case in CASES:
    FIRST_CASE.setdefault(case["model_type"], case)
TIED = {}
for case in CASES:  # a tied variant per family where the table has one: its head is a declared drop
    if case.get("overrides", {}).get("tie_word_embeddings") and case["model_type"] not in TIED:
        TIED[case["model_type"]] = case


def checkpoint_weights(path) -> dict:
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    return weights


@pytest.mark.parametrize("case", list(FIRST_CASE.values()) + list(TIED.values()), ids=lambda c: c["id"])
def test_inverse_of_sanitize_gives_back_the_checkpoint(tmp_path, case):
    import json

    path = make_checkpoint(tmp_path / case["id"], case["model_type"], tokenizer=False, **case.get("overrides", {}))
    config = json.loads((path / "config.json").read_text())
    model = mlx_arch.build_model(config)
    source = checkpoint_weights(path)
    rules = model.weight_rules()
    converted = apply_rules(dict(source), rules)
    back = apply_rules(dict(converted), inverse(rules))
    kept = {k for k in source if not dropped(rules, k)}
    assert sorted(back) == sorted(kept), f"extra: {sorted(set(back) - kept)}; missing: {sorted(kept - set(back))}"
    # An operation that changes values (a norm's offset folded into its weight) declares the rounding its round
    # trip may cost, in absolute terms; every other operation gives back the exact tensors.
    rounding = sum(getattr(rule, "rounding", 0.0) for rule in rules)
    for k in kept:
        assert back[k].dtype == source[k].dtype, k
        assert mx.array_equal(back[k], source[k]) or mx.allclose(back[k], source[k], rtol=0, atol=rounding), k


def test_rename_is_longest_match_and_inverts():
    rules = [Rename({"gpt_neox.layers.": "model.h.", "gpt_neox.embed_in.": "model.embed_in.",
                     "embed_out.": "model.embed_out."})]
    w = {"gpt_neox.layers.0.x": mx.array([1]), "gpt_neox.embed_in.weight": mx.array([2]),
         "embed_out.weight": mx.array([3])}
    out = apply_rules(w, rules)
    assert sorted(out) == ["model.embed_in.weight", "model.embed_out.weight", "model.h.0.x"]
    assert apply_rules(out, rules).keys() == out.keys()  # idempotent
    assert sorted(apply_rules(out, inverse(rules))) == sorted(w)


def test_rename_refuses_tables_that_are_not_one_to_one():
    # Reversing these one by one sends model.h.0 back to gpt_neox.h.0 or gpt_neox.layers.0: ambiguous.
    with pytest.raises(ValueError, match="not one-to-one"):
        Rename({"gpt_neox.layers.": "model.h.", "gpt_neox.": "model."})
    with pytest.raises(ValueError, match="two prefixes to one"):
        Rename({"a.": "x.", "b.": "x."})
    with pytest.raises(ValueError, match="rename it again"):
        Rename({"model.": "model.language_model."})


def test_alias_inverse_writes_the_canonical_spelling():
    rules = [Alias({"h.": "transformer.h."}), Rename({"transformer.": "model."})]
    out = apply_rules({"h.0.w": mx.array([1]), "transformer.h.1.w": mx.array([2])}, rules)
    assert sorted(out) == ["model.h.0.w", "model.h.1.w"]
    assert sorted(apply_rules(out, inverse(rules))) == ["transformer.h.0.w", "transformer.h.1.w"]


def test_transpose_is_declared_not_guessed():
    square = mx.arange(16).reshape(4, 4)
    rules = [Transpose("t.{i}.c_attn.weight"), Rename({"t.": "model."})]
    out = apply_rules({"t.0.c_attn.weight": square, "t.0.other.weight": square}, rules)
    assert mx.array_equal(out["model.0.c_attn.weight"], square.T)
    assert mx.array_equal(out["model.0.other.weight"], square)
    assert mx.array_equal(apply_rules(out, rules)["model.0.c_attn.weight"], square.T)  # a second run: unchanged
    assert mx.array_equal(apply_rules(out, inverse(rules))["t.0.c_attn.weight"], square)


@pytest.mark.parametrize("interleave", [None, 2])
def test_split_and_concat_match_numpy(interleave):
    rng = np.random.default_rng(0)
    fused = rng.standard_normal((12, 5)).astype(np.float32)
    op = Split("l.{i}.gate_up_proj.weight", ["l.{i}.gate_proj.weight", "l.{i}.up_proj.weight"], [6, 6],
               interleave=interleave)
    out = op.apply({"l.3.gate_up_proj.weight": mx.array(fused)})
    if interleave is None:
        gate, up = fused[:6], fused[6:]
    else:  # rows in pairs: gate, gate, up, up, gate, gate, ...
        blocks = fused.reshape(3, 2, 2, 5)
        gate, up = blocks[:, 0].reshape(6, 5), blocks[:, 1].reshape(6, 5)
    np.testing.assert_array_equal(np.array(out["l.3.gate_proj.weight"]), gate)
    np.testing.assert_array_equal(np.array(out["l.3.up_proj.weight"]), up)
    assert op.apply(out).keys() == out.keys()  # idempotent
    back = op.inverse().apply(out)
    np.testing.assert_array_equal(np.array(back["l.3.gate_up_proj.weight"]), fused)
    with pytest.raises(ValueError, match="missing l.3.up_proj.weight"):
        op.inverse().apply({"l.3.gate_proj.weight": out["l.3.gate_proj.weight"]})


def test_stack_and_unstack_experts():
    experts = {f"layers.{i}.mlp.experts.{e}.w1.weight": mx.full((2, 3), 10 * i + e) for i in range(2)
               for e in range(4)}
    op = Stack("layers.{i}.mlp.experts.{e}.w1.weight", "layers.{i}.mlp.switch_mlp.gate_proj.weight", 4)
    out = op.apply(experts)
    assert sorted(out) == ["layers.0.mlp.switch_mlp.gate_proj.weight", "layers.1.mlp.switch_mlp.gate_proj.weight"]
    stacked = np.array(out["layers.1.mlp.switch_mlp.gate_proj.weight"])
    assert stacked.shape == (4, 2, 3) and [stacked[e, 0, 0] for e in range(4)] == [10, 11, 12, 13]
    assert op.apply(out).keys() == out.keys()
    back = op.inverse().apply(out)
    assert isinstance(op.inverse(), Unstack) and sorted(back) == sorted(experts)
    assert all(mx.array_equal(back[k], experts[k]) for k in experts)
    del experts["layers.0.mlp.experts.2.w1.weight"]
    with pytest.raises(ValueError, match="missing layers.0.mlp.experts.2.w1.weight"):
        op.apply(experts)


def test_drops_are_declared_and_not_restored():
    rules = [Drop("{*}rotary_emb.inv_freq", why="buffer"), Concat(["a.{i}.q", "a.{i}.k"], "a.{i}.qk", sizes=[1, 1])]
    assert dropped(rules, "model.layers.0.self_attn.rotary_emb.inv_freq") and dropped(rules, "rotary_emb.inv_freq")
    assert not dropped(rules, "model.layers.0.self_attn.q_proj.weight")
    assert not dropped(rules, "model.layers.0.xrotary_emb.inv_freq")
