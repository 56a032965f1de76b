"""What the shared runner does not reach for latent-attention families: the multi-token-prediction layers a release
stores are dropped by a declared rule, the sparse-attention indexer's choice changes the logits (so the parity cases
prove it), DeepSeek-V2's group-limited softmax routing against a plain loop, and config keys read as transformers
reads them."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_arch
from mlx_arch.core.moe import softmax_group_topk
from mlx_arch.core.weights import dropped
from model_test_runner import CASES, build_case, check_parity, probe_tokens, rel_error

BY_ID = {case["id"]: case for case in CASES}


def test_mtp_layers_are_dropped_by_declaration(tmp_path):
    case = BY_ID["deepseek_v3-kimi-k2"]
    _, model, config, weights = build_case(tmp_path, case, "v5")
    n = config["num_hidden_layers"]
    mtp = {f"model.layers.{n}.eh_proj.weight": mx.zeros((4, 4)), f"model.layers.{n}.mlp.gate.e_score_correction_bias":
           mx.zeros((4,)), f"model.layers.{n}.shared_head.head.weight": mx.zeros((4, 4))}
    out = model.sanitize({**weights, **mtp})
    assert not any(k.startswith(f"model.layers.{n}.") for k in out)
    assert all(dropped(model.weight_rules(), k) for k in mtp)
    assert not dropped(model.weight_rules(), f"model.layers.{n - 1}.self_attn.o_proj.weight")


@pytest.mark.parametrize("case_id", ["deepseek_v32", "glm_moe_dsa"])
def test_indexer_choice_changes_the_logits(tmp_path, case_id):
    """With every key allowed, the model no longer matches transformers: the cases exercise the selection."""
    case = BY_ID[case_id]
    path, model, config, _ = build_case(tmp_path, case, "v5")
    tokens = probe_tokens(config["vocab_size"], case["seq_len"])
    check_parity(path, model, tokens)
    for layer in model.layers:
        layer.self_attn.indexer.topk = case["seq_len"]
    with pytest.raises(AssertionError, match="logits differ"):
        check_parity(path, model, tokens)


def _naive_group_limited(logits, k, scaling, n_group, topk_group):
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = []
    for row in probs:
        groups = row.reshape(n_group, -1)
        kept = np.argsort(-groups.max(-1))[:topk_group]
        masked = np.where(np.isin(np.arange(n_group), kept)[:, None], groups, 0.0).reshape(-1)
        chosen = np.argsort(-masked)[:k]
        out.append({int(e): row[e] * scaling for e in chosen})
    return out


def test_group_limited_greedy_against_a_loop():
    logits = np.random.default_rng(0).normal(size=(50, 12)).astype(np.float32)
    indices, weights = softmax_group_topk(mx.array(logits), k=3, scaling=1.5, n_group=4, topk_group=2)
    expected = _naive_group_limited(logits, 3, 1.5, 4, 2)
    for idx, w, want in zip(np.array(indices), np.array(weights), expected):
        assert set(idx.tolist()) == set(want)
        np.testing.assert_allclose(w, [want[int(e)] for e in idx], rtol=1e-5)


def test_glm4_moe_lite_head_dim_is_the_rope_dim():
    config = {"model_type": "glm4_moe_lite", "head_dim": 8, "qk_rope_head_dim": 64, "num_hidden_layers": 3,
              "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 320}
    args = mlx_arch.build_model(config).args
    assert args.qk_rope_head_dim == 8 and args.mlp_layer_types == ["dense", "sparse", "sparse"]


def test_glm_moe_dsa_indexer_pattern_keys():
    from mlx_arch.glm_moe_dsa import indexer_types

    assert indexer_types(4, "FSFS", None, None) == ["full", "shared", "full", "shared"]
    assert indexer_types(6, None, 2, 2) == ["full", "full", "shared", "full", "shared", "full"]
    with pytest.raises(ValueError, match="indexer_types 'shared'"):
        mlx_arch.build_model({"model_type": "glm_moe_dsa", "num_hidden_layers": 4, "index_topk_pattern": "FSFS",
                              "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 320})


def test_conversion_log_and_card_name_the_dropped_mtp_layer(tmp_path):
    """Through the pipeline: a release's multi-token-prediction layer is dropped by name, and the log and the card
    say how many tensors and why."""
    from convert import convert

    case = BY_ID["deepseek_v3-kimi-k2"]
    path, _, config, weights = build_case(tmp_path, case, "v5")
    n = config["num_hidden_layers"]
    mtp = {f"model.layers.{n}.eh_proj.weight": mx.zeros((4, 4)), f"model.layers.{n}.enorm.weight": mx.ones((4,))}
    mx.save_safetensors(str(path / "model.safetensors"), {**weights, **mtp}, metadata={"format": "pt"})
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    log = []
    result = convert(str(path), tmp_path / "out", skip_validation=True, log=log.append)
    assert result.dropped_by_rules == {next(iter(result.dropped_by_rules)): 2}
    assert any("dropped by the architecture's rules: 2 tensor(s) (multi-token" in m for m in log), log
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Dropped by the architecture's declared rules: 2 tensor(s) (multi-token" in card
