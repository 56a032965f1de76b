"""Property-based: whatever a config.json or a safetensors header says, the pipeline either converts or stops
with our one-line error; it never ends in a traceback, and never leaves an output behind when it stops."""

import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from checkpoints import make_checkpoint
from convert import ConvertError, convert

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(-3, 300), max_size=4),
                   st.dictionaries(st.text(max_size=6), st.integers(-3, 9), max_size=2))
KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
        "intermediate_size", "head_dim", "rms_norm_eps", "rope_parameters", "rope_scaling", "tie_word_embeddings",
        "max_position_embeddings", "hidden_act", "model_type", "layer_types", "sliding_window", "dtype",
        "attention_bias", "quantization_config"]
# Derandomized: CI runs the same examples every time (a failure is a bug to fix, never a flaky run); raise
# MLX_CONVERT_FUZZ_EXAMPLES locally to search wider.
FUZZ = settings(max_examples=int(os.environ.get("MLX_CONVERT_FUZZ_EXAMPLES", 30)), deadline=None,
                derandomize="MLX_CONVERT_FUZZ_RANDOM" not in os.environ,
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fuzz") / "src", "llama", tokenizer=False)


def converted_or_refused(src, out):
    try:
        convert(str(src), out, quantize=True, q_group_size=32, skip_validation=True, overwrite=True)
    except ConvertError as e:
        assert "\n" not in str(e) and str(e)
        assert not out.exists()


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1, max_size=3))
def test_any_config_converts_or_is_refused_in_one_line(source, tmp_path_factory, changes):
    src = tmp_path_factory.mktemp("cfg")
    shutil.copytree(source, src, dirs_exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))
    converted_or_refused(src, tmp_path_factory.mktemp("out") / "out")


@FUZZ
@given(position=st.integers(0, 400), value=st.integers(0, 255))
def test_any_safetensors_header_byte_converts_or_is_refused_in_one_line(source, tmp_path_factory, position, value):
    src = tmp_path_factory.mktemp("hdr")
    shutil.copytree(source, src, dirs_exist_ok=True)
    data = bytearray((src / "model.safetensors").read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[min(position, header - 1)] = value
    (src / "model.safetensors").write_bytes(bytes(data))
    converted_or_refused(src, tmp_path_factory.mktemp("out") / "out")
