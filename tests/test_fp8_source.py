"""FP8 block-scaled sources (`quant_method: fp8`, DeepSeek-V3 and the `-FP8` releases; mlx_arch/core/fp8.py).

The FP8 checkpoints are built here from tiny random ones, quantized the way the releases store them: every Linear
weight outside `modules_to_not_convert` as float8_e4m3fn codes with one float32 `weight_scale_inv` per 128x128 block
(max |w| / 448), the last blocks ragged where a dimension is not a multiple of 128. Their "float version" is the same
checkpoint with each weight dequantized here, in torch, and no quantization_config: what the FP8 checkpoint means.
A conversion of the FP8 checkpoint must compute what transformers computes with the float version."""

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from convert import convert
from convert.cli import cli
from convert.errors import ConvertError
from convert.reference import CheckpointReader
from convert_helpers import TOKENS, ours, reference, rel_error
from model_test_runner import CASES
from mlx_arch.core import fp8

BLOCK = 128
# DeepSeek-V3's quantization_config, plus a skip list naming the head (stored in bfloat16, without scales)
RELEASE_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                 "weight_block_size": [BLOCK, BLOCK], "modules_to_not_convert": ["lm_head"]}
# hidden 192 = 1.5 blocks, intermediate 320 = 2.5 blocks: ragged last blocks, and more than one block per weight.
RAGGED = dict(hidden_size=192, intermediate_size=320)
NOT_CONVERTED = ("lm_head", "mlp.gate")  # kept in float by the releases (the head; MoE routers)


