"""Hybrids of state-space and attention layers (jamba, falcon_h1, zamba2): a 30-token prefill and 10 single tokens
equal one forward pass, configs read as transformers reads them, and what each family has of its own."""

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import make_checkpoint
from convert import convert
from convert_helpers import mlx_lm_logits, ours
from mlx_arch.core.cache import make_prompt_cache
from model_test_runner import CASES, build_case, probe_tokens, rel_error

HYBRIDS = ("jamba", "falcon_h1", "zamba2")
BY_ID = {case["id"]: case for case in CASES}


def _prefill_then_steps(model, tokens, prefill: int = 30):
    cache = make_prompt_cache(model)
    parts = [model(mx.array(tokens[:, :prefill]), cache=cache)]
    parts += [model(mx.array(tokens[:, i : i + 1]), cache=cache) for i in range(prefill, tokens.shape[1])]
    return mx.concatenate(parts, axis=1), cache


@pytest.mark.parametrize("case", [c for c in CASES if c["model_type"] in HYBRIDS], ids=lambda c: c["id"])
def test_prefill_30_then_10_steps_equal_the_full_forward(tmp_path, case):
    _, model, config, _ = build_case(tmp_path, case, "v5")
    kinds = {layer.kind.attends for layer in model.layers}
    assert kinds == {True, False} or case["model_type"] == "falcon_h1", "the case needs both layer kinds"
    tokens = probe_tokens(config["vocab_size"], 40, batch=2, seed=5)
    stepped, _ = _prefill_then_steps(model, tokens)
    assert rel_error(np.array(stepped), np.array(model(mx.array(tokens)))) < 1e-4


# --- jamba ------------------------------------------------------------------------------------------------------


def test_jamba_layer_pattern_reads_as_jamba_config():
    from transformers import JambaConfig

    from mlx_arch import jamba

    keys = dict(num_hidden_layers=7, attn_layer_period=3, attn_layer_offset=2, expert_layer_period=4,
                expert_layer_offset=1, num_local_experts=5, hidden_size=40)
    theirs = JambaConfig(**keys)
    args = jamba.ModelArgs.from_dict({"model_type": "jamba", **keys})
    model = jamba.Model(args)
    assert ["attention" if layer.kind.attends else "mamba" for layer in model.layers] == theirs.layers_block_type
    assert [5 if args.sparse(i) else 1 for i in range(7)] == theirs.layers_num_experts
    assert args.num_experts == theirs.num_experts == 5 and args.mamba_dt_rank == theirs.mamba_dt_rank == 3
    with pytest.raises(ValueError, match="attn_layer_offset"):
        jamba.ModelArgs.from_dict({"attn_layer_period": 2, "attn_layer_offset": 2})


def test_mlx_lm_reads_our_jamba_layout(tmp_path):
    """mlx-lm's router agrees with transformers' only when every expert is chosen: then it must give our logits
    (stacked experts, router, weighted norms, attention without positions)."""
    overrides = {**BY_ID["jamba"]["overrides"], "num_experts_per_tok": 4}
    src = make_checkpoint(tmp_path / "src", "jamba", **overrides)
    out = convert(str(src), tmp_path / "out").path
    tokens = probe_tokens(320, 20)
    assert rel_error(mlx_lm_logits(out, tokens), ours(out, tokens)) <= 1e-4
