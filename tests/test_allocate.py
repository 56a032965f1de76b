"""Mixed precision under a bits-per-weight budget (`--target-bpw`, convert/allocate.py): the budget is kept and
nearly spent, measured-sensitive layers get more bits, the output is the standard per-layer MLX quantization config
that mlx-lm reads, and the gate passes. Tiny random checkpoints only."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from checkpoints import make_checkpoint
from convert import ConvertError, allocate
from convert import quantize as q
from convert.api import run
from convert.cli import cli
from convert.plan import ConvertPlan, variant_plans
from convert_helpers import mlx_lm_logits, ours, rel_error


def stored_bpw(folder) -> float:
    """Bits per weight of the saved tensors (as stored, headers aside) over the float model's weight count."""
    tensors = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        tensors.update(mx.load(str(f)))
    config = json.loads((Path(folder) / "config.json").read_text())
    quantization = config["quantization"]
    bits = sum(a.nbytes * 8 for a in tensors.values())
    weights = 0
    for name, a in tensors.items():
        layer = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")) and f"{layer}.weight" in tensors:
            continue
        setting = quantization.get(layer, quantization) if name.endswith(".weight") else None
        packed = name.endswith(".weight") and f"{layer}.scales" in tensors
        weights += a.size * 32 // setting["bits"] if packed else a.size
    return bits / weights


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("allocate") / "src", "llama", dtype="bfloat16",
                           num_hidden_layers=3, tie_word_embeddings=True)


def quantized(src, **options):
    config = json.loads((Path(src) / "config.json").read_text())
    model = q.build_model(config, mx.load(str(Path(src) / "model.safetensors")))
    q.cast(model, "bfloat16")
    return model, q.quantize(model, ConvertPlan(hf_path=str(src), **options), src)


def test_budget_is_kept_and_spent_gate_passes_and_mlx_lm_reads_it(source, tmp_path):
    messages = []
    result = run(ConvertPlan(hf_path=str(source), mlx_path=tmp_path / "out", target_bpw=4.5, q_group_size=32),
                 log=messages.append)
    assert result.validation.passed, result.validation.failures
    achieved = stored_bpw(result.path)
    assert 4.3 <= achieved <= 4.5, achieved  # within the budget, less than one small layer's upgrade below it
    config = json.loads((result.path / "config.json").read_text())
    widths = {v["bits"] for v in config["quantization"].values() if isinstance(v, dict)}
    assert len(widths | {config["quantization"]["bits"]}) >= 2  # mixed, as per-layer entries mlx-lm reads
    assert config["quantization_config"] == config["quantization"]
    assert rel_error(mlx_lm_logits(result.path), ours(result.path)) <= 1e-6
    card = (result.path / "README.md").read_text()
    line = next(m for m in messages if "mixed precision by measured sensitivity" in m)
    assert "budget of 4.5 bits per weight" in line and "achieved" in line and "embed_tokens" in line
    assert "budget of 4.5 bits per weight" in card and f"{achieved:.2f}"[:3] in card


def test_measured_sensitive_layers_get_more_bits(tmp_path):
    """The estimate ranks layers as their real damage does (the KL each one causes alone at the lowest width), and
    the layers given more than the lowest width are the ones measured most sensitive."""
    src = make_checkpoint(tmp_path / "src", "llama", dtype="bfloat16", num_hidden_layers=3, tie_word_embeddings=False)
    _, report = quantized(src, target_bpw=4.0, q_group_size=32, q_method="rtn")
    allocation = report.allocation
    low = min(allocation.bits.values())
    above = [allocation.sensitivity[p] for p, b in allocation.bits.items() if b > low]
    at_floor = [allocation.sensitivity[p] for p, b in allocation.bits.items() if b == low]
    assert above and at_floor and min(above) > np.median(at_floor)
    assert allocation.achieved <= 4.0
    floor = min(next(iter(allocation.estimates.values())))
    by_estimate = sorted(allocation.estimates, key=lambda p: allocation.estimates[p][floor])
    damage = {p: kl_with_one_layer_rounded(src, p, floor) for p in (by_estimate[0], by_estimate[-1])}
    assert damage[by_estimate[-1]] > 3 * damage[by_estimate[0]], damage