def block_scales(w: torch.Tensor) -> torch.Tensor:
    """One scale per 128x128 block (ragged at the ends): max |w| / 448, as DeepSeek's FP8 cast stores them."""
    rows, cols = w.shape
    padded = torch.zeros(-(-rows // BLOCK) * BLOCK, -(-cols // BLOCK) * BLOCK)
    padded[:rows, :cols] = w.abs()
    amax = padded.unflatten(1, (-1, BLOCK)).unflatten(0, (-1, BLOCK)).amax(dim=(1, 3))
    return torch.where(amax > 0, amax / torch.finfo(torch.float8_e4m3fn).max, torch.ones_like(amax))


def per_element(scales: torch.Tensor, shape) -> torch.Tensor:
    return scales.repeat_interleave(BLOCK, 0)[: shape[0]].repeat_interleave(BLOCK, 1)[:, : shape[1]]


def quantized(key: str, w: torch.Tensor) -> bool:
    module = key.rsplit(".", 1)[0]
    return (key.endswith(".weight") and w.ndim == 2 and "embed" not in key
            and not any(module == m or module.endswith("." + m) for m in NOT_CONVERTED))


def fp8_release(src, dst, float_dst=None):
    """`src` as an FP8 block-scaled release in `dst`; its dequantized float version in `float_dst`."""
    weights = load_file(src / "model.safetensors")
    stored, floats = {}, {}
    for key, w in weights.items():
        w = w.float()
        if not quantized(key, w):
            stored[key] = floats[key] = w.to(torch.bfloat16)  # the releases' float parts are bf16
            continue
        scales = block_scales(w)
        codes = (w / per_element(scales, w.shape)).to(torch.float8_e4m3fn)
        stored[key], stored[key + "_scale_inv"] = codes, scales
        floats[key] = codes.float() * per_element(scales, w.shape)
    for folder, tensors, quant in ((dst, stored, RELEASE_QUANT), (float_dst, floats, None)):
        if folder is None:
            continue
        shutil.copytree(src, folder)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config.pop("quantization_config", None)
        config.update({"dtype": "bfloat16"}, **({"quantization_config": quant} if quant else {}))
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def release(request, tmp_path_factory):
    """(FP8 folder, float version) of a tiny checkpoint with ragged blocks."""
    tmp = tmp_path_factory.mktemp(f"fp8-{request.param}")
    src = make_checkpoint(tmp / "src", request.param, **RAGGED)
    return fp8_release(src, tmp / "fp8", tmp / "float"), tmp / "float"


# --- the format -----------------------------------------------------------------------------------------------


def test_e4m3_codes_decode_as_torch_does():
    codes = np.arange(256, dtype=np.uint8)
    ours_ = np.array(fp8.dequantize(mx.array(codes).reshape(1, 256), mx.ones((1, 2)), (BLOCK, BLOCK)))[0]
    theirs = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(ours_, theirs, equal_nan=True)
    assert np.array_equal(np.signbit(ours_), np.signbit(theirs))  # -0 stays -0


def test_block_scales_follow_the_config_with_ragged_last_blocks():
    """Stacked experts (e, 200, 300): 2 x 3 blocks each, the last of each row and column partial."""
    w = torch.randn(3, 200, 300)
    scales = torch.rand(3, 2, 3) + 0.5
    codes = w.to(torch.float8_e4m3fn)
    expected = codes.float() * torch.stack([per_element(s, (200, 300)) for s in scales])
    got = fp8.dequantize(mx.array(codes.view(torch.uint8).numpy()), mx.array(scales.numpy()), (BLOCK, BLOCK))
    assert np.array_equal(np.array(got), expected.numpy())
    assert fp8.scale_shape((3, 200, 300), (BLOCK, BLOCK)) == (3, 2, 3)
    # weight_block_size null: one scale per tensor
    per_tensor = fp8.dequantize(mx.array(codes[0].view(torch.uint8).numpy()), mx.array([0.25]), None)
    assert np.array_equal(np.array(per_tensor), codes[0].float().numpy() * 0.25)


def test_the_gate_reads_the_source_dequantized(release):
    """The reference side answers to each weight with its dequantized value, and hides the scales."""
    folder, float_folder = release
    reader, floats = CheckpointReader(folder), load_file(float_folder / "model.safetensors")
    assert not any(k.endswith("_scale_inv") for k in reader.keys()) and set(reader.keys()) == set(floats)
    for key, expected in floats.items():
        assert torch.equal(reader.get(key).float(), expected.float()), key


# --- through the pipeline -------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,bound", [(dict(dtype="float32"), 1e-4), (dict(quantize=True, q_group_size=64), None)])
def test_converts_to_its_dequantized_float_version(release, tmp_path, options, bound):
    folder, float_folder = release
    result = convert(str(folder), tmp_path / "out", **options)
    assert result.validation.passed, result.validation.failures
    config = json.loads((result.path / "config.json").read_text())
    assert config.get("quantization_config", {}).get("quant_method") is None
    stored = mx.load(str(result.path / "model.safetensors"))
    assert not any(k.endswith(("_scale_inv", "activation_scale")) for k in stored)
    expected = reference(float_folder)
    if bound is not None:
        assert rel_error(ours(result.path), expected) <= bound
    else:  # 4 bits: the same output as quantizing the float version (the gate measured the cost against it)
        twin = convert(str(float_folder), tmp_path / "twin", skip_validation=True, **options)
        theirs = mx.load(str(twin.path / "model.safetensors"))
        assert stored.keys() == theirs.keys() and all(mx.array_equal(stored[k], theirs[k]) for k in stored)
    if options.get("dtype") == "float32":  # the gate's reference read the very values our loader computed
        assert result.validation.weights["worst_rel_error"] == 0.0


def test_the_cli_converts_an_fp8_release_to_its_bfloat16(release, tmp_path):
    """The releases' dtype (bfloat16) is the default output: the float version's logits within bfloat16 rounding."""
    folder, float_folder = release
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["--hf-path", str(folder), "--mlx-path", str(out)])
    assert result.exit_code == 0, result.output
    assert "Validation: passed" in result.stdout
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert mx.load(str(out / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].dtype == mx.bfloat16
    assert rel_error(ours(out), reference(float_folder)) <= 3e-2


def test_a_pickled_fp8_checkpoint_converts_too(release, tmp_path):
    """`.bin` sources are rewritten as safetensors before loading: the float8 tensors keep their dtype there."""
    folder, float_folder = release
    pickled = tmp_path / "bin"
    shutil.copytree(folder, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    result = convert(str(pickled), tmp_path / "out", dtype="float32")
    assert result.validation.passed, result.validation.failures
    assert rel_error(ours(result.path), reference(float_folder)) <= 1e-4


def test_transformers_own_fp8_loading_agrees_on_whole_blocks(tmp_path):
    """Where every dimension is a multiple of 128, transformers' own FP8 loader (it dequantizes on a machine without
    FP8 kernels) gives the logits of our conversion. On ragged blocks it refuses (next test)."""
    from transformers import AutoModelForCausalLM

    src = make_checkpoint(tmp_path / "src", "llama", hidden_size=256, intermediate_size=384)
    folder = fp8_release(src, tmp_path / "fp8")
    out = convert(str(folder), tmp_path / "out", dtype="float32", skip_validation=True).path
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS)).logits.numpy()
    assert rel_error(ours(out), theirs) <= 1e-4


def test_transformers_load_time_dequantization_refuses_ragged_blocks(release):
    """Recorded disagreement: transformers' `Fp8Dequantize` (from_pretrained without FP8 kernels) derives the block
    from the scale grid (rows / grid rows), so a ragged grid is refused (or, where the division happens to be
    exact, mis-scaled); its FP8Linear kernels and `_dequantize_fp8_weight` take the block from the config, as
    DeepSeek's reference does. The gate and the converter follow FP8Linear. If this starts passing, transformers
    reads ragged FP8 blocks at load: compare with it directly."""
    from transformers import AutoModelForCausalLM

    with pytest.raises((ValueError, RuntimeError), match="scale grid|conversion"):
        AutoModelForCausalLM.from_pretrained(release[0], dtype=torch.float32)


# --- DeepSeek-V3: the family the releases come from -------------------------------------------------------------

DEEPSEEK = {**next(c for c in CASES if c["id"] == "deepseek_v3")["overrides"], **RAGGED}


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """Latent attention (kv_a_proj_with_mqa 48 x 192, kv_b_proj 256 x 32, ...), routed and shared experts, a dense
    first layer; the router weights stay in float as in the release."""
    tmp = tmp_path_factory.mktemp("fp8-deepseek")
    src = make_checkpoint(tmp / "src", "deepseek_v3", **DEEPSEEK)
    return fp8_release(src, tmp / "fp8", tmp / "float"), tmp / "float"


@pytest.mark.parametrize("options", [dict(dtype="float32"), dict(quantize=True, q_group_size=32)])
def test_deepseek_v3_converts_to_its_dequantized_float_version(deepseek, tmp_path, options):
    folder, float_folder = deepseek
    assert "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv" in load_file(folder / "model.safetensors")
    result = convert(str(folder), tmp_path / "out", **options)
    assert result.validation.passed, result.validation.failures
    if not options.get("quantize"):
        assert rel_error(ours(result.path), reference(float_folder)) <= 1e-4
        assert result.validation.weights["worst_rel_error"] == 0.0


# --- memory ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type,wide", [
    ("llama", dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8)),
    ("deepseek_v3", {**DEEPSEEK, "hidden_size": 512, "moe_intermediate_size": 384, "first_k_dense_replace": 0}),
])
def test_memory_stays_bounded_by_a_layer(tmp_path, model_type, wide):
    """Dequantizing is lazy, one tensor when it is saved: converting 4 layers peaks no higher than converting 1,
    and below one layer's weights in float32."""
    peaks, layer_bytes = {}, None
    for layers in (1, 4):
        src = make_checkpoint(tmp_path / f"src{layers}", model_type, tokenizer=False,
                              **{**wide, "num_hidden_layers": layers})
        layer_bytes = sum(w.numel() * 4 for k, w in load_file(src / "model.safetensors").items()
                          if k.startswith("model.layers.0."))
        folder = fp8_release(src, tmp_path / f"fp8-{layers}")
        for options in ({}, dict(quantize=True, q_group_size=64)):
            mx.clear_cache()
            mx.reset_peak_memory()
            convert(str(folder), tmp_path / f"out{layers}{len(options)}", skip_validation=True, **options)
            peaks[layers, len(options)] = mx.get_peak_memory()
    for quantize in (0, 2):
        assert peaks[4, quantize] <= 1.1 * peaks[1, quantize], peaks
        assert peaks[4, quantize] < layer_bytes, (peaks, layer_bytes)


