"""convert.convert() on tiny checkpoints of every source layout: the output loads in our loader and in mlx-lm
with the same logits, and float32 outputs match transformers."""

import json

import mlx.core as mx
import pytest

from checkpoints import make_checkpoint
from convert import convert
from convert_helpers import mlx_lm_logits, ours, reference, rel_error

SOURCES = {
    "single-v5": dict(rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
    "single-v4": dict(style="v4", rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
    "sharded": dict(shard_size="100KB"),
    "bin": dict(safe=False),
    "tied": dict(tie_word_embeddings=True),
    "llama3-v5": dict(max_position_embeddings=64, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_float32_conversion_matches_transformers_and_mlx_lm(tmp_path, name):
    src = make_checkpoint(tmp_path / "src", "llama", **SOURCES[name])
    result = convert(str(src), tmp_path / "out")
    assert result.validation.passed
    expected = reference(src)
    assert rel_error(ours(result.path), expected) <= 1e-4
    assert rel_error(mlx_lm_logits(result.path), expected) <= 1e-4
    if name == "sharded":
        assert len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]) > 0


def test_bf16_source_keeps_its_dtype_and_is_exact(tmp_path):
    src = make_checkpoint(tmp_path / "src", "qwen2", dtype="bfloat16")
    result = convert(str(src), tmp_path / "out")
    config = json.loads((result.path / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert result.validation.logits["max_rel_error"] <= 1e-4  # the reference upcasts the same bf16 weights
    assert abs(result.bits_per_weight - 16) < 0.01
    assert rel_error(mlx_lm_logits(result.path), ours(result.path)) == 0


def test_dtype_flag_casts(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama")
    result = convert(str(src), tmp_path / "out", dtype="float16")
    assert json.loads((result.path / "config.json").read_text())["dtype"] == "float16"
    assert result.validation.passed and result.validation.precision == "float16"
    assert 0 < max(result.validation.float16_max_abs) < 65504  # the float16 pass ran and stayed in range


def test_output_layout_and_config(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama", rope_parameters={"rope_type": "default", "rope_theta": 5e4})
    out = convert(str(src), tmp_path / "out", quantize=True, max_shard_size=60_000).path
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    stored = [v for f in shards for v in mx.load(str(out / f)).values()]
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in stored)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["rope_theta"] == 5e4  # transformers-4 key written for mlx-lm
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mlx") and "| result | passed |" in card
    assert not list(tmp_path.glob(".out.partial-*"))


def test_dequantize_round_trip(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama")
    quantized = convert(str(src), tmp_path / "q", quantize=True, q_bits=8, q_group_size=32)
    floats = convert(str(quantized.path), tmp_path / "f", dequantize=True, skip_validation=True)
    config = json.loads((floats.path / "config.json").read_text())
    assert "quantization" not in config
    assert rel_error(ours(floats.path), ours(quantized.path)) <= 1e-5


def test_untied_head_without_the_key_stays_untied_in_mlx_lm(tmp_path):
    """transformers' llama defaults to an untied head; mlx-lm assumes tied when the key is absent."""
    src = make_checkpoint(tmp_path / "src", "llama")
    config = json.loads((src / "config.json").read_text())
    del config["tie_word_embeddings"]
    (src / "config.json").write_text(json.dumps(config))
    result = convert(str(src), tmp_path / "out")
    assert json.loads((result.path / "config.json").read_text())["tie_word_embeddings"] is False
    assert rel_error(mlx_lm_logits(result.path), reference(src)) <= 1e-4
