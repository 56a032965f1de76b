"""Every architecture through the pipeline at 4 bits: it passes the validation gate, and where mlx-lm has the
family, mlx-lm loads our folder and computes our logits."""

import importlib.util

import pytest

from checkpoints import make_checkpoint
from convert import convert
from convert_helpers import TOKENS, mlx_lm_logits, ours, rel_error
from model_test_runner import CASES

FIRST_CASE = {}
for case in CASES:
    FIRST_CASE.setdefault(case["model_type"], case)


# mlx-lm model types whose module reads another checkpoint format than transformers' (importing mlx-lm's olmo exits
# the process when ai2-olmo is missing).
MLX_LM_OTHER_FORMAT = {"olmo": "mlx-lm's olmo reads ai2-olmo's layout (d_model, att_proj), not transformers'",
                       "nanochat": "mlx-lm's nanochat reads the original nanochat layout (transformer.h.{i}.attn.c_q), "
                                   "not transformers'",
                       "glm": "mlx-lm's glm rotates the whole head; transformers' only partial_rotary_factor of it",
                       # transformers wins where the two disagree
                       "ernie4_5_moe": "mlx-lm drops e_score_correction_bias, which transformers routes with (zeroing "
                                       "it in our output makes mlx-lm's logits equal ours)",
                       "mimo_v2_flash": "mlx-lm's sliding layers attend over sliding_window_size tokens, transformers' "
                                        "over one more (the query besides that many earlier tokens); it reads our "
                                        "layout (tests/test_mlx_lm_config_export.py, with a window past the probe)",
                       "llama4_text": "mlx-lm's llama4_text is another model (dense, no chunked attention, no NoPE "
                                      "temperature, head named `output`); its llama4 container reads our layout under "
                                      "`language_model.`",
                       "minimax": "mlx-lm's minimax module is MiniMax-M2's architecture (mlx-lm remaps minimax_m2 to "
                                  "it), not the lightning-attention MiniMax-Text-01 that transformers' minimax is",
                       "jamba": "mlx-lm's jamba renormalises the chosen experts' weights (softmax over the top-k logits) "
                                "where transformers keeps their plain probabilities; it reads our layout "
                                "(tests/test_ssm_hybrids.py, with every expert chosen)"}


def mlx_lm_gap(model_type: str):
    """Why mlx-lm cannot load this family's output, or None when it can."""
    from mlx_lm.utils import MODEL_REMAPPING

    if model_type in MLX_LM_OTHER_FORMAT:
        return MLX_LM_OTHER_FORMAT[model_type]
    name = MODEL_REMAPPING.get(model_type, model_type)
    if importlib.util.find_spec(f"mlx_lm.models.{name}") is None:
        return f"mlx-lm has no {model_type} model to load the output with"
    return None


@pytest.mark.parametrize("model_type", sorted(FIRST_CASE))
def test_4bit_conversion(tmp_path, model_type):
    case = FIRST_CASE[model_type]
    src = make_checkpoint(tmp_path / "src", model_type, **case.get("overrides", {}))
    result = convert(str(src), tmp_path / "out", quantize=True, q_group_size=32)
    assert result.validation.passed, result.validation.failures
    if mlx_lm_gap(model_type):
        pytest.skip(mlx_lm_gap(model_type))
    overrides = case.get("overrides", {})
    # mlx-lm ignores some families' sliding windows (mistral, starcoder2): compare within the window, where
    # transformers, we and mlx-lm all agree; our parity beyond it is proven in test_models.
    window = overrides.get("sliding_window") or TOKENS.shape[1]
    tokens = TOKENS[:, :window] % overrides.get("vocab_size", 320)
    # mlx-lm may pick another formula for an activation (e.g. an approximate GELU): 1e-3, not bit-equality.
    assert rel_error(mlx_lm_logits(result.path, tokens), ours(result.path, tokens)) <= 1e-3
