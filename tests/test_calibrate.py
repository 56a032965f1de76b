"""Calibrated quantization (`--q-method gptq|search`, convert/calibrate.py) and the held-out quality probe
(convert/heldout.py): the same MLX affine format as round-to-nearest, read unchanged by `mx.dequantize` and mlx-lm,
proven by the gate whatever the rounding; gptq's activation-weighted error below round-to-nearest's on every layer.
Tiny random checkpoints only, except the slow SmolLM2 test at the end."""

import configparser
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from checkpoints import make_checkpoint
from convert import ConvertError, calibrate, card, heldout, validate
from convert import quantize as q
from convert.api import run
from convert.cli import cli
from convert.plan import ConvertPlan
from convert_helpers import mlx_lm_logits, ours, rel_error

ROOT = Path(__file__).resolve().parents[1]


def convert_with(src, out, **options):
    """A conversion through the pipeline the CLI and `convert()` share."""
    return run(ConvertPlan(hf_path=str(src), mlx_path=out, **options))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("calibrate") / "src", "llama", dtype="bfloat16",
                           num_hidden_layers=3, tie_word_embeddings=False)


def quantized_in_memory(src, scratch=None, log=None, **options):
    """(model, QuantReport) of the pipeline's build + cast + quantize stages, without saving."""
    config = json.loads((Path(src) / "config.json").read_text())
    model = q.build_model(config, mx.load(str(Path(src) / "model.safetensors")))
    q.cast(model, "bfloat16")
    plan = ConvertPlan(hf_path=str(src), quantize=True, **options)
    return model, q.quantize(model, plan, src, log=log, scratch=scratch)


# ---------------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_every_method_writes_what_mx_dequantize_reads(dtype, bits):
    rng = np.random.default_rng(bits)
    w = calibrate.stored(rng.standard_normal((48, 256)).astype(np.float32) * 0.05, dtype)
    x = rng.standard_normal((600, 256)).astype(np.float32) * rng.lognormal(0, 1, 256).astype(np.float32)
    h = x.T @ x
    reference = mx.quantize(mx.array(w).astype(getattr(mx, dtype)), group_size=64, bits=bits)
    for result in (calibrate.rtn(w, bits, 64, dtype), calibrate.search(w, bits, 64, dtype, np.diag(h)),
                   calibrate.gptq(w, h, bits, 64, dtype), calibrate.gptq(w, h, bits, 64, dtype,
                                                                         order=calibrate.activation_order(h))):
        weight, scales, biases = result.arrays()
        assert [(a.shape, a.dtype) for a in (weight, scales, biases)] == [(a.shape, a.dtype) for a in reference]
        assert result.codes.max() < 2**bits
        read = np.array(mx.dequantize(weight, scales, biases, group_size=64, bits=bits).astype(mx.float32))
        assert np.array_equal(read, result.dequantized())
        # a quantization of w, not of something else (error feedback moves weights further than rounding does)
        assert np.linalg.norm(read - w) / np.linalg.norm(w) < 2.0 ** -bits * 4


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gptq_lowers_the_activation_weighted_error_at_every_group_size(group_size):
    rng = np.random.default_rng(group_size)
    x = rng.standard_normal((2000, 256)).astype(np.float32) @ (np.eye(256, dtype=np.float32)
                                                               + 0.2 * rng.standard_normal((256, 256)).astype(np.float32))
    h = x.T @ x
    w = calibrate.stored(rng.standard_normal((64, 256)).astype(np.float32) * 0.05, "bfloat16")
    errors = {name: calibrate.weighted_error(w, r.dequantized(), h) for name, r in {
        "rtn": calibrate.rtn(w, 4, group_size, "bfloat16"),
        "search": calibrate.search(w, 4, group_size, "bfloat16", np.diag(h)),
        "gptq": calibrate.gptq(w, h, 4, group_size, "bfloat16", order=calibrate.activation_order(h)),
    }.items()}
    assert errors["gptq"] < errors["search"] < errors["rtn"], errors


# ---------------------------------------------------------------------------------------------------- layer by layer


def test_gptq_beats_round_to_nearest_on_every_layer(source):
    model, report = quantized_in_memory(source, q_method="gptq", q_group_size=32)
    errors = report.calibration.errors
    linears = [p for p, m in model.named_modules() if type(m).__name__ == "QuantizedLinear"]
    assert sorted(errors) == sorted(linears)  # every linear layer, the head included, was calibrated
    worse = {p: e for p, e in errors.items() if not e[0] < e[1]}
    assert not worse, worse
    assert report.calibration.uncalibrated == ["model.embed_tokens"]  # an untied embedding sees no activations
    assert report.calibration.tokens >= 2048


