"""MLX's affine format in torch (`convert/affine.py`): rounding gives `mx.quantize`'s bytes and dequantization
`mx.dequantize`'s values, bit for bit, and the pipeline uses them only where they hold."""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

from checkpoints import make_checkpoint
from convert import affine, convert

DTYPES = {"bfloat16": (mx.bfloat16, torch.bfloat16), "float16": (mx.float16, torch.float16),
          "float32": (mx.float32, torch.float32)}


def hard_rows(dtype: str, group_size: int, seed: int) -> np.ndarray:
    """Rows of groups that stress the arithmetic: Gaussian groups of very different sizes, all zeros, a constant,
    one-signed groups (positive and negative, so the scale's sign flips), values on exact half steps (ties of the
    rounding), subnormal values of the dtype, and a group whose minimum is its edge of larger magnitude."""
    rng = np.random.default_rng(seed)
    cols = 4 * group_size
    rows = [rng.standard_normal(cols) * 10.0 ** rng.integers(-3, 2) for _ in range(24)]
    tiny = {"bfloat16": 1e-39, "float16": 3e-6, "float32": 1e-40}[dtype]
    rows += [np.zeros(cols), np.full(cols, 0.3), np.abs(rng.standard_normal(cols)) + 1,
             -np.abs(rng.standard_normal(cols)) - 1, np.arange(cols) % 16 * 0.5 - 3.75,
             rng.standard_normal(cols) * tiny, np.concatenate([[-5.0], rng.standard_normal(cols - 1)])]
    return np.stack(rows).astype(np.float32)


def as_mlx(values: np.ndarray, dtype: str):
    return mx.array(values).astype(DTYPES[dtype][0])


def bits_of(array) -> np.ndarray:
    """An MLX array's bytes as numpy (16-bit floats as their bit patterns)."""
    return np.asarray(array.view(mx.uint16) if array.dtype in (mx.bfloat16, mx.float16) else array)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("bits", affine.BITS)
