"""`export_config` of the families whose transformers-5 configs mlx-lm cannot read as they are.

mlx-lm reads exaone4's layer kinds from a pattern string and requires `head_dim` / `rope_scaling`; hunyuan's
NTK-alpha RoPE from a `rope_scaling` with `type`; gemma3_text's local RoPE base from `rope_local_base_freq` and its
layer kinds from an integer `sliding_window_pattern`. The cases' distinctive settings (not their first, plainer
case, which tests/test_family_conversion.py covers) go through the pipeline and mlx-lm must compute our logits.
"""

import json

import numpy as np
import pytest

from checkpoints import make_checkpoint
from convert import convert
from convert_helpers import mlx_lm_logits, ours, rel_error
from model_test_runner import CASES

BY_ID = {case["id"]: case for case in CASES}


@pytest.mark.parametrize("case_id", ["exaone4-pattern-int-tied", "exaone4-no-window",
                                     "hunyuan_v1_dense-ntk-alpha-bias-tied",
                                     # phi3: longrope from a `rope_scaling` with "type" (mlx-lm always applies the
                                     # long factors, so only past the original length does it match transformers);
                                     # internlm3: biases under the remote-code names `qkv_bias` / `bias`.
                                     "phi3-longrope-long-partial-tied", "internlm3-bias-tied",
                                     # exaone_moe: mlx-lm's is_moe_layer / head_dim, windows and NoPE layers past the
                                     # first case's window; mimo_v2_flash: the Hub's remote-code keys (a window past
                                     # the probe: mlx-lm's is one token shorter, see MLX_LM_OTHER_FORMAT)
                                     "exaone_moe-explicit-kinds-unnormalised-tied", "mimo_v2_flash-long-window-mqa"])
def test_mlx_lm_computes_our_logits(tmp_path, case_id):
    case = BY_ID[case_id]
    src = make_checkpoint(tmp_path / "src", case["model_type"], **case.get("overrides", {}))
    out = convert(str(src), tmp_path / "out").path
    tokens = np.random.default_rng(0).integers(0, 320, size=(1, case.get("seq_len", 12)))
    assert rel_error(mlx_lm_logits(out, tokens), ours(out, tokens)) <= 1e-4


def test_gemma3_text_local_rope_and_pattern(tmp_path):
    """mlx-lm does not apply gemma3's final logit soft-capping, so compare the exported keys only."""
    case = BY_ID["gemma3_text-local-rope-softcap-untied"]
    src = make_checkpoint(tmp_path / "src", case["model_type"], **case["overrides"])
    config = json.loads((convert(str(src), tmp_path / "out").path / "config.json").read_text())
    assert config["rope_local_base_freq"] == 5000.0
    assert config["sliding_window_pattern"] == 2  # layer_types: sliding, full, sliding