def test_the_hessian_pass_stops_once_every_module_has_its_input():
    """The calibration passes that measure X^T X stop when the last module being calibrated was fed (the layer's
    output, e.g. the down projection's product, is not needed): every Hessian is that of the rows and the last
    module never computes. A pass in which a module is never fed runs to the end, and `fed_once_each` (checked by
    the layer loop after a first whole pass) tells a module called twice, whose passes must not stop early."""
    import mlx.nn as nn

    rng = np.random.default_rng(0)
    first, second = nn.Linear(8, 8), nn.Linear(8, 4)
    hessians = calibrate._Hessians(stop_after=["a", "b"])
    computed = []

    class Recording(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, x):
            computed.append(x.shape)
            return self.inner(x)

    a = calibrate._Capture("a", Recording(first), hessians)
    b = calibrate._Capture("b", Recording(second), hessians)
    batches = [mx.array(rng.standard_normal((5, 8)).astype(np.float32)) for _ in range(2)]
    for x in batches:
        hessians.new_pass()
        with pytest.raises(calibrate._Stop):
            b(mx.tanh(a(x)))
    assert computed == [(5, 8), (5, 8)]  # a computed in each pass, b in none
    h_a, _ = hessians.pop("a")
    h_b, _ = hessians.pop("b")
    xs = [np.array(x) for x in batches]
    ys = [np.tanh(np.array(first(x))) for x in batches]
    np.testing.assert_allclose(h_a, sum(x.T @ x for x in xs), rtol=1e-5)
    np.testing.assert_allclose(h_b, sum(y.T @ y for y in ys), rtol=1e-5, atol=1e-6)
    whole = calibrate._Hessians()  # the layer loop's first pass: nothing stops it
    only_a = calibrate._Capture("a", first, whole)
    assert only_a(batches[0]).shape == (5, 8)
    assert not whole.fed_once_each(["a", "b"])  # b never fed
    assert whole.fed_once_each(["a"])
    only_a(only_a(batches[0]))
    assert not whole.fed_once_each(["a"])  # a fed three times in this pass
    whole.new_pass()
    only_a(batches[1])
    assert whole.fed_once_each(["a"])


def test_spilled_layers_are_read_back_lazily_and_unchanged(source, tmp_path):
    """With a scratch folder, each calibrated layer is written there and read back lazily (save evaluates it), so
    memory does not hold the quantized layers done so far."""
    from mlx.utils import tree_flatten

    kept, _ = quantized_in_memory(source, q_method="gptq", q_group_size=32)
    spilled, _ = quantized_in_memory(source, scratch=tmp_path, q_method="gptq", q_group_size=32)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(
        ["calibrated-head.safetensors"] + [f"calibrated-layer-{i}.safetensors" for i in range(3)])
    ours, theirs = dict(tree_flatten(kept.parameters())), dict(tree_flatten(spilled.parameters()))
    assert ours.keys() == theirs.keys()
    assert all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)


