"""The gate proves a conversion at any precision: one conversion bug planted in an otherwise correct output (its
config.json or its weights) fails the gate at 4 bits and in bf16 and the failure names what diverged, while the
untouched outputs pass. At 4 bits such bugs used to hide inside the quantization error."""

import json

import mlx.core as mx
import pytest

from checkpoints import make_checkpoint
from convert.validate import informative, validate
from mlx_folders import write_mlx_folder

LLAMA3 = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
PRECISIONS = {"4bit": dict(bits=4, dtype="bfloat16"), "bf16": dict(dtype="bfloat16")}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    return {
        # RoPE scaling, biases and a GELU MLP, so that each planted bug has something to break.
        "llama": make_checkpoint(root / "llama", "llama", num_hidden_layers=3, attention_bias=True,
                                 hidden_act="gelu", max_position_embeddings=64, rope_parameters=LLAMA3),
        # A window shorter than the probes, and one longer (only the shadow model sees past it).
        "mistral": make_checkpoint(root / "mistral", "mistral", sliding_window=8),
        "mistral-long": make_checkpoint(root / "mistral-long", "mistral", sliding_window=100,
                                        max_position_embeddings=512),
    }


def edit_config(folder, change):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def scale_rope(config, factor):
    config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": config["rope_parameters"]["rope_theta"]
                                 * factor}


def swap_layers(w):
    for key in [k for k in w if k.startswith("model.layers.0.")]:
        other = key.replace("model.layers.0.", "model.layers.1.")
        w[key], w[other] = w[other], w[key]


def zero_bias(w):
    w["model.layers.1.self_attn.q_proj.bias"] = mx.zeros_like(w["model.layers.1.self_attn.q_proj.bias"])


# name -> (source, config change or None, weight change or None, what the failure must name)
BUGS = {
    "rope-base-1%-off": ("llama", lambda c: scale_rope(c, 1.01), None, "exact-weights parity"),
    "norm-eps-off": ("llama", lambda c: c.update(rms_norm_eps=1e-5), None, "exact-weights parity"),
    "rope-scaling-dropped": ("llama", lambda c: c.update(rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 50000.0}),
                             None, "exact-weights parity"),
    "activation-approximated": ("llama", lambda c: c.update(hidden_act="gelu_pytorch_tanh"), None,
                                "exact-weights parity"),
    "window-halved": ("mistral", lambda c: c.update(sliding_window=4), None, "exact-weights parity"),
    "long-window-halved": ("mistral-long", lambda c: c.update(sliding_window=50), None, "shadow long-range parity"),
    "layers-swapped": ("llama", None, swap_layers, "model.layers.0."),
    "bias-zeroed": ("llama", None, zero_bias, "model.layers.1.self_attn.q_proj.bias"),
}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("source", ["llama", "mistral", "mistral-long"])
def test_clean_outputs_pass(sources, tmp_path, source, precision):
    report = validate(sources[source], write_mlx_folder(sources[source], tmp_path / "out", **PRECISIONS[precision]))
    assert report.passed, report.failures
    assert report.parity["max_rel_error"] <= 1e-4 and max(report.parity["layers"]) <= 1e-4
    if source == "mistral-long":
        assert report.shadow["length"] > 100 and report.shadow["boundaries"] == {"sliding window": 100}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("bug", BUGS)
def test_planted_bug_fails_and_is_named(sources, tmp_path, bug, precision):
    source, change_config, change_weights, named = BUGS[bug]
    out = write_mlx_folder(sources[source], tmp_path / "out", mutate=change_weights, **PRECISIONS[precision])
    if change_config is not None:
        edit_config(out, change_config)
    report = validate(sources[source], out)
    assert not report.passed
    assert any(named in failure for failure in report.failures), report.failures
    if change_config is not None and named == "exact-weights parity":
        assert report.first_divergent_layer == 0  # every layer computes the planted function


def test_probe_rule_needs_distinct_ids():
    assert not informative([[5] * 40, [5, 6] * 10], vocab_size=320)
    assert informative([list(range(16))], vocab_size=320)
    assert informative([[0, 1, 2, 3]], vocab_size=8)  # a vocabulary of 8 ids: half of it is enough


def test_uninformative_tokenizer_gets_drawn_ids_and_still_catches_a_rope_bug(sources, tmp_path):
    """A word-level tokenizer that knows none of the probe words gives one id repeated: attention over identical
    keys ignores positions, so a wrong RoPE base would pass. The gate adds drawn ids, says so, and fails it."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    src = tmp_path / "src"
    shutil.copytree(sources["llama"], src)
    for f in src.glob("*token*"):
        f.unlink()
    words = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(src)
    clean = validate(src, write_mlx_folder(src, tmp_path / "clean", bits=4, dtype="bfloat16"))
    assert clean.passed, clean.failures
    assert clean.probes["distinct_ids"] < 16 and "drawn from the vocabulary" in clean.probes["added"]
    bad = write_mlx_folder(src, tmp_path / "bad", bits=4, dtype="bfloat16")
    edit_config(bad, lambda c: scale_rope(c, 10.0))
    report = validate(src, bad)
    assert any("exact-weights parity" in f for f in report.failures), report.failures


def first_cases():
    from model_test_runner import CASES

    first = {}
    for case in CASES:
        first.setdefault(case["model_type"], case)
    return list(first.values())


@pytest.mark.parametrize("case", first_cases(), ids=lambda c: c["id"])
def test_no_false_alarm_on_a_clean_bf16_output_of_every_family(tmp_path, case):
    """(The 4-bit outputs of every family go through the whole pipeline and this gate in test_family_conversion.)"""
    src = make_checkpoint(tmp_path / "src", case["model_type"], **case.get("overrides", {}))
    report = validate(src, write_mlx_folder(src, tmp_path / "out", dtype="bfloat16"))
    assert report.passed, report.failures
    assert report.weights["worst_rel_error"] < 5e-3 and report.shadow["full_rel_error"] is not None
