"""Hybrids of state-space and attention layers (jamba, falcon_h1, zamba2): a 30-token prefill and 10 single tokens
equal one forward pass, configs read as transformers reads them, and what each family has of its own."""

import mlx.core as mx
import mlx.nn as nn
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


# --- falcon_h1 ----------------------------------------------------------------------------------------------------


def test_falcon_h1_layer_cache_holds_keys_and_state(tmp_path):
    """Each layer's one cache serves its attention (offset, keys) and its Mamba-2 mixer (conv inputs, state); it
    cannot be rewound, and its state round-trips."""
    from mlx_arch.core.ssm import KVStateCache

    _, model, config, _ = build_case(tmp_path, BY_ID["falcon_h1"], "v5")
    tokens = probe_tokens(config["vocab_size"], 33, batch=2, seed=1)
    _, cache = _prefill_then_steps(model, tokens)
    c = cache[0]
    assert isinstance(c, KVStateCache) and c.offset == 33 and c.recurrent.seen == 33
    assert c.keys.shape[2] >= 33 and c[0].shape[1] == config["mamba_d_conv"] - 1 and c[1].ndim == 4
    assert not c.is_trimmable()
    with pytest.raises(ValueError, match="cannot be rewound"):
        c.trim(1)
    copy = KVStateCache()
    copy.state, copy.meta_state = c.state, c.meta_state
    assert copy.offset == 33 and mx.array_equal(copy[1], c[1])
    assert copy.nbytes == copy.keys.nbytes + copy.values.nbytes + copy[0].nbytes + copy[1].nbytes
    # The next token through the restored caches equals the next token through the originals.
    restored = [KVStateCache() for _ in cache]
    for new, old in zip(restored, cache):
        new.state, new.meta_state = old.state, old.meta_state
    nxt = mx.array(tokens[:, -1:])
    assert mx.array_equal(model(nxt, cache=restored), model(nxt, cache=cache))


def test_falcon_h1_config_reads_as_falcon_h1_config():
    """mamba_d_ssm (None: mamba_expand * hidden_size), mamba_d_head "auto", the multiplier lists' defaults and the
    Hub's keys that transformers ignores (mamba_use_mlp, mlp_expansion_factor), in both config styles."""
    from transformers import FalconH1Config

    from mlx_arch import falcon_h1

    hub = dict(hidden_size=64, num_attention_heads=4, mamba_d_ssm=None, mamba_n_heads=8, mamba_expand=3,
               head_dim=24, rope_theta=1e11, mamba_use_mlp=True, mlp_expansion_factor=8, time_step_min=0.001)
    theirs = FalconH1Config(**hub)
    ours = falcon_h1.ModelArgs.from_dict({"model_type": "falcon_h1", **hub})
    assert ours.mamba_d_ssm == 192 and ours.mamba_d_head == theirs.mamba_d_head == 24
    assert ours.head_dim == theirs.head_dim and ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.mlp_multipliers == theirs.mlp_multipliers and ours.ssm_multipliers == theirs.ssm_multipliers
    v5 = falcon_h1.ModelArgs.from_dict({"model_type": "falcon_h1", "rope_parameters": {"rope_theta": 5.0}})
    assert v5.rope_theta == 5.0 and v5.mamba_d_ssm == 1024 and v5.mamba_d_head == 8
    with pytest.raises(ValueError, match="mamba_d_ssm"):
        falcon_h1.ModelArgs.from_dict({"mamba_d_ssm": 100, "mamba_n_heads": 8, "mamba_d_head": 12})


