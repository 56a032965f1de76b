"""Quantization modes and recipes: the config mlx-lm reads, per-layer bits, reported skips, and mlx-lm loading
the result with our logits."""

import json

import mlx.core as mx
import pytest

from checkpoints import make_checkpoint
from convert import ConvertError, convert
from convert_helpers import mlx_lm_logits, ours, rel_error


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("q") / "src", "llama", dtype="bfloat16", num_hidden_layers=8,
                           tie_word_embeddings=True)


@pytest.mark.parametrize("mode,bits,group", [("affine", 2, 32), ("affine", 3, 64), ("affine", 4, 64),
                                             ("affine", 5, 32), ("affine", 6, 64), ("affine", 8, 32),
                                             ("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
def test_mode_loads_in_mlx_lm_with_our_logits(source, tmp_path, mode, bits, group):
    kwargs = dict(q_bits=bits, q_group_size=group) if mode == "affine" else {}
    result = convert(str(source), tmp_path / "out", quantize=True, q_mode=mode, **kwargs)
    config = json.loads((result.path / "config.json").read_text())
    assert config["quantization"] == {"group_size": group, "bits": bits, "mode": mode}
    assert result.validation.passed, result.validation.failures
    assert bits < result.bits_per_weight < bits + 1.1
    assert rel_error(mlx_lm_logits(result.path), ours(result.path)) <= 1e-6


def test_mixed_recipe_gives_sensitive_layers_more_bits(source, tmp_path):
    result = convert(str(source), tmp_path / "out", quant_recipe="mixed_3_6")
    quant = json.loads((result.path / "config.json").read_text())["quantization"]
    assert quant["bits"] == 3
    assert quant["model.embed_tokens"]["bits"] == 6  # tied: it is the output head too
    assert quant["model.layers.0.self_attn.v_proj"]["bits"] == 6
    assert quant["model.layers.7.mlp.down_proj"]["bits"] == 6
    assert quant["model.layers.3.self_attn.v_proj"]["bits"] == 6  # every third layer between the edges
    assert "model.layers.2.self_attn.v_proj" not in quant and "model.layers.0.self_attn.q_proj" not in quant
    weights = mx.load(str(result.path / "model.safetensors"))
    assert weights["model.layers.0.self_attn.v_proj.weight"].shape[-1] == 16 * 6 // 32 * 2 * 2  # 64 inputs at 6 bits
    assert rel_error(mlx_lm_logits(result.path), ours(result.path)) <= 1e-6


def test_indivisible_layers_are_kept_and_reported(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama", hidden_size=96, head_dim=24)
    result = convert(str(src), tmp_path / "out", quantize=True, q_group_size=64)
    quant = json.loads((result.path / "config.json").read_text())["quantization"]
    assert any("not a multiple of group size 64" in s for s in result.skipped_layers)
    assert quant["model.layers.0.self_attn.q_proj"] is False
    assert "model.layers.0.mlp.down_proj" not in quant  # 128 inputs: quantized
    card = (result.path / "README.md").read_text()
    assert "Kept in full precision: model.embed_tokens" in card or "Kept in full precision" in card
    assert rel_error(mlx_lm_logits(result.path), ours(result.path)) <= 1e-6


@pytest.mark.parametrize("options,message", [
    (dict(quantize=True, q_bits=7), "--q-bits 7 is not supported"),
    (dict(quantize=True, q_group_size=48), "--q-group-size 48"),
    (dict(quantize=True, q_mode="mxfp4", q_bits=8), "mxfp4 fixes 4 bits"),
    (dict(quant_recipe="mixed_9_9"), "unknown"),
    (dict(quantize=True, dequantize=True), "exclude each other"),
])
def test_invalid_settings_are_refused_before_work(tmp_path, options, message):
    with pytest.raises(ConvertError, match=message):
        convert("no/such-repo", tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()