def test_search_lowers_the_error_of_most_layers(source):
    """search weighs each input channel by its activations' energy but ignores their correlations, which the
    reported error (tr(E H E^T)) includes: better on most layers, not guaranteed on each."""
    _, report = quantized_in_memory(source, q_method="search", q_group_size=32)
    ratios = sorted(ours / rtn for ours, rtn in report.calibration.errors.values())
    assert ratios[len(ratios) // 2] < 0.9 and ratios[-1] < 1.1, ratios


@pytest.mark.parametrize("method", ["gptq", "search"])
def test_output_passes_the_gate_and_mlx_lm_reads_it_unchanged(source, tmp_path, method):
    result = convert_with(source, tmp_path / method, quantize=True, q_method=method, q_group_size=32)
    assert result.validation.passed, result.validation.failures  # exact-weights parity: the proof
    assert rel_error(mlx_lm_logits(result.path), ours(result.path)) <= 1e-6
    plain = convert_with(source, tmp_path / "rtn", quantize=True, q_method="rtn", q_group_size=32,
                         skip_validation=True)
    assert layout(result.path) == layout(plain.path)  # the same files, tensors, shapes and dtypes as today
    config = lambda path: json.loads((path / "config.json").read_text())  # noqa: E731
    assert config(result.path)["quantization"] == config(plain.path)["quantization"]


def layout(folder) -> dict:
    tensors = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        tensors.update({k: (v.shape, v.dtype) for k, v in mx.load(str(f)).items()})
    return tensors


@pytest.mark.parametrize("model_type,overrides", [
    ("gpt2", {}),  # fused qkv, biases, position embeddings added to the token embeddings
    ("mixtral", dict(num_local_experts=4)),  # experts calibrated per expert; router excluded
    ("gemma2", dict(head_dim=16)),  # tied head, scaled embeddings, soft-capping, sliding layers
])
def test_gptq_through_other_families(tmp_path, model_type, overrides):
    src = make_checkpoint(tmp_path / "src", model_type, **overrides)
    result = convert_with(src, tmp_path / "out", quantize=True, q_method="gptq", q_group_size=32)
    assert result.validation.passed, result.validation.failures


def test_mixed_recipe_keeps_each_layers_bits(source, tmp_path):
    model, report = quantized_in_memory(source, q_method="gptq", quant_recipe="mixed_3_6", q_group_size=32)
    assert model.model.layers[0].self_attn.v_proj.bits == 6 and model.model.layers[1].self_attn.v_proj.bits == 3
    assert report.config["model.layers.0.self_attn.v_proj"]["bits"] == 6


def test_calibration_file_replaces_the_built_in_text(source, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("Short calibration text. " * 40 + f"\n{calibrate.DOCUMENT}\n" + "def f(x):\n    return x\n" * 30)
    _, report = quantized_in_memory(source, q_method="gptq", q_group_size=32, calibration_file=text)
    built_in = quantized_in_memory(source, q_method="gptq", q_group_size=32)[1]
    assert 0 < report.calibration.tokens < built_in.calibration.tokens
    assert report.method == "gptq" and "`mine.txt`" in report.method_description


def test_without_a_tokenizer_the_default_rounds_to_nearest(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama", tokenizer=False)
    messages = []
    result = run(ConvertPlan(hf_path=str(src), mlx_path=tmp_path / "out", quantize=True, q_group_size=32,
                             skip_validation=True), log=messages.append)
    assert result.path.is_dir() and any("no tokenizer to read the calibration text" in m for m in messages)
    with pytest.raises(ConvertError, match="--q-method gptq needs the model's tokenizer"):
        convert_with(src, tmp_path / "gptq", quantize=True, q_method="gptq", q_group_size=32, skip_validation=True)


# ---------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("options,method", [
    (dict(), "gptq"),
    (dict(q_bits=3), "gptq"),
    (dict(q_bits=8), "rtn"),
    (dict(q_mode="mxfp4"), "rtn"),
    (dict(quant_recipe="mixed_4_8"), "gptq"),
    (dict(q_method="search"), "search"),
])
def test_default_method(options, method):
    assert ConvertPlan(hf_path="x", quantize=True, **options).method == method


@pytest.mark.parametrize("model_type,overrides", [
    ("mixtral", dict(num_local_experts=4)),
    ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=32,
                       norm_topk_prob=True)),
])
def test_experts_are_calibrated_on_their_routed_tokens(tmp_path, monkeypatch, model_type, overrides):
    """By default MoE models are calibrated too: each expert by gptq on the rows routed to it, below round to
    nearest's error there; experts with too few routed tokens get the search method, and the log counts them. The
    output passes the gate and mlx-lm computes our logits from it."""
    src = make_checkpoint(tmp_path / "src", model_type, dtype="bfloat16", **overrides)
    _, report = quantized_in_memory(src, q_group_size=32)
    experts = report.calibration.expert_errors
    assert report.method == "gptq" and experts
    assert all(n < calibrate.MIN_EXPERT_TOKENS for n in report.calibration.fallback.values())
    worse = {name: e for name, e in experts.items() if not e[0] < e[1]}
    assert not worse, worse
    assert {name.rsplit("#", 1)[0].rsplit(".", 1)[1] for name in experts} == {"gate_proj", "up_proj", "down_proj"}
    # a threshold above some experts' share of the tokens: those fall back, and are counted
    tokens = report.calibration.expert_tokens
    monkeypatch.setattr(calibrate, "MIN_EXPERT_TOKENS", int(np.median(list(tokens.values()))) + 1)
    messages = []
    _, report = quantized_in_memory(src, q_group_size=32, log=messages.append)
    fallback, calibrated = report.calibration.fallback, report.calibration.expert_errors
    assert fallback and calibrated and len(fallback) + len(calibrated) == len(tokens)
    assert all(n < calibrate.MIN_EXPERT_TOKENS for n in fallback.values())
    assert all(report.calibration.expert_tokens[name] >= calibrate.MIN_EXPERT_TOKENS for name in calibrated)
    line = next(m for m in messages if "experts:" in m)
    assert f"{len(fallback)} with fewer than {calibrate.MIN_EXPERT_TOKENS} routed tokens quantized by the search" in line
    monkeypatch.undo()
    result = convert_with(src, tmp_path / "out", quantize=True, q_group_size=32)
    assert result.validation.passed, result.validation.failures
    assert rel_error(mlx_lm_logits(result.path), ours(result.path)) <= 1e-6


