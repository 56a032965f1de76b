"""kimi_linear, olmo_hybrid and recurrent_gemma: the RG-LRU's diagonal recurrence in its chunked (associative scan)
and one-token forms, Kimi's per-channel delta rule one chunk at a time, a state carried through a prefill of 30
tokens and 10 single-token steps equal to one pass, parity with transformers with chunks shorter than the prompt,
and the config keys read as the transformers config classes read them (legacy `linear_attn_config`, aliases)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_arch.core.cache import StateCache
from mlx_arch.core.linear import (diagonal_recurrence, diagonal_recurrence_chunked, diagonal_recurrence_step,
                                  gated_delta, gated_delta_by_chunk, l2norm)

B, L, D = 2, 30, 6


def _decays_and_inputs(seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.2, 0.99, (B, L, D)).astype(np.float32)
    a[:, 0] = 0  # a reset, as the RG-LRU's first token
    x = rng.standard_normal((B, L, D)).astype(np.float32)
    return mx.array(a), mx.array(x)


def _close(a, b, tol=1e-5):
    a, b = np.array(a), np.array(b)
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), np.abs(a - b).max()


@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_diagonal_recurrence_chunked_equals_recurrent(chunk):
    a, x = _decays_and_inputs()
    state = mx.array(np.random.default_rng(1).standard_normal((B, D)).astype(np.float32))
    out, last = diagonal_recurrence_chunked(a[:, 1:], x[:, 1:], state, chunk=chunk)
    ref, ref_last = diagonal_recurrence_step(a[:, 1:], x[:, 1:], state)
    _close(out, ref)
    _close(last, ref_last)


def test_diagonal_recurrence_prefill_then_single_steps_equal_one_pass():
    a, x = _decays_and_inputs(seed=2)
    full = diagonal_recurrence(a, x, chunk=8)
    cache = StateCache(1)
    parts = [diagonal_recurrence(a[:, :20], x[:, :20], cache, chunk=8)]
    parts += [diagonal_recurrence(a[:, t : t + 1], x[:, t : t + 1], cache) for t in range(20, L)]
    _close(mx.concatenate(parts, axis=1), full)


def test_per_channel_delta_rule_chunk_by_chunk_equals_whole_prompt():
    rng = np.random.default_rng(3)
    H, DK, DV = 3, 8, 5
    q, k = (l2norm(mx.array(rng.standard_normal((B, L, H, DK)).astype(np.float32))) for _ in range(2))
    v = mx.array(rng.standard_normal((B, L, H, DV)).astype(np.float32))
    g = mx.array(-rng.uniform(0.01, 0.7, (B, L, H, DK)).astype(np.float32))
    beta = mx.array(rng.uniform(0.1, 0.9, (B, L, H)).astype(np.float32))
    whole = gated_delta(q, k, v, g, beta, chunk=8)
    cache = StateCache(1)
    by_chunk = gated_delta_by_chunk(q, k, v, g, beta, cache, chunk=8)
    _close(by_chunk, whole)
    assert cache[0].shape == (B, H, DK, DV)


def _short_chunks(monkeypatch):
    from mlx_arch import kimi_linear, olmo_hybrid, recurrent_gemma

    monkeypatch.setattr(kimi_linear.DeltaAttention, "chunk", 8)
    monkeypatch.setattr(olmo_hybrid.GatedDeltaNet, "chunk", 8)
    monkeypatch.setattr(recurrent_gemma.RGLRU, "chunk", 8)


CASE_IDS = ["kimi_linear-kda-mla-moe", "olmo_hybrid-grouped-rope", "recurrent_gemma-griffin-window"]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_prefill_30_then_10_steps_and_parity_with_short_chunks(tmp_path, monkeypatch, case_id):
    """transformers' chunk is 64 tokens; ours set to 8: a 30-token prompt still gives transformers' logits, and a
    prefill of 30 tokens followed by 10 single-token steps gives our full forward over the 40 tokens."""
    from model_test_runner import CASES, build_case, check_cache_vs_full, check_parity, probe_tokens

    _short_chunks(monkeypatch)
    case = next(c for c in CASES if c["id"] == case_id)
    path, model, config, _ = build_case(tmp_path, case, "v5")
    check_parity(path, model, probe_tokens(config["vocab_size"], 30))
    check_cache_vs_full(model, probe_tokens(config["vocab_size"], 40, seed=1), prefill=30)


def test_kimi_legacy_linear_attn_config_and_stored_names():
    import mlx_arch
    from transformers import AutoConfig

    legacy = {"num_hidden_layers": 5, "first_k_dense_replace": 2, "num_experts": 16, "num_experts_per_token": 3,
              "moe_renormalize": False, "num_expert_group": 4, "num_shared_experts": 2, "model_max_length": 4096,
              "linear_attn_config": {"full_attn_layers": [2, 5], "kda_layers": [1, 3, 4], "head_dim": 32,
                                     "num_heads": 6, "short_conv_kernel_size": 3}}
    theirs = AutoConfig.for_model("kimi_linear", **legacy)
    ours = mlx_arch.get_architecture("kimi_linear").ModelArgs.from_dict({"model_type": "kimi_linear", **legacy})
    assert ours.layer_types == theirs.layer_types
    assert ours.mlp_layer_types == theirs.mlp_layer_types
    pairs = {"linear_head_dim": "linear_head_dim", "linear_num_heads": "linear_num_heads",
             "linear_conv_kernel_dim": "linear_conv_kernel_dim", "n_routed_experts": "num_experts",
             "num_experts_per_tok": "num_experts_per_token", "norm_topk_prob": "moe_renormalize",
             "n_group": "num_expert_group", "n_shared_experts": "num_shared_experts",
             "max_position_embeddings": "model_max_length"}
    for name, stored in pairs.items():
        assert getattr(ours, name) == getattr(theirs, stored), name
    default = mlx_arch.get_architecture("kimi_linear").ModelArgs.from_dict({"num_hidden_layers": 9})
    assert default.layer_types == AutoConfig.for_model("kimi_linear", num_hidden_layers=9).layer_types


@pytest.mark.parametrize("model_type,config,fields", [
    ("olmo_hybrid", {"num_hidden_layers": 3}, ("layer_types", "linear_key_head_dim", "linear_value_head_dim")),
    ("olmo_hybrid", {"num_hidden_layers": 8, "hidden_size": 96, "linear_num_key_heads": 2}, ("layer_types",
                                                                                             "linear_key_head_dim")),
    ("recurrent_gemma", {"sliding_window": 64, "num_hidden_layers": 4}, ("attention_window_size", "lru_width")),
])
def test_config_read_as_transformers_reads_it(model_type, config, fields):
    import mlx_arch
    from transformers import AutoConfig

    theirs = AutoConfig.for_model(model_type, **config)
    ours = mlx_arch.get_architecture(model_type).ModelArgs.from_dict({"model_type": model_type, **config})
    for name in fields:
        assert getattr(ours, name) == getattr(theirs, name), name


def test_recurrent_gemma_layer_kinds_follow_the_repeated_block_types():
    import mlx_arch
    from transformers import AutoConfig

    config = {"model_type": "recurrent_gemma", "num_hidden_layers": 5, "hidden_size": 32, "num_attention_heads": 2,
              "vocab_size": 16, "intermediate_size": 32, "attention_window_size": 4,
              "block_types": ["attention", "recurrent"]}
    theirs = AutoConfig.for_model(**config).layers_block_type
    kinds = [layer.kind.name for layer in mlx_arch.build_model(config).layers]
    assert kinds == ["recurrent" if t == "linear_attention" else "sliding" for t in theirs]
