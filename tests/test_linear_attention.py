"""The recurrences of mlx_arch/core/linear.py: chunked and one-token forms agree (chunks shorter than the prompt,
a prompt that is not a whole number of chunks), the gated delta rule matches transformers' reference kernels, a
state carried through a prefill and single-token steps equals one pass, and the hybrid families keep their parity
with transformers when their chunk is shorter than the prompt."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_arch.core.cache import StateCache
from mlx_arch.core.linear import (decayed_linear, decayed_linear_chunked, decayed_linear_step, gated_delta,
                                  gated_delta_chunked, gated_delta_step, l2norm)

B, L, H, DK, DV = 2, 30, 3, 8, 5


def _inputs(seed=0, per_channel=False):
    rng = np.random.default_rng(seed)
    q, k = (l2norm(mx.array(rng.standard_normal((B, L, H, DK)).astype(np.float32))) for _ in range(2))
    v = mx.array(rng.standard_normal((B, L, H, DV)).astype(np.float32))
    shape = (B, L, H, DK) if per_channel else (B, L, H)
    g = mx.array(-rng.uniform(0.01, 0.7, shape).astype(np.float32))
    beta = mx.array(rng.uniform(0.1, 0.9, (B, L, H)).astype(np.float32))
    return q, k, v, g, beta


def _close(a, b, tol=1e-5):
    a, b = np.array(a), np.array(b)
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), np.abs(a - b).max()


@pytest.mark.parametrize("chunk", [4, 7, 64])
@pytest.mark.parametrize("per_channel", [False, True])
def test_gated_delta_chunked_equals_recurrent(chunk, per_channel):
    q, k, v, g, beta = _inputs(per_channel=per_channel)
    out, state = gated_delta_chunked(q, k, v, g, beta, chunk=chunk)
    ref, ref_state = gated_delta_step(q, k, v, g, beta)
    _close(out, ref)
    _close(state, ref_state)


def test_gated_delta_matches_transformers_kernels():
    from transformers.models.qwen3_next.modeling_qwen3_next import (torch_chunk_gated_delta_rule,
                                                                    torch_recurrent_gated_delta_rule)

    q, k, v, g, beta = _inputs(seed=1)
    t = lambda x: torch.tensor(np.array(x))  # noqa: E731
    for kernel in (torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule):
        kwargs = {"chunk_size": 8} if kernel is torch_chunk_gated_delta_rule else {}
        expected, expected_state = kernel(t(q), t(k), t(v), g=t(g), beta=t(beta), output_final_state=True,
                                          use_qk_l2norm_in_kernel=False, **kwargs)
        out, state = gated_delta_chunked(q * DK**-0.5, k, v, g, beta, chunk=8)  # transformers scales q inside
        _close(out, expected.numpy())
        _close(state, expected_state.numpy())


@pytest.mark.parametrize("fn,extra", [(gated_delta, True), (decayed_linear, False)])
def test_prefill_then_single_steps_equal_one_pass(fn, extra):
    q, k, v, g, beta = _inputs(seed=2)
    args = (lambda a, b: (q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b]) + ((beta[:, a:b],) if extra else ()))
    full = fn(*args(0, L), chunk=8)
    cache = StateCache(1)
    parts = [fn(*args(0, 20), cache=cache, chunk=8)] + [fn(*args(t, t + 1), cache=cache) for t in range(20, L)]
    _close(mx.concatenate(parts, axis=1), full)


@pytest.mark.parametrize("chunk", [4, 9, 64])
def test_lightning_chunked_equals_recurrent(chunk):
    q, k, v, g, _ = _inputs(seed=3)
    out, state = decayed_linear_chunked(q, k, v, g, chunk=chunk)
    ref, ref_state = decayed_linear_step(q, k, v, g)
    _close(out, ref)
    _close(state, ref_state)


@pytest.mark.parametrize("case_id", ["qwen3_next-moe-grouped", "qwen3_5_text-grouped"])
def test_family_parity_with_chunks_shorter_than_the_prompt(tmp_path, monkeypatch, case_id):
    """transformers' chunk is 64 tokens; ours set to 8 over a 30-token prompt computes the same logits."""
    from mlx_arch import qwen3_next
    from model_test_runner import CASES, build_case, check_cache_vs_full, check_parity, probe_tokens

    monkeypatch.setattr(qwen3_next.GatedDeltaNet, "chunk", 8)
    case = next(c for c in CASES if c["id"] == case_id)
    path, model, config, _ = build_case(tmp_path, case, "v5")
    tokens = probe_tokens(config["vocab_size"], 30)
    check_parity(path, model, tokens)
    check_cache_vs_full(model, tokens, prefill=20)


@pytest.mark.parametrize("model_type,legacy,fields", [
    ("qwen3_next", {"full_attention_interval": 3, "num_hidden_layers": 6}, ()),
    ("qwen3_5_text", {"full_attention_interval": 2, "num_hidden_layers": 4}, ()),
    ("qwen3_5_moe_text", {"full_attention_interval": 5, "num_hidden_layers": 5}, ()),
    ("lfm2", {"full_attn_idxs": [1, 3], "num_hidden_layers": 4, "block_ff_dim": 96, "tie_embedding": False,
              "block_dim": 2560}, ("intermediate_size", "tie_word_embeddings")),
    ("lfm2_moe", {"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2, "tie_embedding": False},
     ("tie_word_embeddings",)),
])
def test_legacy_config_keys_read_as_transformers_reads_them(model_type, legacy, fields):
    import mlx_arch
    from transformers import AutoConfig

    theirs = AutoConfig.for_model(model_type, **legacy)
    ours = mlx_arch.get_architecture(model_type).ModelArgs.from_dict({"model_type": model_type, **legacy})
    assert ours.layer_types[: ours.num_hidden_layers] == theirs.layer_types
    for name in fields:
        assert getattr(ours, name) == getattr(theirs, name), name
