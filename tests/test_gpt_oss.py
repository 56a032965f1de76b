"""gpt-oss (mlx_arch/gpt_oss.py) and its released weight format (MXFP4 experts, mlx_arch/core/mxfp4.py).

Parity with transformers for the cases in data/model_configs.json is in test_models (both config styles, cache vs
full across the window, batch vs single, fp16); here: that the checks can fail (sinks and clamps change the logits),
the weight rules invert to the checkpoint exactly, MXFP4 bytes are MLX's mxfp4 bit for bit, an MXFP4 source computes
its dequantized float twin, and the pipeline converts it."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mlx_arch
from checkpoints import load_reference, make_checkpoint
from convert import convert
from convert.errors import ConvertError
from convert.plan import ConvertPlan
from convert.source import check_source
from convert_helpers import float32_logits, mlx_lm_logits, ours, rel_error
from model_test_runner import CASES, check_cache_vs_full, check_parity, check_sanitize_idempotent, load_hf_folder
from mlx_arch.core import mxfp4, quant
from mlx_arch.core.moe import QuantizedSwitchLinear
from mlx_arch.core.weights import apply_rules, inverse

BASE = next(c for c in CASES if c["model_type"] == "gpt_oss")["overrides"]
TOKENS = np.random.default_rng(0).integers(0, 320, size=(1, 20))  # longer than the window (6)
EXPERT_MATRICES = ("gate_up_proj", "down_proj")
RELEASE_QUANT = {"quant_method": "mxfp4",  # gpt-oss-20b's quantization_config
                 "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                            "model.embed_tokens", "lm_head"]}


def edit_weights(path, edit):
    """Rewrite a checkpoint's single safetensors file through `edit(weights) -> weights`."""
    file = path / "model.safetensors"
    save_file(edit(load_file(str(file))), str(file), metadata={"format": "pt"})


def edit_config(path, edit):
    file = path / "config.json"
    file.write_text(json.dumps(edit(json.loads(file.read_text())), indent=2))


# --- MXFP4 checkpoints as the releases store them -------------------------------------------------------------------

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_mxfp4(w: np.ndarray):
    """(blocks, scales) of w (..., out, in) as gpt-oss checkpoints store them, written independently of MLX: the
    scale of each 32 inputs is the power of two at or above amax / 6 (E8M0 byte = exponent + 127), each value the
    nearest E2M1 code (sign in bit 3, so tiny negatives become -0 codes), two codes per byte, the even one low."""
    groups = w.reshape(*w.shape[:-1], -1, 32).astype(np.float64)
    amax = np.abs(groups).max(-1, keepdims=True)
    exponent = np.ceil(np.log2(np.maximum(amax, 2.0**-126) / 6.0))
    magnitude = np.abs(groups) / 2.0**exponent
    codes = np.abs(magnitude[..., None] - E2M1).argmin(-1) | np.where(groups < 0, 8, 0)
    codes = codes.astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent[..., 0] + 127).astype(np.uint8)