def kl_with_one_layer_rounded(src, path, bits) -> float:
    """Mean KL(float || model with only `path` rounded to nearest at `bits`), float32, on a fixed token row."""
    config = json.loads((Path(src) / "config.json").read_text())
    model = q.build_model(config, mx.load(str(Path(src) / "model.safetensors")))
    q.cast(model, "float32")
    ids = mx.array((np.arange(64) * 7 % config["vocab_size"])[None])
    reference = nn.log_softmax(model(ids), axis=-1)
    module = dict(model.named_modules())[path]
    module.weight = mx.array(allocate.rounded(np.array(module.weight), bits, 32, "float32"))
    rounded = nn.log_softmax(model(ids), axis=-1)
    return float((mx.exp(reference) * (reference - rounded)).sum(-1).mean())


def test_fisher_is_the_squared_output_gradient(source):
    """F of the output head equals the analytic one: the sum over positions of (softmax - one-hot)^2."""
    config = json.loads((Path(source) / "config.json").read_text())
    model = q.build_model(config, mx.load(str(Path(source) / "model.safetensors")))
    ids = np.arange(1, 40, dtype=np.int32)[None] % config["vocab_size"]
    sums = allocate.fisher(model, ["model.embed_tokens"], [ids], labels="text")
    assert model.model.layers[0].mlp.down_proj.weight.dtype == mx.bfloat16  # restored after the float32 pass
    q.cast(model, "float32")
    logits = model(mx.array(ids[:, :-1])).astype(mx.float32)
    g = mx.softmax(logits, axis=-1) - mx.eye(config["vocab_size"])[mx.array(ids[0, 1:])]
    assert np.allclose(sums["model.embed_tokens@head"], np.array((g * g).sum((0, 1))), rtol=1e-3, atol=1e-7)
    assert sums["model.embed_tokens"].shape == (config["hidden_size"],)  # the lookup role: hidden channels


def test_a_budget_out_of_reach_is_refused(source):
    with pytest.raises(ConvertError, match="--target-bpw 2.5 is below what the narrowest width gives"):
        quantized(source, target_bpw=2.5, q_group_size=32, q_method="rtn")


@pytest.mark.parametrize("options,message", [
    (dict(target_bpw=4.5, quant_recipe="mixed_4_6"), "drop --quant-recipe"),
    (dict(target_bpw=4.5, q_mode="mxfp4"), "drop --quant-recipe / --q-mode"),
    (dict(target_bpw=4.5, q_bits=3), "drop --q-bits 3"),
    (dict(target_bpw=12), "outside what affine widths give"),
])
def test_contradictory_budget_options_are_refused(options, message):
    with pytest.raises(ConvertError, match=message):
        ConvertPlan(hf_path="x", **options)


def test_plan_names_and_cli(source, tmp_path):
    plan = ConvertPlan(hf_path="org/Model", target_bpw=4.5)
    assert plan.quantize and plan.q_bits == 4 and plan.q_group_size == 64 and plan.method == "gptq"
    assert plan.mlx_path.name == "Model-mlx-4.5bpw" and "4.5 bits per weight" in plan.recipe_name
    with pytest.raises(ConvertError, match="--variants sets each variant's quantization: drop --target-bpw"):
        variant_plans({"hf_path": "x", "target_bpw": 4.5}, "4,8")
    help_text = CliRunner().invoke(cli, ["--help"]).output
    assert "--target-bpw FLOAT" in help_text


def test_experts_are_measured_on_their_routed_tokens(tmp_path):
    """A layer of stacked experts is one unit of the allocation, measured as the sum of its experts' errors on the
    rows routed to each; the budget holds for the whole model."""
    src = make_checkpoint(tmp_path / "src", "mixtral", dtype="bfloat16", num_local_experts=4)
    model, report = quantized(src, target_bpw=5.0, q_group_size=32)
    allocation = report.allocation
    switch = [p for p in allocation.bits if p.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")]
    assert switch and not allocation.unmeasured and allocation.achieved <= 5.0
    assert all(allocation.estimates[p][min(allocation.estimates[p])] > 0 for p in switch)
    modules = dict(model.named_modules())
    assert all(modules[p].bits == allocation.bits[p] for p in switch)
