"""exaone_moe, afmoe and mimo_v2_flash read configs as their transformers config classes do: the layer lists they
derive from other keys when a config lacks them (checkpoints always carry them, so the model cases cannot tell), Hub
keys read or ignored, and what they refuse."""

import pytest
from transformers import AutoConfig

import mlx_arch

SIZES = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=320)


def derived(model_type: str, keys=("layer_types", "mlp_layer_types", "sliding_window"), **config):
    """The derived fields of our ModelArgs and of transformers' config class, for the same config."""
    theirs = AutoConfig.for_model(model_type, **SIZES, **config)
    ours = mlx_arch.get_architecture(model_type).ModelArgs.from_dict({"model_type": model_type, **SIZES, **config})
    return [getattr(ours, k) for k in keys], [getattr(theirs, k) for k in keys]


@pytest.mark.parametrize("config", [dict(num_hidden_layers=7, sliding_window_pattern=3, first_k_dense_replace=2),
                                    dict(num_hidden_layers=5, sliding_window_pattern=1, first_k_dense_replace=0),
                                    dict(num_hidden_layers=4, is_moe_layer=[False, False, True, True])])
def test_exaone_moe_derives_kinds_as_its_config_class(config):
    ours, theirs = derived("exaone_moe", **config)
    assert ours == theirs


def test_exaone_moe_refuses_a_string_pattern_without_layer_types():
    with pytest.raises(ValueError, match="integer sliding_window_pattern"):
        mlx_arch.build_model({"model_type": "exaone_moe", **SIZES, "num_hidden_layers": 2,
                              "sliding_window_pattern": "LLLG"})


@pytest.mark.parametrize("every", [1, 2, 3])
def test_afmoe_global_layers_every_n(every):
    ours, theirs = derived("afmoe", ("layer_types",), num_hidden_layers=6, global_attn_every_n_layers=every)
    assert ours == theirs


@pytest.mark.parametrize("config", [dict(num_hidden_layers=13),
                                    dict(num_hidden_layers=3, sliding_window_size=7,
                                         hybrid_layer_pattern=[1, 1, 0], moe_layer_freq=[1, 1, 1])])
def test_mimo_v2_flash_reads_hub_keys_as_its_config_class(config):
    ours, theirs = derived("mimo_v2_flash", **config)
    assert ours == theirs


def test_mimo_v2_flash_ignores_top_level_rope_keys_like_its_config_class():
    config = dict(num_hidden_layers=2, rope_theta=123.0, swa_rope_theta=45.0, partial_rotary_factor=0.5)
    ours, theirs = derived("mimo_v2_flash", ("rope_parameters",), **config)
    assert ours == theirs


def test_mimo_v2_flash_expert_count_alias_and_null_scaling():
    ours, theirs = derived("mimo_v2_flash", ("n_routed_experts", "routed_scaling_factor"), num_hidden_layers=2,
                           num_local_experts=12, routed_scaling_factor=None)
    assert ours == theirs == [12, 1.0]


def test_mimo_v2_flash_refuses_odd_rotary_dims():
    with pytest.raises(ValueError, match="odd number"):
        mlx_arch.build_model({"model_type": "mimo_v2_flash", **SIZES, "num_hidden_layers": 2, "head_dim": 16})