def dequantized(blocks, scales) -> torch.Tensor:
    """transformers' own dequantization (what `from_pretrained` does on a CPU): (..., in, out) float32."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(torch.as_tensor(blocks), torch.as_tensor(scales), dtype=torch.float32)


def make_mxfp4_pair(tmp_path, **overrides):
    """A tiny gpt-oss checkpoint with MXFP4 experts (blocks + scales, quantization_config as released) and its
    float twin: the same checkpoint with those experts dequantized by transformers."""
    twin = make_checkpoint(tmp_path / "twin", "gpt_oss", **{**BASE, **overrides})
    packed = tmp_path / "mxfp4"
    shutil.copytree(twin, packed)
    weights = load_file(str(twin / "model.safetensors"))
    for key in [k for k in weights if k.endswith(EXPERT_MATRICES)]:
        blocks, scales = quantize_mxfp4(weights.pop(key).transpose(1, 2).numpy())  # stored (out, in)
        weights[f"{key}_blocks"], weights[f"{key}_scales"] = (torch.from_numpy(np.ascontiguousarray(a))
                                                              for a in (blocks, scales))
    save_file(weights, str(packed / "model.safetensors"), metadata={"format": "pt"})
    edit_config(packed, lambda c: {**c, "quantization_config": RELEASE_QUANT})
    edit_weights(twin, lambda w: {k: (dequantized(weights[f"{k}_blocks"], weights[f"{k}_scales"])
                                      if f"{k}_blocks" in weights else v) for k, v in w.items()})
    return packed, twin


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_mxfp4_pair(tmp_path_factory.mktemp("gpt_oss"))


def load_packed(path):
    """Our model of an MXFP4 checkpoint: the layers whose scales the rules produce are read as MLX mxfp4."""
    config = json.loads((path / "config.json").read_text())
    model = mlx_arch.build_model(config)
    weights = model.sanitize(mx.load(str(path / "model.safetensors")))
    mlx_arch.quantize_like(model, {"quantization": mxfp4.mlx_settings(config["quantization_config"])}, weights)
    mlx_arch.load_weights(model, weights)
    return model.eval(), weights


# --- the checks can fail --------------------------------------------------------------------------------------------


def test_sinks_are_read_and_matter(tmp_path):
    """transformers keeps the sinks as parameters (checkpoint data); with sinks of a few units, parity holds and
    a model without them (zeros) is far off."""
    path = make_checkpoint(tmp_path / "src", "gpt_oss", tokenizer=False, **BASE)
    gen = torch.Generator().manual_seed(1)
    edit_weights(path, lambda w: {k: (2 * torch.randn(v.shape, generator=gen) if k.endswith("sinks") else v)
                                  for k, v in w.items()})
    model, _, weights = load_hf_folder(path)
    assert np.abs(np.array(model.layers[0].self_attn.sinks)).max() > 1
    check_parity(path, model, TOKENS)
    check_cache_vs_full(model, TOKENS)
    with_sinks = np.array(model(mx.array(TOKENS)))
    for layer in model.layers:
        layer.self_attn.sinks = mx.zeros_like(layer.self_attn.sinks)
    assert rel_error(np.array(model(mx.array(TOKENS))), with_sinks) > 1e-2


def test_clamps_act_in_the_clamped_case(tmp_path):
    case = next(c for c in CASES if c["id"] == "gpt_oss-clamped-alpha-top3-mqa-nobias")
    path = make_checkpoint(tmp_path / "src", "gpt_oss", tokenizer=False, **case["overrides"])
    model, _, _ = load_hf_folder(path)
    check_parity(path, model, TOKENS)
    clamped = np.array(model(mx.array(TOKENS)))
    for layer in model.layers:
        layer.mlp.experts.limit = 7.0
    assert rel_error(np.array(model(mx.array(TOKENS))), clamped) > 1e-2


# --- weight rules ---------------------------------------------------------------------------------------------------


def test_rules_give_back_the_float_checkpoint_exactly(tmp_path):
    path = make_checkpoint(tmp_path / "src", "gpt_oss", tokenizer=False, **BASE)
    model, _, weights = load_hf_folder(path)
    check_sanitize_idempotent(model, weights)
    ours = model.sanitize(dict(weights))
    experts = "model.layers.0.mlp.experts"
    gate_up, bias = np.array(weights[f"{experts}.gate_up_proj"]), np.array(weights[f"{experts}.gate_up_proj_bias"])
    assert np.array_equal(np.array(ours[f"{experts}.gate_proj.weight"]), gate_up[..., ::2].swapaxes(1, 2))
    assert np.array_equal(np.array(ours[f"{experts}.up_proj.bias"]), bias[..., 1::2])
    back = apply_rules(ours, inverse(model.weight_rules()))
    assert sorted(back) == sorted(weights)
    assert all(np.array_equal(np.array(back[k]), np.array(weights[k])) for k in weights)


def test_rules_give_back_the_mxfp4_checkpoint_byte_for_byte(pair):
    packed, _ = pair
    config = json.loads((packed / "config.json").read_text())
    model = mlx_arch.build_model(config)
    weights = mx.load(str(packed / "model.safetensors"))
    assert model.args.source_format == "mxfp4"
    check_sanitize_idempotent(load_packed(packed)[0], weights)
    blocks = np.array(weights["model.layers.0.mlp.experts.down_proj_blocks"])
    assert ((blocks & 15) == 8).any()  # -0 codes, which requantizing would turn into +0
    ours = model.sanitize(dict(weights))
    assert ours["model.layers.0.mlp.experts.gate_proj.weight"].dtype == mx.uint32
    back = apply_rules(ours, inverse(model.weight_rules()))
    assert sorted(back) == sorted(weights)
    for k, v in weights.items():
        assert back[k].dtype == v.dtype and np.array_equal(np.array(back[k]), np.array(v)), k


def test_router_stays_float_when_quantized():
    model = mlx_arch.build_model({"model_type": "gpt_oss", **BASE, "vocab_size": 320, "hidden_size": 64,
                                  "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "num_key_value_heads": 2})
    kept = {p for p, m in model.named_modules() if hasattr(m, "to_quantized") and not model.quant_predicate(p, m)}
    assert kept == {"model.layers.0.mlp.router", "model.layers.1.mlp.router"}


# --- MXFP4 ----------------------------------------------------------------------------------------------------------


def test_mxfp4_bytes_are_mlx_mxfp4_bit_for_bit():
    """Every byte value (so every code pair, -0 included) under every E8M0 exponent, subnormal scales included: MLX
    dequantizes the checkpoint's bytes to exactly what transformers does. (Exponent byte 255 is NaN in E8M0 and no
    quantizer writes it: transformers then gives 2**127 * v, MLX inf or NaN.)"""
    rng = np.random.default_rng(0)
    blocks = np.concatenate([np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16).repeat(8, 1),
                             rng.integers(0, 256, size=(1, 8, 16, 16), dtype=np.uint8)])  # (2, 8, 16, 16)
    scales = np.append(rng.permutation(255), 127).astype(np.uint8).reshape(2, 8, 16)  # 0 .. 254
    ref = dequantized(blocks, scales).transpose(1, 2).numpy()  # (2, 8, 512)
    got = np.array(mx.dequantize(mxfp4.pack(mx.array(blocks)), mx.array(scales), **mxfp4.MXFP4, dtype=mx.float32))
    assert np.array_equal(got, ref) and np.array_equal(np.signbit(got), np.signbit(ref))  # -0 codes stay -0
    assert np.array_equal(np.array(mxfp4.unpack(mxfp4.pack(mx.array(blocks)))), blocks)
    # MLX's own mxfp4 layout has these shapes and dtypes: (out, in / 8) uint32, (out, in / 32) uint8.
    q, s = mx.quantize(mx.random.normal((8, 512)), **mxfp4.MXFP4)
    packed = mxfp4.pack(mx.array(blocks[0]))
    assert (q.shape, q.dtype, s.shape, s.dtype) == (packed.shape, packed.dtype, scales[0].shape, mx.uint8)


def test_mxfp4_source_computes_its_dequantized_twin(pair):
    packed, twin = pair
    model, weights = load_packed(packed)
    experts = model.layers[0].mlp.experts
    assert all(isinstance(experts[n], QuantizedSwitchLinear) and experts[n].mode == "mxfp4"
               for n in ("gate_proj", "up_proj", "down_proj"))
    float_model, _, _ = load_hf_folder(twin)
    for name in ("gate_proj", "up_proj", "down_proj"):  # the stored values, exactly
        assert np.array_equal(np.array(quant.to_float(experts[name]).weight),
                              np.array(float_model.layers[0].mlp.experts[name].weight)), name
    ours = float32_logits(model, TOKENS)
    assert rel_error(ours, float32_logits(float_model, TOKENS)) <= 1e-5
    # transformers reads the MXFP4 checkpoint itself: without Triton kernels (any CPU) it dequantizes on load.
    with torch.no_grad():
        theirs = load_reference(packed)(torch.tensor(TOKENS)).logits.float().numpy()
        twin_theirs = load_reference(twin)(torch.tensor(TOKENS)).logits.float().numpy()
    assert np.array_equal(theirs, twin_theirs)
    assert rel_error(ours, theirs) <= 1e-4


def test_preflight_accepts_mxfp4_only_where_the_family_reads_it():
    plan = ConvertPlan(hf_path="acme/model")
    gpt_oss = {"model_type": "gpt_oss", "quantization_config": RELEASE_QUANT}
    check_source(gpt_oss, [], plan)
    check_source(gpt_oss, [], ConvertPlan(hf_path="acme/model", dequantize=True))
    for config in ({**gpt_oss, "model_type": "llama"}, {**gpt_oss, "quantization_config": {"quant_method": "awq"}}):
        method = config["quantization_config"]["quant_method"]
        with pytest.raises(ConvertError, match=rf"already quantized \({method}\)"):
            check_source(config, [], plan)


def test_config_spellings_and_defaults(tmp_path):
    """No RoPE keys: GptOssConfig's YaRN (mlx-lm would assume plain RoPE, so the output config states it);
    `num_experts` is GptOssConfig's other name for the expert count."""
    path = make_checkpoint(tmp_path / "src", "gpt_oss", tokenizer=False,
                           **{k: v for k, v in BASE.items() if k != "rope_parameters"})
    edit_config(path, lambda c: {**{k: v for k, v in c.items() if k != "rope_parameters"}, "rope_theta": 50000.0})
    model, config, _ = load_hf_folder(path)
    assert model.args.rope_scaling["rope_type"] == "yarn" and model.args.rope_theta == 50000.0
    check_parity(path, model, TOKENS)
    exported = model.export_config(config)
    assert exported["rope_scaling"]["factor"] == 32.0 and exported["num_local_experts"] == 4
    args = mlx_arch.get_architecture("gpt_oss").ModelArgs.from_dict({"model_type": "gpt_oss", "num_experts": 5})
    assert args.num_local_experts == 5


