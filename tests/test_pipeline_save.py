"""Save stage: shards within --max-shard-size, evaluated one at a time so that peak memory is bounded by the shard
size (not the model size), safetensors metadata and the model card mlx-lm and the Hub read."""

import json

import mlx.core as mx
import numpy as np
import pytest
import yaml
from safetensors import safe_open

import convert.save as save
from checkpoints import make_checkpoint
from convert import convert


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """~17 MB of float32 weights in 1 MB tensors: big enough to tell one tensor from one shard of source data."""
    return make_checkpoint(tmp_path_factory.mktemp("save") / "src", "llama", hidden_size=256, intermediate_size=768,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, vocab_size=1024)


def test_peak_memory_is_bounded_by_one_tensor(wide, tmp_path, monkeypatch):
    peaks, real_write = [], save.stream_safetensors

    def measured_write(path, tensors, *rest):
        written = real_write(path, tensors, *rest)
        peaks.append((written, mx.get_peak_memory()))
        mx.reset_peak_memory()
        return written

    monkeypatch.setattr(save, "stream_safetensors", measured_write)
    shard = 600_000
    mx.clear_cache()
    mx.reset_peak_memory()
    # 4-bit output of float32 weights: one output shard stands for ~8x its size of source data. Rounded to nearest:
    # the calibrated methods compute each layer before saving (their memory is test_calibrate's).
    result = convert(str(wide), tmp_path / "out", quantize=True, q_group_size=32, max_shard_size=shard,
                     skip_validation=True, q_method="rtn")
    largest_source_tensor = 768 * 256 * 4
    assert len(peaks) > 3
    for written, peak in peaks:
        # Streaming: one output tensor plus its sources at a time, less than the shard itself.
        assert written <= shard and peak <= 3 * largest_source_tensor, (written, peak)
    files = sorted(result.path.glob("model-*.safetensors"))
    assert len(files) == len(peaks) and all(f.stat().st_size <= shard + 20_000 for f in files)

    # One shard holding everything: the peak still stays at a few tensors, far below the shard.
    peaks.clear()
    mx.clear_cache()
    mx.reset_peak_memory()
    convert(str(wide), tmp_path / "one", max_shard_size=1 << 30, skip_validation=True)
    (written, peak), = peaks
    assert peak <= 3 * largest_source_tensor < written / 2, (written, peak)


def test_shards_carry_mlx_metadata_and_the_index_matches(wide, tmp_path):
    out = convert(str(wide), tmp_path / "out", max_shard_size=4 << 20, skip_validation=True).path
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total = 0
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(out / name, "np") as f:
            assert f.metadata() == {"format": "mlx"}
            assert all(index["weight_map"][k] == name for k in f.keys())
            total += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert index["metadata"]["total_size"] == total


def test_single_file_when_it_fits(wide, tmp_path):
    out = convert(str(wide), tmp_path / "out", skip_validation=True).path
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()) == {
        "model.safetensors"}


def test_model_card(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama")
    (src / "README.md").write_text("---\nlicense: apache-2.0\ntags: [chat]\n---\n# Source card\n")
    (src / "LICENSE").write_text("Apache License 2.0\n")
    result = convert(str(src), tmp_path / "out", quant_recipe="mixed_4_6")
    card = (result.path / "README.md").read_text()
    meta = yaml.safe_load(card.split("---", 2)[1])
    assert meta["library_name"] == "mlx" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation" and meta["tags"][0] == "mlx" and "chat" in meta["tags"]
    assert "mixed_4_6" in card and "Source revision" in card and "from mlx_lm import load" in card
    assert "| result | passed |" in card
    assert (result.path / "LICENSE").read_bytes() == (src / "LICENSE").read_bytes()


def test_identical_runs_write_identical_bytes(tmp_path):
    """Same input, same arguments: every output file is byte-identical (no timestamps, timings or random order),
    the model card and validation.json included."""
    src = make_checkpoint(tmp_path / "src", "qwen2", dtype="bfloat16")
    out = tmp_path / "out"
    convert(str(src), out, quantize=True, q_group_size=32)
    first = {f.name: f.read_bytes() for f in out.iterdir()}
    convert(str(src), out, quantize=True, q_group_size=32, overwrite=True)
    second = {f.name: f.read_bytes() for f in out.iterdir()}
    assert sorted(first) == sorted(second) and "validation.json" in first and "README.md" in first
    assert [name for name in first if first[name] != second[name]] == []


def test_lookahead_starts_later_layers_within_the_memory_budget(tmp_path, monkeypatch):
    """While a layer is written the next ones are computed, a whole layer at a time, but two large layers are never
    in flight together (the budget is 1.25x the shard's largest layer), and every byte is as written without it."""
    started = []
    real_async_eval = mx.async_eval
    monkeypatch.setattr(save.mx, "async_eval", lambda arrays: (started.append([a.nbytes for a in arrays]),
                                                               real_async_eval(arrays)))
    monkeypatch.setattr(save.os, "cpu_count", lambda: 2)  # one layer ahead
    sizes = {"a": 4000, "b": 4000, "c": 1000, "d": 1000, "e": 1000}  # float32 elements of each layer's weight
    arrays = {f"{name}.{part}": mx.arange(n // (1 if part == "weight" else 8), dtype=mx.float32) * (i + 1)
              for i, (name, n) in enumerate(sizes.items()) for part in ("scales", "weight")}
    tensors = sorted(arrays.items())
    expected = b"".join(np.asarray(a).tobytes() for _, a in tensors)
    path = tmp_path / "shard.safetensors"
    save.stream_safetensors(path, list(tensors))
    # a and b (18 KB each with their scales; budget 22.5 KB) one after the other: b is never started ahead; c, d and
    # e (4.5 KB) each started, scales and weight together, while the layer before is written
    assert started == [[125 * 4, 1000 * 4]] * 3, started
    with safe_open(str(path), "np") as f:
        assert b"".join(f.get_tensor(name).tobytes() for name, _ in tensors) == expected
