"""Multimodal containers (mlx_arch/core/containers.py): a tiny container (vision tower as small as its config allows)
saved the way transformers saves it, converted through the CLI. The output is a plain text model folder: its logits
equal the container's own text path in transformers (input ids only) in both config and weight-name styles, cached
decode equals the full forward, the dropped vision weights are reported in the log and the card, mlx-lm reads the
4-bit output, and a container whose text model we lack is refused in pre-flight naming both types."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mlx_arch
from mlx_arch.core.base import source_dtype, text_config
from checkpoints import SMALL, randomize, save_tokenizer, to_v4_style
from convert.cli import cli
from convert_helpers import mlx_lm_logits, ours, rel_error
from model_test_runner import CASES as ALL_CASES, check_cache_vs_full

SEQ = 20
TOKENS = np.random.default_rng(0).integers(0, SMALL["vocab_size"], size=(1, SEQ))

VISION = {
    "gemma3": dict(vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4),
                   mm_tokens_per_image=4),
    "mistral3": dict(vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4,
                                        head_dim=8), spatial_merge_size=2),
}
QWEN_VISION = dict(vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=64,
                                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2))
VISION.update({
    "llama4": dict(vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                      image_size=16, patch_size=4, vision_output_dim=16, projector_input_dim=16,
                                      projector_output_dim=16)),
    "gemma4": dict(vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                      num_key_value_heads=2, head_dim=8), audio_config=None),
    "qwen3_5": QWEN_VISION, "qwen3_5_moe": QWEN_VISION,
})
# The text families of the newer containers: their own first test case (tests/data/cases).
FIRST_CASE = {}
for case in ALL_CASES:
    FIRST_CASE.setdefault(case["model_type"], case)
NEWER = [("llama4", "llama4_text"), ("gemma4", "gemma4_text"), ("qwen3_5", "qwen3_5_text"),
         ("qwen3_5_moe", "qwen3_5_moe_text")]
# Text configs with their distinctive settings inside the probe length (windows, local RoPE, query temperature).
TEXT = {
    "gemma3_text": dict(num_hidden_layers=3, head_dim=16, sliding_window=6, query_pre_attn_scalar=20,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0}}),
    "ministral3": dict(head_dim=16, max_position_embeddings=32,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                        "original_max_position_embeddings": 8, "llama_4_scaling_beta": 0.3}),
    "mistral": dict(sliding_window=6, rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
}
CASES = [("gemma3", "gemma3_text", {}), ("mistral3", "ministral3", {"tie_word_embeddings": False}),
         ("mistral3", "mistral", {})]

# Transformers 5 saves containers under their original names; releases saved by later transformers 4 versions use
# the layout of transformers 5's modules. The "v5" style gets that layout, the "v4" style a transformers-4 config.
NEW_NAMES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
             ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))


def make_container(path, container: str, text_type: str, style: str, dtype=torch.float32, **top):
    from transformers import AutoConfig, AutoModelForImageTextToText

    text = {**SMALL, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, **(TEXT.get(text_type) or
                                                                                  FIRST_CASE[text_type]["overrides"])}
    config = AutoConfig.for_model(container, text_config={"model_type": text_type, **text}, **VISION[container], **top)
    torch.manual_seed(0)
    model = randomize(AutoModelForImageTextToText.from_config(config)).to(dtype)
    model.save_pretrained(path)
    save_tokenizer(path)
    config_file = path / "config.json"
    saved = json.loads(config_file.read_text())
    if style == "v4":
        saved = {**to_v4_style(saved), "text_config": to_v4_style(saved["text_config"])}
    elif container != "llama4":  # Llama4ForConditionalGeneration's own names are the ones saved
        weights = load_file(path / "model.safetensors")
        renamed = {}
        for key, value in weights.items():
            old = next((o for o, _ in NEW_NAMES if key.startswith(o)), None)
            renamed[dict(NEW_NAMES)[old] + key[len(old):] if old else key] = value
        save_file(renamed, path / "model.safetensors", metadata={"format": "pt"})
    config_file.write_text(json.dumps(saved, indent=2))
    return path


def container_logits(path, tokens=TOKENS) -> np.ndarray:
    """The container's own forward in transformers on input ids only: its text path."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("style", ["v5", "v4"])