@pytest.mark.xfail(strict=True, reason="mlx-lm 0.32's YarnRoPE always truncates YaRN's correction range; gpt-oss "
                   "sets truncate=false (transformers, OpenAI's reference): 9 of the release's 32 frequency pairs "
                   "differ, up to 0.9 rad at position 4096")
def test_mlx_lm_rotates_like_us_with_the_release_rope():
    from mlx_lm.models.rope_utils import initialize_rope as mlx_lm_rope

    from mlx_arch.gpt_oss import DEFAULT_YARN, ModelArgs, Model

    release = Model(ModelArgs(num_hidden_layers=2, hidden_size=64, num_attention_heads=1, vocab_size=8,
                              num_local_experts=2, intermediate_size=32, rope_scaling=dict(DEFAULT_YARN)))
    x = mx.ones((1, 1, 1, 64))
    theirs = mlx_lm_rope(64, 150000.0, False, DEFAULT_YARN, 131072)
    for offset in (1, 128, 4096):
        assert rel_error(np.array(theirs(x, offset=offset)), np.array(release.rope(x, offset=offset))) <= 1e-5


# --- through the pipeline -------------------------------------------------------------------------------------------

def test_mxfp4_source_converts_keeping_its_bytes(pair, tmp_path):
    packed, twin = pair
    result = convert(str(packed), tmp_path / "out")
    assert result.validation.passed, result.validation.failures
    config = json.loads((result.path / "config.json").read_text())
    assert config["quantization"] == mxfp4.MXFP4 and "quant_method" not in config["quantization_config"]
    stored, source = mx.load(str(result.path / "model.safetensors")), load_file(str(packed / "model.safetensors"))
    blocks = source["model.layers.1.mlp.experts.gate_up_proj_blocks"].numpy()
    assert np.array_equal(np.array(mxfp4.unpack(stored["model.layers.1.mlp.experts.up_proj.weight"])),
                          blocks[:, 1::2])
    assert result.validation.weights["worst_rel_error"] == 0.0
    assert rel_error(mlx_lm_logits(result.path), ours(result.path)) <= 1e-5


def test_mxfp4_source_dequantizes_on_request(pair, tmp_path):
    packed, twin = pair
    result = convert(str(packed), tmp_path / "out", dequantize=True, dtype="float32")
    assert result.validation.passed, result.validation.failures
    stored = mx.load(str(result.path / "model.safetensors"))
    expected = load_hf_folder(twin)[0].layers[0].mlp.experts.down_proj.weight
    assert np.array_equal(np.array(stored["model.layers.0.mlp.experts.down_proj.weight"]), np.array(expected))
    assert "quantization" not in json.loads((result.path / "config.json").read_text())


def test_float_source_converts_to_mxfp4_with_the_gate_passing(pair, tmp_path):
    _, twin = pair
    result = convert(str(twin), tmp_path / "out", q_mode="mxfp4")
    assert result.validation.passed, result.validation.failures
    model, _ = mlx_arch.load_model(result.path)
    assert isinstance(model.layers[0].mlp.router, nn.Linear)
    assert isinstance(model.layers[0].mlp.experts.up_proj, QuantizedSwitchLinear)
