"""Load stage: bf16/fp16 sources in both formats keep their values exactly; a damaged shard or a shard missing
from the index is named in a one-line error and leaves no output."""

import json

import mlx.core as mx
import pytest

from checkpoints import make_checkpoint
from convert import ConvertError, convert
from convert.load import load_weights
from convert_helpers import mlx_lm_logits, ours, reference, rel_error


@pytest.mark.parametrize("dtype,safe", [("bfloat16", False), ("float16", True)], ids=["bf16-bin", "fp16-safetensors"])
def test_half_precision_sources_are_read_exactly(tmp_path, dtype, safe):
    src = make_checkpoint(tmp_path / "src", "llama", dtype=dtype, safe=safe)
    result = convert(str(src), tmp_path / "out")
    assert json.loads((result.path / "config.json").read_text())["dtype"] == dtype
    # The reference upcasts the same half-precision weights: only float32 activations differ from ours.
    assert rel_error(ours(result.path), reference(src)) <= 1e-4
    assert rel_error(mlx_lm_logits(result.path), ours(result.path)) == 0


def test_bin_and_safetensors_give_the_same_arrays(tmp_path):
    a = make_checkpoint(tmp_path / "a", "llama", dtype="bfloat16", tokenizer=False)
    b = make_checkpoint(tmp_path / "b", "llama", dtype="bfloat16", safe=False, tokenizer=False)
    from_safetensors = load_weights(a, ["model.safetensors"])
    from_bin = load_weights(b, ["pytorch_model.bin"])
    assert sorted(from_bin) == sorted(from_safetensors)
    for name, array in from_safetensors.items():
        assert from_bin[name].dtype == array.dtype
        assert mx.array_equal(from_bin[name], array).item(), name


@pytest.fixture
def sharded(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama", shard_size="100KB", tokenizer=False)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return src, sorted(set(index["weight_map"].values()))


def refuse(src, tmp_path, match):
    with pytest.raises(ConvertError, match=match) as info:
        convert(str(src), tmp_path / "out", skip_validation=True)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_truncated_shard_is_named(sharded, tmp_path):
    src, shards = sharded
    data = (src / shards[1]).read_bytes()
    (src / shards[1]).write_bytes(data[:-7])
    refuse(src, tmp_path, f"{shards[1]} is truncated or corrupt")


def test_shard_missing_from_the_folder_is_named(sharded, tmp_path):
    src, shards = sharded
    (src / shards[-1]).unlink()
    refuse(src, tmp_path, f"{shards[-1]} is listed by the index but missing")