# --- bad input ------------------------------------------------------------------------------------------------


def edited(release, tmp_path, edit):
    folder = tmp_path / "edited"
    shutil.copytree(release[0], folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_missing_scale_is_named(release, tmp_path):
    folder = edited(release, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale_inv"))
    with pytest.raises(ConvertError) as e:
        convert(str(folder), tmp_path / "out", skip_validation=True)
    message = str(e.value)
    assert "\n" not in message and "model.layers.1.mlp.up_proj.weight_scale_inv are missing" in message


def test_a_scale_of_the_wrong_shape_is_named(release, tmp_path):
    key = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    folder = edited(release, tmp_path, lambda t: t.update({key: t[key][:1]}))
    result = CliRunner().invoke(cli, ["--hf-path", str(folder), "--mlx-path", str(tmp_path / "out")])
    assert result.exit_code == 1
    line, = result.output.strip().splitlines()[-1:]
    assert line.startswith("Error: FP8 checkpoint: ") and f"{key} has shape (1, 2); " in line and "needs (" in line


@pytest.mark.parametrize("change,message", [
    ({"weight_block_size": [128]}, "weight_block_size [128] is not two positive integers"),
    ({"scale_fmt": "ue8m0"}, "scale_fmt 'ue8m0'"),
])
def test_unreadable_fp8_configs_are_refused_before_loading(release, tmp_path, change, message):
    folder = tmp_path / "edited"
    shutil.copytree(release[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvertError, match=re.escape(message)):
        convert(str(folder), tmp_path / "out", skip_validation=True)


def test_card_says_the_source_was_fp8_and_names_declared_drops(tmp_path):
    """The card states what happened to the source beyond the cast: FP8 dequantized on load, and the tensors the
    architecture drops by its declared rules (here DeepSeek-V3's multi-token-prediction layer)."""
    from convert.api import source_notes

    notes = source_notes({"quantization_config": {"quant_method": "fp8"}},
                         {"multi-token-prediction layers, unused by inference": 12})
    assert notes[0].startswith("Source stored in FP8") and "12 tensor(s) (multi-token-prediction" in notes[1]
    assert source_notes({}, {}) == []
