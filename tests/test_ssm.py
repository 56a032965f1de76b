"""State-space layers (core/ssm.py): the chunked prefill forms against transformers' torch paths and against their
own single-token recurrent forms, and whole models carrying their state from a prefill through decoded tokens."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_arch.core.cache import make_prompt_cache
from mlx_arch.core.ssm import selective_scan, selective_step, ssd_chunked, ssd_step
from model_test_runner import CASES, build_case, probe_tokens, rel_error

RNG = np.random.default_rng(0)


def _randn(*shape, scale=1.0):
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


def _mamba_inputs(b=2, L=150, d=6, n=4):
    x, B, C = _randn(b, L, d), _randn(b, L, n), _randn(b, L, n)
    dt = np.log1p(np.exp(_randn(b, L, d)))  # softplus: positive
    A = -np.exp(_randn(d, n, scale=0.5))
    return x, dt, A, B, C


def test_selective_scan_matches_transformers_sequential_loop():
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    x, dt, A, B, C = _mamba_inputs()
    t = lambda a: torch.tensor(a)  # noqa: E731
    expected, last = mamba_selective_scan(t(x).transpose(1, 2), t(dt).transpose(1, 2), t(A), t(B).transpose(1, 2),
                                          t(C).transpose(1, 2), return_last_state=True)
    y, state = selective_scan(*(mx.array(a) for a in (x, dt, A, B, C)), chunk=16)  # 150 tokens: 10 chunks
    assert rel_error(np.array(y), expected.transpose(1, 2).numpy()) < 1e-5
    assert rel_error(np.array(state), last.numpy()) < 1e-5


def test_selective_scan_prefill_then_steps_equal_one_scan():
    x, dt, A, B, C = (mx.array(a) for a in _mamba_inputs(L=40))
    full, _ = selective_scan(x, dt, A, B, C, chunk=8)
    ys, state = selective_scan(x[:, :30], dt[:, :30], A, B[:, :30], C[:, :30], chunk=8)
    parts = [ys]
    for i in range(30, 40):
        y, state = selective_step(x[:, i : i + 1], dt[:, i : i + 1], A, B[:, i : i + 1], C[:, i : i + 1], state)
        parts.append(y)
    assert rel_error(np.array(mx.concatenate(parts, axis=1)), np.array(full)) < 1e-5


def _ssd_inputs(b=2, L=37, h=4, p=3, g=2, n=5):
    x, B, C = _randn(b, L, h, p), _randn(b, L, g, n), _randn(b, L, g, n)
    dt = np.log1p(np.exp(_randn(b, L, h)))
    A = -np.exp(_randn(h, scale=0.5))
    return x, dt, A, B, C


def test_ssd_chunked_matches_transformers_chunk_scan_with_a_starting_state():
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    x, dt, A, B, C = _ssd_inputs()
    state = _randn(2, 4, 3, 5)
    expected, last = mamba2_chunk_scan(*(torch.tensor(a) for a in (x, dt, A, B, C)), chunk_size=8,
                                       initial_states=torch.tensor(state), return_final_states=True)
    y, ours = ssd_chunked(*(mx.array(a) for a in (x, dt, A, B, C)), chunk_size=8, state=mx.array(state))
    assert rel_error(np.array(y), expected.numpy()) < 1e-5
    assert rel_error(np.array(ours), last.numpy()) < 1e-5


def test_ssd_chunked_and_recurrent_forms_agree():
    """The chunked form (chunk 6 < 37 tokens, two groups of heads) and the token-by-token recurrent form."""
    x, dt, A, B, C = (mx.array(a) for a in _ssd_inputs())
    chunked, last = ssd_chunked(x, dt, A, B, C, chunk_size=6)
    state, steps = None, []
    for i in range(x.shape[1]):
        y, state = ssd_step(x[:, i : i + 1], dt[:, i : i + 1], A, B[:, i : i + 1], C[:, i : i + 1], state)
        steps.append(y)
    assert rel_error(np.array(mx.concatenate(steps, axis=1)), np.array(chunked)) < 1e-5
    assert rel_error(np.array(state), np.array(last)) < 1e-5


SSM_TYPES = ("mamba", "falcon_mamba", "mamba2", "bamba", "nemotron_h", "granitemoehybrid", "falcon_h1", "jamba",
             "zamba2")
FIRST = {}
for _case in CASES:
    if _case["model_type"] in SSM_TYPES:
        FIRST.setdefault(_case["model_type"], _case)


@pytest.mark.parametrize("model_type", sorted(FIRST))
def test_state_carried_from_a_prefill_through_decoded_tokens(tmp_path, model_type):
    """A 30-token prefill, then 10 single tokens through the same caches, equals one forward pass over 40 tokens."""
    _, model, config, _ = build_case(tmp_path, FIRST[model_type], "v5")
    tokens = probe_tokens(config["vocab_size"], 40, batch=2, seed=3)
    full = model(mx.array(tokens))
    cache = make_prompt_cache(model)
    parts = [model(mx.array(tokens[:, :30]), cache=cache)]
    parts += [model(mx.array(tokens[:, i : i + 1]), cache=cache) for i in range(30, 40)]
    assert rel_error(np.array(mx.concatenate(parts, axis=1)), np.array(full)) < 1e-4
    assert not any(c.is_trimmable() for c in cache if not hasattr(c, "offset"))


def test_nemotron_h_legacy_config_reads_as_transformers_reads_it():
    """`hybrid_override_pattern` and the old `mamba_*` names (which win over the new ones), as NemotronHConfig."""
    from transformers import NemotronHConfig

    from mlx_arch import nemotron_h

    legacy = {"model_type": "nemotron_h", "hybrid_override_pattern": "M*-E", "mamba_n_groups": 2, "n_groups": 8,
              "mamba_d_conv": 3, "mamba_dt_limit": [0.0, 0.5], "mamba_conv_bias": False, "mamba_chunk_size": 16,
              "num_local_experts": 4}
    theirs = NemotronHConfig(**{k: v for k, v in legacy.items() if k != "model_type"})
    ours = nemotron_h.ModelArgs.from_dict(legacy)
    assert ours.layers_block_type == list(theirs.layers_block_type) == ["linear_attention", "full_attention", "mlp",
                                                                       "moe"]
    for name in ("n_groups", "conv_kernel", "use_conv_bias", "chunk_size", "n_routed_experts"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert list(ours.time_step_limit) == list(theirs.time_step_limit)
    renamed = nemotron_h.ModelArgs.from_dict({"layers_block_type": ["mamba", "attention"]})
    assert renamed.layers_block_type == ["linear_attention", "full_attention"] and renamed.num_hidden_layers == 2


def test_quantized_report_names_the_state_space_parameters_kept_in_float(tmp_path):
    """MLX quantizes only linear and embedding layers: a Mamba model's A_log, D and convolution weights
    stay in the float dtype, and the log and card say so; a plain transformer has nothing to report."""
    from checkpoints import make_checkpoint
    from convert import convert

    src = make_checkpoint(tmp_path / "src", "mamba")
    result = convert(str(src), tmp_path / "out", quantize=True, q_group_size=32, q_method="rtn",
                     skip_validation=True)
    note = next(s for s in result.skipped_layers if "outside linear" in s)
    for name in ("A_log", "D", "Conv1d.weight"):  # Mamba-1: dt is a biased projection, kept float by the model
        assert f"{name} x" in note, note
    assert "outside linear" in (tmp_path / "out" / "README.md").read_text()
    llama = convert(str(make_checkpoint(tmp_path / "llama", "llama")), tmp_path / "l", quantize=True,
                    q_group_size=32, q_method="rtn", skip_validation=True)
    assert not any("outside linear" in s for s in llama.skipped_layers)
