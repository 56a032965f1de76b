"""What the shared runner does not reach for LongCat-Flash: the parity cases route tokens to zero (identity) experts
and depend on both LoRA scales (so parity proves them), Hub configs with or without the `mla_scale_*` flags read as
transformers reads them, the layer count and key aliases resolved as LongcatFlashConfig resolves them, what
transformers cannot run refused with a message, multi-token-prediction weights dropped by declaration, and the
two-cache layers trimmed together."""

import json

import mlx.core as mx
import numpy as np
import pytest
from transformers import LongcatFlashConfig

import mlx_arch
from mlx_arch.core.cache import CacheList, make_prompt_cache, trim_prompt_cache
from mlx_arch.core.weights import dropped
from mlx_arch.longcat_flash import ZeroExpertMoE
from model_test_runner import CASES, build_case, check_parity, load_hf_folder, probe_tokens, rel_error

BY_ID = {case["id"]: case for case in CASES}
CASE = BY_ID["longcat_flash"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path, model, config, weights = build_case(tmp_path_factory.mktemp("longcat"), CASE, "v5")
    return path, model, probe_tokens(config["vocab_size"], CASE["seq_len"])


def test_router_picks_zero_experts_and_they_change_the_logits(built, monkeypatch):
    path, model, tokens = built
    chosen = []
    route = ZeroExpertMoE.__call__

    def spy(self, x):
        indices, _ = self.route(self.router(x), correction_bias=self.router.e_score_correction_bias)
        chosen.append(np.array(indices >= self.num_experts).reshape(-1, indices.shape[-1]))
        return route(self, x)

    monkeypatch.setattr(ZeroExpertMoE, "__call__", spy)
    check_parity(path, model, tokens)
    zero = np.concatenate(chosen)
    assert zero.any() and not zero.all(), "the case must route some slots to zero experts and some to real ones"

    def without_identity(self, x):  # the zero experts computing nothing instead of their input
        indices, weights = self.route(self.router(x), correction_bias=self.router.e_score_correction_bias)
        identity = indices >= self.num_experts
        y = self.switch_mlp(x, mx.where(identity, 0, indices))
        return (y * mx.where(identity, 0.0, weights)[..., None]).sum(axis=-2)

    monkeypatch.setattr(ZeroExpertMoE, "__call__", without_identity)
    with pytest.raises(AssertionError, match="logits differ"):
        check_parity(path, model, tokens)


@pytest.mark.parametrize("scale", ["q_scale", "latent_scale"])
def test_each_lora_scale_changes_the_logits(built, scale):
    path, model, tokens = built
    attentions = [attn for layer in model.layers for attn in layer.self_attn]
    kept = [getattr(attn, scale) for attn in attentions]
    assert all(k != 1.0 for k in kept)
    try:
        for attn in attentions:
            setattr(attn, scale, 1.0)
        with pytest.raises(AssertionError, match="logits differ"):
            check_parity(path, model, tokens)
    finally:
        for attn, k in zip(attentions, kept):
            setattr(attn, scale, k)


# The keys LongCat-Flash's Hub configs carry beside transformers' (written by its remote code, which scaled only when
# the flags were true); transformers 5.25 accepts and ignores them, always scaling.
HUB_KEYS = {"attention_method": "MLA", "zero_expert_type": "identity", "norm_topk_prob": False, "router_bias": False}


@pytest.mark.parametrize("flags", [None, True, False], ids=["without-flags", "flags-true", "flags-false"])
def test_hub_configs_with_or_without_mla_scale_flags(tmp_path, flags):
    path, _, config, _ = build_case(tmp_path, CASE, "v4")
    hub = {**config, **HUB_KEYS}
    if flags is not None:
        hub.update(mla_scale_q_lora=flags, mla_scale_kv_lora=flags)
    (path / "config.json").write_text(json.dumps(hub))
    model, _, _ = load_hf_folder(path)
    check_parity(path, model, probe_tokens(config["vocab_size"], CASE["seq_len"]))


LAYER_CONFIGS = [{"num_layers": 3}, {"num_hidden_layers": 6}, {"num_layers": 3, "num_hidden_layers": 4},
                 {"num_hidden_layers": 5}]


@pytest.mark.parametrize("layers", LAYER_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_layer_count_and_aliases_read_as_the_config_class(layers):
    small = dict(hidden_size=64, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, head_dim=8, v_head_dim=8, n_routed_experts=4, zero_expert_num=2, moe_topk=2)
    aliases = dict(ffn_hidden_size=40, intermediate_size=48, expert_ffn_hidden_size=24, moe_intermediate_size=16,
                   n_routed_experts=4, num_local_experts=6, moe_topk=2, num_experts_per_tok=3)
    config = {**small, **aliases, **layers}
    theirs = LongcatFlashConfig(**config)
    model = mlx_arch.build_model({"model_type": "longcat_flash", **config})
    a = model.args
    assert len(model.layers) == a.num_layers == theirs.num_layers
    assert (a.ffn_hidden_size, a.expert_ffn_hidden_size, a.n_routed_experts, a.moe_topk) == \
        (theirs.ffn_hidden_size, theirs.expert_ffn_hidden_size, theirs.n_routed_experts, theirs.moe_topk)


@pytest.mark.parametrize("change,message", [
    ({"q_lora_rank": None}, "set q_lora_rank"),
    ({"num_key_value_heads": 2}, "num_key_value_heads .2. must equal num_attention_heads .4."),
    ({"head_dim": 16}, r"head_dim \(16\) .* qk_rope_head_dim \(8\)"),
    ({"qk_head_dim": 20}, r"qk_head_dim \(20\) must be"),
])
def test_what_transformers_cannot_run_is_refused(change, message):
    config = {"model_type": "longcat_flash", **CASE["overrides"], **change}
    with pytest.raises(ValueError, match=message):
        mlx_arch.build_model(config)


def test_mtp_weights_are_dropped_by_declaration(built):
    _, model, _ = built
    mtp = {"model.mtp.layers.0.eh_proj.weight": mx.zeros((4, 4)), "model.mtp.norm.weight": mx.zeros((4,)),
           "model.mtp.layers.0.mlp.router.e_score_correction_bias": mx.zeros((4,))}
    assert all(dropped(model.weight_rules(), k) for k in mtp)
    assert not dropped(model.weight_rules(), "model.layers.0.mlp.router.e_score_correction_bias")
    assert not set(model.sanitize(dict(mtp)))


def test_both_attention_caches_trim_together(built):
    _, model, tokens = built
    cache = make_prompt_cache(model)
    assert all(isinstance(c, CacheList) and len(c) == 2 for c in cache)
    model(mx.array(tokens[:, :12]), cache=cache)
    assert trim_prompt_cache(cache, 4) == 4 and all(k.offset == 8 for c in cache for k in c.caches)
    steps = model(mx.array(tokens[:, 8:]), cache=cache)
    assert rel_error(steps, model(mx.array(tokens))[:, 8:]) <= 1e-4