@pytest.mark.parametrize("options,message", [
    (dict(quantize=True, q_method="best"), "--q-method best is unknown"),
    (dict(quantize=True, q_mode="mxfp4", q_method="gptq"), "applies to --q-mode affine only"),
    (dict(q_method="gptq"), "apply only when quantizing"),
    (dict(quantize=True, q_method="rtn", calibration_file=__file__), "needs a calibrated method"),
    (dict(quantize=True, calibration_file="/no/such/file.txt"), "not a readable file"),
])
def test_contradictory_method_options_are_refused(options, message):
    with pytest.raises(ConvertError, match=message):
        ConvertPlan(hf_path="x", **options)


def test_cli_options(source, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["--hf-path", str(source), "--mlx-path", str(out), "-q", "--q-group-size",
                                      "32", "--q-method", "search", "--skip-validation"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    help_text = CliRunner().invoke(cli, ["--help"]).output
    assert "--q-method [rtn|search|gptq]" in help_text and "--calibration-file" in help_text


def test_card_states_the_method_and_the_calibration_text():
    plan = ConvertPlan(hf_path="x", quantize=True)
    text = card.render_card(repo_name="m", base_model=None, source_meta={}, commit=None, recipe=plan.recipe_name,
                            dtype="bfloat16", bits_per_weight=4.5, quantized=True, validation="", skipped_layers=[],
                            upload_repo=None, quantization_method=plan.describe_method(plan.method))
    assert "- Quantization method: gptq" in text and "built-in calibration text" in text


# ---------------------------------------------------------------------------------------------------- texts


def test_built_in_texts_are_shipped_and_disjoint():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    shipped = parser["options.package_data"]["convert"].split()
    for path in (calibrate.BUILTIN_CALIBRATION, heldout.HELDOUT):
        assert any(path.relative_to(ROOT / "convert").match(p) for p in shipped)
        assert "Apache-2.0" in path.read_text().split("\n\n")[0]  # the header states the licence
    calibration = calibrate.read_documents(calibrate.BUILTIN_CALIBRATION, header=True)
    held_out = calibrate.read_documents(heldout.HELDOUT, header=True)
    assert not any(d.startswith("#") for d in calibration + held_out if isinstance(d, str) and "Apache" in d)
    chats = [d for d in calibration if isinstance(d, list)]
    assert chats and all(t["role"] in calibrate.ROLES and t["content"] for c in chats for t in c)
    lines = lambda docs: {l for d in docs for l in json.dumps(d).split("\\n") if len(l) > 40}  # noqa: E731
    assert not lines(calibration) & lines(held_out)  # held-out text never calibrates


def test_chat_turns_go_through_the_chat_template(source):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    expected = tokenizer(tokenizer.apply_chat_template(turns, tokenize=False), add_special_tokens=False)["input_ids"]
    assert calibrate.document_ids(tokenizer, turns) == expected


# ---------------------------------------------------------------------------------------------------- held-out


def test_heldout_metrics_of_identical_logits():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 7, 11)).astype(np.float32)
    ids, mask = heldout.padded([np.arange(7) % 11, np.arange(4)])
    m = heldout.metrics(logits, logits, ids, mask)
    assert m["tokens"] == 11 and abs(m["kl_mean"]) < 1e-12 and m["top1"] == 1.0
    assert abs(m["perplexity_ratio"] - 1.0) < 1e-12


def test_heldout_measure(source, tmp_path):
    exact = convert_with(source, tmp_path / "f32", dtype="float32", skip_validation=True)
    same = heldout.measure(source, exact.path)
    assert same["tokens"] > 100 and same["kl_mean"] < 1e-6 and abs(same["perplexity_ratio"] - 1) < 1e-4
    rounded = convert_with(source, tmp_path / "q3", quantize=True, q_bits=3, q_method="rtn", q_group_size=32,
                           skip_validation=True)
    cost = heldout.measure(source, rounded.path)
    assert cost["kl_mean"] > 1e-4 and cost["tokens"] == same["tokens"]
    assert [label for label, _ in heldout.summary_rows(cost)][0].startswith("held-out text")


