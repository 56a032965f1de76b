"""Load stage: bf16/fp16 sources in both formats keep their values exactly; `.bin` sources are read as lazily as
safetensors (through a scratch file that is always removed); a damaged shard or a shard missing from the index is
named in a one-line error and leaves no output."""

import json

import mlx.core as mx
import numpy as np
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
    from_bin = load_weights(b, ["pytorch_model.bin"], scratch=tmp_path)
    assert sorted(from_bin) == sorted(from_safetensors)
    for name, array in from_safetensors.items():
        assert from_bin[name].dtype == array.dtype
        assert mx.array_equal(from_bin[name], array).item(), name


def test_bin_tensors_stay_on_disk_until_used(tmp_path):
    """Loading a `.bin` source allocates nothing: arrays are read when evaluated, like safetensors ones. Views
    (non-contiguous, or sharing storage as tied weights do) keep their values."""
    import torch

    state = {"a": torch.randn(512, 256), "b": torch.randn(256, 512).t(), "c": torch.arange(6, dtype=torch.int64),
             "d": torch.randn(300, 200).to(torch.bfloat16)}
    state["tied"] = state["a"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    mx.clear_cache()
    before = mx.get_active_memory()
    weights = load_weights(tmp_path, ["pytorch_model.bin"], scratch=scratch)
    assert mx.get_active_memory() - before < 64 * 1024  # nothing read yet (the tensors hold ~1.5 MB)
    assert sorted(weights) == ["a", "b", "c", "d", "tied"]
    for name, tensor in state.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        got = weights[name].astype(mx.float32) if tensor.dtype == torch.bfloat16 else weights[name]
        assert weights[name].shape == tuple(tensor.shape)
        assert (np.array(got) == expected).all(), name


def test_bin_conversion_leaves_no_scratch_behind(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama", safe=False, tokenizer=False)
    convert(str(src), tmp_path / "out", skip_validation=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    import torch

    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    del state["model.layers.0.mlp.up_proj.weight"]
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ConvertError, match="model.layers.0.mlp.up_proj.weight"):
        convert(str(src), tmp_path / "failed", skip_validation=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


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