@pytest.mark.parametrize("container,text_type,top", CASES, ids=[f"{c}-{t}" for c, t, _ in CASES])
def test_float32_text_model_matches_the_container(tmp_path, container, text_type, top, style):
    src = make_container(tmp_path / "src", container, text_type, style, **top)
    out = tmp_path / "out"
    result = run("--hf-path", src, "--mlx-path", out, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == text_type and "text_config" not in config and "vision_config" not in config
    n_vision = len([k for k in load_file(src / "model.safetensors") if "vision_tower" in k or "projector" in k])
    assert f"dropped {n_vision} vision/audio/projector tensors" in result.output  # the log
    assert f"dropped {n_vision} vision/audio/projector tensors" in (out / "README.md").read_text()  # the card
    assert not any("vision" in k or "projector" in k for f in out.glob("*.safetensors") for k in mx.load(str(f)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert rel_error(ours(out, TOKENS), container_logits(src)) <= 1e-4
    model, _ = mlx_arch.load_model(out)
    check_cache_vs_full(model, TOKENS)


@pytest.mark.parametrize("container,text_type,top", CASES, ids=[f"{c}-{t}" for c, t, _ in CASES])
def test_4bit_output_passes_the_gate_and_mlx_lm_reads_it(tmp_path, container, text_type, top):
    src = make_container(tmp_path / "src", container, text_type, "v5", **top)
    out = tmp_path / "out"
    result = run("--hf-path", src, "--mlx-path", out, "-q", "--q-group-size", "32")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] and report["parity"]["max_rel_error"] <= report["thresholds"]["exact"]
    assert not report["shadow"]["skipped"]  # the long-range check runs on the text model's shadow
    # mlx-lm ignores mistral's sliding window: compare within it
    tokens = TOKENS[:, : TEXT[text_type].get("sliding_window", SEQ)]
    assert rel_error(mlx_lm_logits(out, tokens), ours(out, tokens)) <= 1e-3


@pytest.mark.parametrize("container,text_type", NEWER, ids=[c for c, _ in NEWER])
def test_newer_containers_match_their_text_path(tmp_path, container, text_type):
    """Llama 4, Gemma 4, Qwen3.5 (dense and MoE) with their text family's first case: fp32 through the CLI and the
    gate, logits against the container's text path, cached decode. (mlx-lm: its llama4 and qwen3_5 modules are the
    multimodal ones, its gemma4_text is checked on the text family's own case in test_family_conversion.)"""
    src = make_container(tmp_path / "src", container, text_type, "v5")
    out = tmp_path / "out"
    result = run("--hf-path", src, "--mlx-path", out, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["model_type"] == text_type
    assert "dropped" in (out / "README.md").read_text()
    tokens = TOKENS[:, : FIRST_CASE[text_type].get("seq_len", SEQ)]
    assert rel_error(ours(out, tokens), container_logits(src, tokens)) <= 1e-4
    check_cache_vs_full(mlx_arch.load_model(out)[0], tokens)


def test_bfloat16_source_passes_the_gate(tmp_path):
    src = make_container(tmp_path / "src", "gemma3", "gemma3_text", "v4", dtype=torch.bfloat16)
    result = run("--hf-path", src, "--mlx-path", tmp_path / "out")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert source_dtype(config) == "bfloat16" and config["model_type"] == "gemma3_text"


def write_config(path, config: dict):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, path / "model.safetensors", metadata={"format": "pt"})
    save_tokenizer(path)
    return path


@pytest.mark.parametrize("config,words", [
    ({"model_type": "mistral3", "text_config": {"model_type": "reformer", "hidden_size": 64}},
     ["'mistral3' is a multimodal checkpoint", "text model 'reformer' is not supported"]),
    ({"model_type": "llava", "text_config": {"model_type": "llama", "hidden_size": 64}},
     ["'llava' is a multimodal checkpoint", "does not unpack", "gemma3"]),
])
def test_unsupported_text_model_is_refused_in_preflight(tmp_path, config, words):
    result = run("--hf-path", write_config(tmp_path / "src", config), "--mlx-path", tmp_path / "out")
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error:") and all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


def test_text_config_takes_the_containers_head_tying():
    """transformers builds the container from its top-level config: its tie_word_embeddings wins over
    text_config's; without one, text_config's own statement stands (Mistral 3 releases)."""
    config = {"model_type": "gemma3", "tie_word_embeddings": False, "image_token_index": 7, "dtype": "bfloat16",
              "text_config": {"hidden_size": 64, "tie_word_embeddings": True}, "vision_config": {"hidden_size": 16}}
    text = text_config(config)
    assert text["model_type"] == "gemma3_text" and text["tie_word_embeddings"] is False
    assert text["dtype"] == "bfloat16" and "image_token_index" not in text and "vision_config" not in text
    del config["tie_word_embeddings"]
    assert text_config(config)["tie_word_embeddings"] is True