def test_falcon_h1_multipliers_folded_once_and_given_back(tmp_path):
    """sanitize folds every multiplier into its weights (what mlx-lm reads), leaves folded weights alone, and the
    inverse rules give back the checkpoint's tensors."""
    from mlx_arch.core.weights import apply_rules, inverse

    path, model, _, weights = build_case(tmp_path, BY_ID["falcon_h1"], "v5")
    once = model.sanitize(dict(weights))
    k = "model.layers.0.self_attn.k_proj.weight"
    assert mx.allclose(once[k], weights[k] * 1.3 * 0.8, rtol=1e-6, atol=0)
    assert mx.allclose(once["model.embed_tokens.weight"], weights["model.embed_tokens.weight"] * 1.7)
    assert all(mx.array_equal(v, once[key]) for key, v in model.sanitize(dict(once)).items())
    back = apply_rules(dict(once), inverse(model.weight_rules()))
    assert all(mx.allclose(back[key], weights[key], rtol=1e-6, atol=1e-7) for key in weights)


# --- zamba2 -------------------------------------------------------------------------------------------------------


def _owners(model) -> dict:
    return {i: layer.block for i, layer in enumerate(model.layers) if "shared_transformer" in layer}


def test_zamba2_shared_blocks_are_held_once_and_reused(tmp_path):
    """Two blocks over three hybrid layers (1, 3, 4): layers 1 and 3 own them, layer 4 reuses layer 1's with its own
    adapters; the weights appear once, and quantizing the owner quantizes every use."""
    _, model, _, weights = build_case(tmp_path, BY_ID["zamba2"], "v5")
    owners = _owners(model)
    assert sorted(owners) == [1, 3] and model.layers[4].block is owners[1]
    assert not any(k.startswith("model.layers.4.shared_transformer") for k in weights)
    assert [layer.use for layer in model.layers if layer.kind.attends] == [0, 1, 2]
    assert [len(p) for p in owners[1].feed_forward.gate_up_proj_adapter_list] == [2, 0, 2]
    nn.quantize(model, 32, 4, class_predicate=lambda path, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 32 == 0)
    assert isinstance(model.layers[4].block.self_attn.q_proj, nn.QuantizedLinear)


def test_zamba2_untied_checkpoint_has_a_block_per_hybrid_layer(tmp_path):
    """transformers ties the blocks' later uses only along with the embeddings: untied, each hybrid layer loads its
    own copy (different weights), as transformers does."""
    _, model, _, weights = build_case(tmp_path, BY_ID["zamba2-one-block-bias-untied"], "v5")
    owners = _owners(model)
    assert sorted(owners) == [0, 3] and owners[0] is not owners[3]
    q = "model.layers.{}.shared_transformer.self_attn.q_proj.weight"
    assert not mx.array_equal(weights[q.format(0)], weights[q.format(3)])


def test_zamba2_config_reads_as_zamba2_config():
    """Legacy "mamba" layer names, the 54-layer default, and the widths Zamba2Config derives unless the config
    stores them (it then reads the stored ones: `head_dim` / `attention_head_dim`, `mamba_headdim`)."""
    from transformers import Zamba2Config

    from mlx_arch import zamba2

    hub = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=3, n_mamba_heads=4, mamba_expand=1,
               layers_block_type=["mamba", "hybrid", "mamba"], attention_head_dim=24, mamba_headdim=16)
    theirs = Zamba2Config(**hub)
    ours = zamba2.ModelArgs.from_dict({"model_type": "zamba2", **hub})
    assert ours.layers_block_type == list(theirs.layers_block_type) and ours.hybrid_layers == theirs.hybrid_layer_ids
    assert ours.head_dim == theirs.head_dim == 24 and ours.mamba_headdim == theirs.mamba_headdim == 16
    assert zamba2.ModelArgs.from_dict({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 8}).head_dim == 8
    default = zamba2.ModelArgs.from_dict({"model_type": "zamba2"})
    assert default.layers_block_type == list(Zamba2Config().layers_block_type) and default.num_hidden_layers == 54
    assert default.head_dim == 2 * 2560 // 32 and default.intermediate_size == 4 * 2560
    with pytest.raises(ValueError, match="num_key_value_heads"):
        zamba2.ModelArgs.from_dict({"use_shared_attention_adapter": True, "num_key_value_heads": 8})
    with pytest.raises(ValueError, match="unknown entries"):
        zamba2.ModelArgs.from_dict({"layers_block_type": ["mamba", "attention"]})