# ---------------------------------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_smollm2_gptq_halves_round_to_nearest_kl_at_4_bits(tmp_path):
    from smollm2 import smollm2_dir

    src = smollm2_dir()
    kl = {}
    for method in ("rtn", "gptq"):
        result = convert_with(src, tmp_path / method, quantize=True, q_method=method, skip_validation=True)
        kl[method] = heldout.measure(src, result.path, max_tokens=None)["kl_mean"]
    print(f"SmolLM2-135M 4-bit g64, held-out KL: {kl}")
    assert kl["gptq"] <= 0.5 * kl["rtn"]


def test_gate_and_card_report_the_heldout_text_and_the_method(source, tmp_path):
    result = convert_with(source, tmp_path / "out", quantize=True, q_method="gptq")
    report = json.loads((result.path / "validation.json").read_text())
    held = report["heldout"]
    assert held["tokens"] > 50 and held["kl_mean"] > 0 and held["perplexity_ratio"] > 0
    # the same figure the standalone measure gives (a separate code path over the same text)
    assert abs(heldout.measure(source, result.path)["kl_mean"] - held["kl_mean"]) < 1e-6
    text = (result.path / "README.md").read_text()
    assert "held-out text: KL" in text and "Quantization method: gptq" in text and "built-in calibration" in text
    bf16 = convert_with(source, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((bf16.path / "validation.json").read_text())["heldout"] == {}  # floats: nothing to measure


def test_gate_measures_the_heldout_text_in_passes_of_its_own_when_its_logits_are_large(source, tmp_path, monkeypatch):
    """Held-out logits past the budget are not carried beside the probes: the gate measures them apart, same figure."""
    result = convert_with(source, tmp_path / "out", quantize=True, q_method="rtn")
    joint = validate.validate(source, result.path)
    monkeypatch.setattr(heldout, "LOGITS_BYTES", 1)
    apart = validate.validate(source, result.path)
    assert "held-out text" in apart.seconds and "held-out text" not in joint.seconds
    assert apart.heldout["tokens"] == joint.heldout["tokens"] > 50 and apart.passed and joint.passed
    assert abs(apart.heldout["kl_mean"] - joint.heldout["kl_mean"]) < 1e-6


def test_pipeline_calibration_shows_progress_and_spills_each_layer_to_scratch(source, tmp_path, monkeypatch):
    """The pipeline hands calibration its scratch folder (quantized layers done so far are not held in memory)
    and a progress bar over the layers."""
    spills, install = [], calibrate.LayerwiseQuantizer.install

    def recorded(self, root, prefix, name, modules, results):
        spills.append(self.spill is not None and self.spill.is_dir())
        return install(self, root, prefix, name, modules, results)

    monkeypatch.setattr(calibrate.LayerwiseQuantizer, "install", recorded)
    bars = []
    plan = ConvertPlan(hf_path=str(source), mlx_path=tmp_path / "out", quantize=True, q_method="gptq",
                       skip_validation=True)
    run(plan, progress=lambda iterable, desc=None, unit=None: bars.append((desc, unit)) or iterable)
    assert ("quantize: gptq", "layer") in bars
    assert spills and all(spills)
    assert not any(p.name.startswith("calibrated-") for p in (tmp_path / "out").iterdir())


def test_calibration_uses_every_core_unless_they_are_busy(monkeypatch):
    """One BLAS thread only when other processes already keep every core busy; otherwise the libraries' defaults
    stay (measured faster on an idle machine). This process's own work does not count."""
    import os
    import subprocess
    import sys

    import torch

    from convert import calibrate

    cores = os.cpu_count() or 1
    monkeypatch.setattr(calibrate, "others_busy_cores", lambda: float(cores))
    assert calibrate.calibration_threads() == 1
    monkeypatch.setattr(calibrate, "others_busy_cores", lambda: cores - 0.9)
    assert calibrate.calibration_threads() is None
    monkeypatch.undo()
    # measured: a process spinning on every core is seen; this process spinning is not
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        assert calibrate.others_busy_cores(0.5) >= cores - 0.5
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    import threading

    stop = threading.Event()
    spinning = threading.Thread(target=lambda: [None for _ in iter(lambda: stop.is_set(), True)])
    spinning.start()
    try:
        assert calibrate.others_busy_cores(0.5) < 0.5
    finally:
        stop.set()
        spinning.join()
    before = torch.get_num_threads()
    with calibrate.blas_threads(None):
        assert torch.get_num_threads() == before
    with calibrate.blas_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
