"""The validation gate accepts faithful conversions and refuses broken ones, naming what is wrong."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
import numpy as np
import pytest

from checkpoints import make_checkpoint
from convert.validate import THRESHOLDS, summary_table, validate, write_report
from mlx_folders import write_mlx_folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("src") / "llama", "llama", num_hidden_layers=3,
                           rope_parameters={"rope_type": "default", "rope_theta": 50000.0})


def test_float32_conversion_passes_near_exactly(source, tmp_path):
    report = validate(source, write_mlx_folder(source, tmp_path / "out"))
    assert report.passed, report.failures
    assert report.logits["max_rel_error"] <= 1e-4
    assert report.logits["top1"] == 1.0
    assert len(report.layers) == 3 and all(r["rel_error"] <= 1e-4 for r in report.layers)
    assert report.cache_rel_error <= 1e-4 and report.batch_rel_error <= 1e-4
    assert report.prompts >= 4 and report.tokenizer["passed"]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_conversion_passes_within_its_bounds(source, tmp_path, bits):
    report = validate(source, write_mlx_folder(source, tmp_path / "q", bits=bits))
    assert report.passed, report.failures
    assert report.precision == f"affine {bits}-bit"
    assert 0 < report.logits["kl_mean"] <= THRESHOLDS[bits]["kl_mean"]


def test_diverging_layer_is_named(source, tmp_path):
    def break_layer_1(w):
        w["model.layers.1.self_attn.q_proj.weight"] = mx.concatenate([w["model.layers.1.self_attn.k_proj.weight"]] * 2)

    report = validate(source, write_mlx_folder(source, tmp_path / "bad", mutate=break_layer_1))
    assert not report.passed
    assert report.first_divergent_layer == 1
    assert report.layers[0]["rel_error"] <= 1e-4
    assert any("first diverging layer: 1 (full)" in f for f in report.failures)


def test_nan_weight_is_refused_by_name(source, tmp_path):
    def poison(w):
        w["model.layers.0.mlp.up_proj.weight"] = mx.where(mx.arange(128)[:, None] == 5, mx.nan,
                                                          w["model.layers.0.mlp.up_proj.weight"])

    report = validate(source, write_mlx_folder(source, tmp_path / "nan", mutate=poison))
    assert not report.passed
    assert report.non_finite == ["model.layers.0.mlp.up_proj.weight"]
    assert any("model.layers.0.mlp.up_proj.weight" in f for f in report.failures)


def test_tokenizer_that_encodes_differently_is_refused(source, tmp_path):
    out = write_mlx_folder(source, tmp_path / "tok")
    tok = json.loads((out / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["e"], vocab["t"] = vocab["t"], vocab["e"]  # two common byte tokens swap ids
    (out / "tokenizer.json").write_text(json.dumps(tok))
    report = validate(source, out)
    assert not report.passed
    assert not report.tokenizer["passed"] and report.tokenizer["mismatches"]


def test_named_chat_templates_are_checked(tmp_path):
    """A source whose only chat templates are named ones is validated template by template; a named template
    that renders differently in the output is refused by name."""
    from convert.validate import tokenizer_fidelity

    src = make_checkpoint(tmp_path / "src", "llama")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "chat_template.jinja").unlink()
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates/tool_use.jinja").write_text("{{ messages[0]['content'] }}<tool>")
    out = write_mlx_folder(src, tmp_path / "out")
    shutil.copytree(src / "additional_chat_templates", out / "additional_chat_templates")
    assert tokenizer_fidelity(src, out)[0]["passed"]
    (out / "additional_chat_templates/tool_use.jinja").write_text("{{ messages[0]['content'] }}<tools>")
    result = tokenizer_fidelity(src, out)[0]
    assert not result["passed"] and "chat-templated conversation (tool_use template) encodes differently" in \
        result["mismatches"]


def test_float16_overflow_is_refused_by_layer(tmp_path):
    """Activations past float16's range pass every float32 check; the float16 pass names the layer where they
    overflow, and the same model converted to bfloat16 passes."""
    from safetensors.numpy import load_file, save_file

    from convert import ConvertError, convert

    src = make_checkpoint(tmp_path / "src", "llama", num_hidden_layers=3)
    weights = load_file(src / "model.safetensors")
    weights["model.layers.1.post_attention_layernorm.weight"] *= 3000  # the MLP's product grows ~10^7 times
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"float16 activations overflow at layer 1 \(float16 ends at 65504\): "
                                           "convert with --dtype bfloat16 instead"):
        convert(str(src), tmp_path / "fp16", dtype="float16")
    report = json.loads((tmp_path / "fp16.rejected" / "validation.json").read_text())
    assert report["logits"]["kl_mean"] < THRESHOLDS["float16"]["kl_mean"]  # float32 checks alone would pass
    assert report["float16_max_abs"][0] < 65504 and report["float16_max_abs"][1] == float("inf")
    result = convert(str(src), tmp_path / "bf16", dtype="bfloat16")
    assert result.validation.passed and result.validation.float16_max_abs is None


def test_broken_cache_is_caught(source, tmp_path, monkeypatch):
    from mlx_arch.core.cache import KVCache

    out = write_mlx_folder(source, tmp_path / "cache")
    monkeypatch.setattr(KVCache, "make_mask", lambda self, N, window_size=None: None)  # prefill sees the future
    report = validate(source, out)
    assert report.cache_rel_error > 1e-2
    assert any("cache decode" in f for f in report.failures)


def test_report_is_written_and_summarised(source, tmp_path):
    out = write_mlx_folder(source, tmp_path / "out")
    report = validate(source, out)
    saved = json.loads(write_report(report, out).read_text())
    assert saved["passed"] is True and saved["logits"]["top1"] == 1.0
    table = summary_table(report)
    # Three parts, stated separately: the proof, the long-range check, the quantization cost.
    assert "| exact-weights parity (transformers holding the output's weights) | max relative logit error" in table
    assert "| shadow long-range parity | 64 tokens (no window or scaled context): full " in table
    assert "| quantization cost: top-1 agreement (all / decided positions) | 100.0% / 100.0% |" in table
    assert saved["parity"]["max_rel_error"] <= 1e-4 and saved["shadow"]["length"] == 64


def test_progress_advances_layer_by_layer_on_both_sides(source, tmp_path):
    seen = {}

    def progress(iterable, desc, unit):
        seen[desc] = []
        for item in iterable:
            seen[desc].append(item)
            yield item
        seen[desc].append("done")

    assert validate(source, write_mlx_folder(source, tmp_path / "out"), progress=progress).passed
    assert seen == {"validate: transformers": [0, 1, 2, "done"], "validate: mlx": [0, 1, 2, "done"]}


def test_mlx_side_holds_one_layer_at_a_time(tmp_path):
    """The converted model runs layer by layer: MLX memory after the last layer is no higher than after the first,
    and far below the float32 model (8 layers of ~3 MB each here)."""
    from convert.layerwise import run
    from convert.validate import probe_batch
    from mlx_arch import load_model
    from transformers import AutoTokenizer

    src = make_checkpoint(tmp_path / "src", "llama", num_hidden_layers=8, hidden_size=256, intermediate_size=768,
                          num_attention_heads=4, num_key_value_heads=4)
    out = write_mlx_folder(src, tmp_path / "out")
    model, config = load_model(out, lazy=True)
    layer_bytes = sum(v.nbytes for _, v in tree_flatten(model.layers[0].parameters()))
    ids, mask = probe_batch(AutoTokenizer.from_pretrained(src), config["vocab_size"])
    mx.clear_cache()
    mx.reset_peak_memory()
    active = []
    run(model, ids, mask, on_layer=lambda i: active.append(mx.get_active_memory()))
    assert len(active) == 8
    assert active[-1] <= active[0] + layer_bytes / 4
    assert mx.get_peak_memory() < 3 * layer_bytes + 2**20 * 8


def test_reference_side_holds_one_module_at_a_time(source):
    """The transformers reference is built on the meta device and each module's weights exist only while it runs;
    its logits and per-layer hidden states still equal the fully loaded transformers model."""
    import torch
    from convert.reference import CheckpointReader, StreamedForward, build_reference
    from transformers import AutoModelForCausalLM

    model = build_reference(source)
    assert all(p.is_meta for p in model.parameters())
    streamed = StreamedForward(model, CheckpointReader(source))
    real_counts = []

    def count_real(module, args):
        real_counts.append(sum(1 for p in model.parameters() if not p.is_meta))

    for module in model.modules():
        if any(p is not None for p in module._parameters.values()):
            module.register_forward_pre_hook(count_real)  # runs after the loading hook
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    logits, layers = streamed(ids.numpy())
    assert len(real_counts) > 10 and 0 < max(real_counts) <= 2  # a module's weight and bias
    assert all(p.is_meta for p in model.parameters())

    full = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = full(input_ids=ids, output_hidden_states=True)
    np.testing.assert_allclose(logits, ref.logits.numpy(), rtol=1e-5, atol=1e-5)
    assert len(layers) == model.config.num_hidden_layers
    np.testing.assert_allclose(layers[0], ref.hidden_states[1].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied,bits,bound", [(True, 4, 0.5), (False, None, 1.25)], ids=["tied-4bit", "untied-bf16"])
def test_vocabulary_sized_matrices_are_never_whole_in_float32(tmp_path, monkeypatch, tied, bits, bound):
    """The embedding and head are used as stored (packed 4-bit, or bf16) and turned into float32 a block of rows at
    a time, and the logits still equal those of the plain float32 forward pass. Bounds, in float32 copies of the
    8 MB vocabulary matrix: tied 4-bit 0.5 (the stored matrix is 1.1 MB); untied bf16 1.25 (two stored matrices
    of 4 MB each; float32 copies of both, as before, would be 2)."""
    from convert import layerwise
    from convert.quantize import dequantized
    from convert.validate import probe_batch
    from mlx_arch import load_model
    from transformers import AutoTokenizer

    src = make_checkpoint(tmp_path / "src", "llama", vocab_size=16384, hidden_size=128, intermediate_size=256,
                          num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=tied)
    out = write_mlx_folder(src, tmp_path / "out", dtype="bfloat16", bits=bits)
    ids, mask = probe_batch(AutoTokenizer.from_pretrained(src), 16384)
    # 4 positions in each of the three streams (the batch, the prompt alone, the cached decode), whose logits come
    # from one head call: 0.75 MB
    ids, mask = ids[:1, :4], mask[:1, :4]
    monkeypatch.setattr(layerwise.RowBlocks, "ROWS", 1024)  # blocks of 0.5 MB
    float32_matrix = 16384 * 128 * 4

    # on the CPU, as the gate runs its MLX checks wherever the default device's float32 is not true float32
    # (backend.py: MLX's CUDA backend)
    with mx.stream(mx.cpu):
        reference, _ = load_model(out)
        swaps = [(p, dequantized(m)) for p, m in reference.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
        reference.update_modules(tree_unflatten(swaps))
        reference.update(tree_map(lambda p: p.astype(mx.float32), reference.parameters()))
        expected = np.array(reference(mx.array(ids)))
        del reference, swaps

        model, _ = load_model(out, lazy=True)
        mx.clear_cache()
        mx.reset_peak_memory()
        result = layerwise.run(model, ids, mask)
    assert mx.get_peak_memory() < float32_matrix * bound
    np.testing.assert_allclose(result.logits, expected, rtol=1e-5, atol=1e-5)


def test_gate_moves_its_float32_checks_off_a_reduced_precision_device():
    """CI has no GPU: simulate MLX's CUDA backend, whose float32 products carry ~3e-4 relative error. The gate
    must then run its MLX checks on the CPU (true float32) and say so; on a true-float32 device it stays."""
    import mlx.core as mx

    from convert import backend

    measured = backend.matmul_precision(mx.cpu)
    assert measured < 1e-5  # this machine: true float32
    cuda_like = backend.choose(default="gpu", probe=lambda d: 2.8e-4 if d == "gpu" else measured)
    assert cuda_like.device == "Device(cpu, 0)" and cuda_like.precision == measured
    assert "relative error 2.8e-04" in cuda_like.note and "ran on the CPU" in cuda_like.note
    assert backend.device_of(cuda_like) == mx.cpu
    true_f32 = backend.choose(default="gpu", probe=lambda d: 6e-7)
    assert true_f32.device == "gpu" and true_f32.note == ""


def test_report_states_the_backend(source, tmp_path):
    report = validate(source, write_mlx_folder(source, tmp_path / "out", bits=4))
    # On a true-float32 device the checks stay there; elsewhere (MLX's CUDA backend) they move to the CPU.
    moved = report.backend["default_precision"] > 1e-5
    assert (report.backend["device"] != report.backend["default"]) == moved and report.backend["precision"] < 1e-5
    assert "| MLX checks ran on |" in summary_table(report)


def test_hybrid_report_names_layers_by_kind(tmp_path):
    """A recurrent/attention hybrid: the per-layer report says each layer's kind, and a layer broken in a
    recurrent layer is named as one."""
    from convert import convert
    from model_test_runner import CASES

    case = next(c for c in CASES if c["model_type"] == "bamba")
    src = make_checkpoint(tmp_path / "src", "bamba", **case.get("overrides", {}))
    report = convert(str(src), tmp_path / "out", dtype="float32").validation
    kinds = report.layer_kinds
    assert {"recurrent", "full"} <= set(kinds) and [r["kind"] for r in report.layers] == kinds
    recurrent = kinds.index("recurrent")
    name = next(k for k in mx.load(str(tmp_path / "out" / "model.safetensors"))
                if f"layers.{recurrent}." in k and k.endswith("out_proj.weight"))

    def break_recurrent(w):
        w[name] = w[name] * 1.5

    bad = validate(src, write_mlx_folder(src, tmp_path / "bad", mutate=break_recurrent))
    assert any(f"first diverging layer: {recurrent} (recurrent)" in f for f in bad.failures), bad.failures


def test_reference_weight_buffers_are_reused_only_when_free():
    """The streamed reference converts weights into pooled float32 buffers: the values are exactly `.float()`'s, a
    released buffer is handed out again, never while something still holds its storage, and let go when unused."""
    import torch
    from convert.reference import Buffers

    pool = Buffers(largest=64 * 32)
    source = torch.randn(64, 32).to(torch.bfloat16)
    param = pool.converted(source)
    assert param.dtype == torch.float32 and torch.equal(param, source.float())
    first = param.data_ptr()
    pool.release(param)
    del param
    smaller = torch.randn(40, 32).to(torch.bfloat16)  # needs more than half of the free buffer: reuses it
    param = pool.converted(smaller)
    assert param.data_ptr() == first and torch.equal(param, smaller.float())
    held = param.t()  # something outside the pool keeps a view of the storage
    pool.release(param)
    del param
    param = pool.converted(source)
    assert param.data_ptr() != first and torch.equal(held.t(), smaller.float())  # the view kept its values
    pool.release(param)
    del param
    tiny = pool.converted(torch.randn(8, 32).to(torch.bfloat16))  # far smaller than any free buffer: a new one
    assert tiny.numel() == 256 and all(b.numel() == 2048 for b, _ in pool.free)
    for _ in range(Buffers.KEEP + 1):
        pool.release(pool.converted(torch.ones(3, dtype=torch.bfloat16)))
    assert all(b.numel() == 3 for b, _ in pool.free)  # the unused large buffer was let go
    pool.release(pool.converted(torch.ones(65, 32, dtype=torch.bfloat16)))  # larger than any layer's: never kept
    assert all(b.numel() == 3 for b, _ in pool.free)


@pytest.mark.parametrize("shape,offset", [((37, 300), 0.0), ((300,), 1.0), ((5, 7, 64), 0.0), ((3, 1500), 0.0)])
def test_weight_error_is_the_relative_frobenius_error(shape, offset, monkeypatch):
    """`tensor_error`, computed a block of rows at a time in reused buffers, against the same quantity in float64."""
    import torch
    from convert import validate

    class Folded:  # a rule that stores the norm weight as 1 + w
        def stored_offset(self, key):
            return offset

    class Held:
        rules = [Folded()]

    monkeypatch.setattr(validate, "ERROR_BLOCK", 1000)  # several blocks, and rows wider than one block
    generator = torch.Generator().manual_seed(0)
    ref = torch.randn(shape, generator=generator).to(torch.bfloat16)
    ours = ref.float() + 0.01 * torch.randn(shape, generator=generator)
    expected = ((ours.double() - ref.double()).norm() / (ref.double() + offset).norm()).item()
    assert validate.tensor_error(Held(), "w", ours, ref) == pytest.approx(expected, rel=1e-5)
    assert validate.tensor_error(Held(), "w", ref.float(), ref) == 0.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_non_finite_values_are_found_in_every_block(tmp_path, monkeypatch, dtype):
    """The saved tensors are scanned in place, block by block: NaN, +inf and -inf are found wherever they sit, in
    any float dtype, and integer tensors (packed codes) are skipped."""
    import torch
    from safetensors.torch import save_file
    from convert import validate

    monkeypatch.setattr(validate, "SCAN_BLOCK", 1000)
    kind = getattr(torch, dtype)
    tensors = {name: torch.randn(50, 64).to(kind) for name in ("clean", "nan", "inf", "minus_inf", "last")}
    tensors["nan"][3, 4] = float("nan")
    tensors["inf"][20, 0] = float("inf")
    tensors["minus_inf"][0, 0] = float("-inf")
    tensors["last"][-1, -1] = float("nan")  # in the last, partial block
    tensors["codes"] = torch.full((8, 8), -1, dtype=torch.int32)  # its bytes read as floats would be NaN
    tensors["empty"] = torch.zeros(0, dtype=kind)
    save_file(dict(list(tensors.items())[:4]), tmp_path / "model-00001-of-00002.safetensors")
    save_file(dict(list(tensors.items())[4:]), tmp_path / "model-00002-of-00002.safetensors")
    assert validate.non_finite_tensors(tmp_path) == ["inf", "minus_inf", "nan", "last"]


@pytest.mark.parametrize("shape", [(37, 300), (3, 5), (7,)])
def test_same_bits_compares_bytes(shape):
    """The weight check's fast path: equal bytes only (int64 words where the size allows, bytes otherwise)."""
    import torch
    from convert.validate import same_bits

    a = torch.randn(shape).to(torch.bfloat16)
    b = a.clone()
    assert same_bits(a, b)
    b.view(-1)[-1] = -b.view(-1)[-1] if b.view(-1)[-1] != 0 else 1.0  # the last element, in the last word
    assert not same_bits(a, b)
    assert not same_bits(a, a.float()) and not same_bits(a, a.reshape(-1)[: a.numel() - 1])
    zero = torch.zeros(shape, dtype=torch.bfloat16)
    assert not same_bits(zero, -zero)  # equal values, other bytes: the full check decides (error 0)