@pytest.mark.parametrize("group_size", affine.GROUP_SIZES)
def test_rounding_writes_mx_quantize_bytes_and_dequantization_gives_its_values(dtype, bits, group_size):
    w = as_mlx(hard_rows(dtype, group_size, bits * group_size), dtype)
    packed, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    ours = affine.round_affine(affine.torch_view(w), bits, group_size)
    assert ours is not None
    assert np.array_equal(ours[0], np.asarray(packed)), "codes"
    assert np.array_equal(ours[1], bits_of(scales)) and np.array_equal(ours[2], bits_of(biases)), "scales, biases"
    values = affine.dequantize(*(affine.torch_view(a) for a in (packed, scales, biases)), bits, group_size)
    expected = np.asarray(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits).astype(mx.float32))
    assert values.dtype == torch.float32 and np.array_equal(values.numpy().view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_source_that_is_not_finite_is_left_to_mlx(bad):
    """MLX's kernel skips NaN when it takes a group's range, torch would propagate it: such tensors (and infinite
    ones) are rounded by MLX, and save writes MLX's bytes."""
    values = hard_rows("bfloat16", 64, 0)
    values[3, 17] = bad
    w = as_mlx(values, "bfloat16")
    assert affine.round_affine(affine.torch_view(w), 4, 64) is None
    likes = mx.quantize(w, group_size=64, bits=4)
    job = affine.Rounding(w, 4, 64, likes)
    parts = [job.part(k) for k in range(3)]
    assert not job.used_torch
    for ours, theirs in zip(parts, mx.quantize(w, group_size=64, bits=4)):
        assert np.array_equal(ours.view(np.uint8), bits_of(theirs).view(np.uint8))


def test_rounding_waits_for_nothing_while_torch_is_being_imported(monkeypatch):
    """Until torch is imported (`preload` runs on a thread), layers are rounded by MLX: the same bytes."""
    w = as_mlx(hard_rows("float16", 32, 1), "float16")
    results = {}
    for ready in (False, True):
        monkeypatch.setattr(affine, "torch_ready", lambda: ready)
        job = affine.Rounding(w, 3, 32, mx.quantize(w, group_size=32, bits=3))
        results[ready] = [job.part(k) for k in range(3)]
        assert job.used_torch == ready
    for a, b in zip(results[False], results[True]):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_the_gate_reads_the_same_dequantized_weights_from_torch_and_mlx(tmp_path, model_type):
    """The exact-weights reference (`OutputWeights`) and the MLX pass (`layerwise.materialize`) dequantize affine
    layers in torch: the values MLX's own dequantization gives (which the rest of the gate used before). Only
    weights that no rule reshapes go through torch (GPT-2's Conv1D weights are transposed back: MLX's path)."""
    from mlx_arch import load_model
    from mlx_arch.core import quant
    from mlx_arch.core.weights import apply_rules, inverse

    from convert import layerwise
    from convert.reference import CheckpointReader, OutputWeights, float_weights

    src = make_checkpoint(tmp_path / "src", model_type, dtype="bfloat16", num_hidden_layers=2)
    out = convert(str(src), tmp_path / "out", quantize=True, q_method="rtn", q_bits=6, q_group_size=32,
                  skip_validation=True).path
    held = OutputWeights(out, CheckpointReader(src))
    direct = set(held.direct)
    stored = {}
    for f in sorted(out.glob("model*.safetensors")):
        stored.update(mx.load(str(f)))
    expected = apply_rules(float_weights(stored, held.config), inverse(held.rules))
    assert direct and direct <= {k for k in expected if k.endswith(".weight")}
    assert model_type != "gpt2" or not any("c_attn" in k or "c_fc" in k for k in direct)
    for key in sorted(held.held):
        assert np.array_equal(held.get(key).float().numpy(), np.asarray(expected[key].astype(mx.float32))), key

    model, _ = load_model(out, lazy=True)
    expected = {(i, name): np.asarray(quant.dequantized_weight(m)) for i, layer in enumerate(model.layers)
                for name, m in layer.named_modules() if quant.is_quantized(m)}
    layerwise.as_float32(model)
    pending = [m for layer in model.layers for _, m in layer.named_modules()
               if isinstance(getattr(m, "stored", None), layerwise._Stored)]
    assert len(pending) == len(expected) > 0  # every quantized linear layer goes through torch
    scratch = layerwise.Scratch()
    for layer in model.layers:
        layerwise.materialize(layer, scratch)
    for (i, name), values in expected.items():
        twin = dict(model.layers[i].named_modules())[name]
        assert not quant.is_quantized(twin) and np.array_equal(np.asarray(twin.weight), values), (i, name)


def test_a_conversion_without_the_gate_never_imports_torch(tmp_path):
    """Rounding in torch is for runs that import it anyway: importing it costs ~200 MB of resident libraries, which
    a conversion without the gate (`--skip-validation`, round to nearest) does not pay."""
    src = make_checkpoint(tmp_path / "src", "llama", dtype="bfloat16", num_hidden_layers=2)
    assert fresh_process("import sys; from convert import convert; "
                         f"convert({str(src)!r}, {str(tmp_path / 'out')!r}, quantize=True, q_method='rtn', "
                         "skip_validation=True); print('torch' in sys.modules)") == "False"


def test_a_gated_conversion_rounds_while_torch_is_still_being_imported(tmp_path):
    """In a fresh process the gate's torch is imported on a thread while save runs (`affine.preload`): the run
    succeeds and writes the bytes of a run where torch was ready from the start."""
    src = make_checkpoint(tmp_path / "src", "llama", dtype="bfloat16", num_hidden_layers=2)
    printed = fresh_process("from convert import affine, convert; "
                            f"result = convert({str(src)!r}, {str(tmp_path / 'fresh')!r}, quantize=True, "
                            "q_method='rtn'); print(result.validation.passed, bool(affine._IMPORT))")
    assert printed == "True True"  # the gate passed; torch came from the preload thread
    here = convert(str(src), tmp_path / "here", quantize=True, q_method="rtn", skip_validation=True).path
    for name in sorted(p.name for p in here.glob("model*.safetensors")):
        assert (here / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def fresh_process(code: str) -> str:
    """The last line `code` prints in a new interpreter (offline), which must succeed."""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip().splitlines()[-1]
