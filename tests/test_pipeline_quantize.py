"""Quantization stage: every mixed recipe, the model's optional `quant_predicate` hook (exclude a layer or give it
its own settings), and the per-layer entries mlx-lm reads, checked by loading the output in mlx-lm."""

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_arch
from checkpoints import make_checkpoint
from convert import ConvertError, convert
from convert_helpers import mlx_lm_logits, ours, rel_error

SENSITIVE_LAYERS = {0, 3, 6, 7}  # of 8: first and last eighth, then every third layer in between


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("quant") / "src", "llama", dtype="bfloat16", num_hidden_layers=8,
                           tie_word_embeddings=False)


@pytest.mark.parametrize("recipe,low,high", [("mixed_2_6", 2, 6), ("mixed_3_4", 3, 4), ("mixed_4_6", 4, 6),
                                             ("mixed_4_8", 4, 8)])
def test_recipe_gives_sensitive_layers_more_bits(source, tmp_path, recipe, low, high):
    result = convert(str(source), tmp_path / "out", quant_recipe=recipe, q_group_size=32)
    quant = json.loads((result.path / "config.json").read_text())["quantization"]
    expected = {"group_size": 32, "bits": high, "mode": "affine"}
    assert quant["bits"] == low and quant["model.embed_tokens"] == quant["lm_head"] == expected
    for i in range(8):
        for name in ("self_attn.v_proj", "mlp.down_proj"):
            assert quant.get(f"model.layers.{i}.{name}") == (expected if i in SENSITIVE_LAYERS else None), (i, name)
        assert f"model.layers.{i}.self_attn.q_proj" not in quant
    assert low < result.bits_per_weight < high + 1
    assert result.validation.passed, result.validation.failures
    assert rel_error(mlx_lm_logits(result.path), ours(result.path)) <= 1e-6


def test_model_quant_predicate_can_exclude_a_layer_or_set_its_bits(source, tmp_path, monkeypatch):
    def predicate(self, path, module):
        if path == "lm_head":
            return False  # e.g. a router or gate that must stay in float
        if path.endswith("mlp.down_proj"):
            return {"bits": 8}
        return True

    monkeypatch.setattr(mlx_arch.get_architecture("llama").Model, "quant_predicate", predicate, raising=False)
    result = convert(str(source), tmp_path / "out", quantize=True, skip_validation=True)
    quant = json.loads((result.path / "config.json").read_text())["quantization"]
    assert quant["lm_head"] is False and quant["model.layers.5.mlp.down_proj"]["bits"] == 8
    model, _ = mlx_arch.load_model(result.path)
    assert model.lm_head.weight.dtype.size == 2 and model.model.layers[5].mlp.down_proj.bits == 8
    monkeypatch.undo()  # mlx-lm's model has no such hook: it must follow the config alone
    assert rel_error(mlx_lm_logits(result.path), ours(result.path)) <= 1e-6


def test_quantization_that_changes_nothing_is_refused(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama", hidden_size=96, intermediate_size=160, head_dim=24)
    with pytest.raises(ConvertError, match="no layer can be quantized with group size 128.*--q-group-size"):
        convert(str(src), tmp_path / "out", quantize=True, q_group_size=128)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options,message", [
    (dict(q_bits=8), "apply only when quantizing"),
    (dict(quant_recipe="mixed_4_6", q_bits=8), "sets the bits"),
    (dict(q_mode="nvfp4", q_group_size=32), "nvfp4 fixes 4 bits and group size 16"),
])
def test_contradictory_settings_are_refused(tmp_path, options, message):
    with pytest.raises(ConvertError, match=message):
        convert("no/such-repo", tmp_path / "out", **options)


def test_block_format_implies_quantize(source, tmp_path):
    result = convert(str(source), tmp_path / "out", q_mode="mxfp8", skip_validation=True)
    assert json.loads((result.path / "config.json").read_text())["quantization"]["mode"] == "mxfp8"


@pytest.mark.parametrize("model_type,overrides,layers,sensitive,head", [
    ("gpt2", dict(num_hidden_layers=8), "model.h", ("attn.c_attn", "mlp.c_proj"), None),
    ("gpt_neox", dict(num_hidden_layers=8, tie_word_embeddings=False), "model.h",
     ("attention.query_key_value", "mlp.dense_4h_to_h"), "model.embed_out"),
    ("falcon", dict(num_hidden_layers=8, multi_query=True), "transformer.h",
     ("self_attention.query_key_value", "mlp.dense_4h_to_h"), None),
])
def test_recipe_follows_the_model_not_layer_names(tmp_path, model_type, overrides, layers, sensitive, head):
    """Families whose modules are not called v_proj/down_proj, nor live under .layers.N., still get the recipe:
    the model says which projections are sensitive (`sensitive(path)`) and which layer holds them."""
    src = make_checkpoint(tmp_path / "src", model_type, **overrides)
    result = convert(str(src), tmp_path / "out", quant_recipe="mixed_4_6", q_group_size=32)
    quant = json.loads((result.path / "config.json").read_text())["quantization"]
    six = {"group_size": 32, "bits": 6, "mode": "affine"}
    for i in range(8):
        for name in sensitive:
            assert quant.get(f"{layers}.{i}.{name}") == (six if i in SENSITIVE_LAYERS else None), (i, name)
    if head:
        assert quant[head] == six
    assert result.validation.passed, result.validation.failures


@pytest.mark.parametrize("bits,mode,group_size", [(2, "affine", 64), (3, "affine", 32), (4, "affine", 64),
                                                  (4, "affine", 128), (5, "affine", 64), (6, "affine", 32),
                                                  (8, "affine", 64), (8, "affine", 32), (4, "mxfp4", 32)])
@pytest.mark.parametrize("shape", [(37, 256), (3, 9, 128)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("streams", [1, 3])
def test_gate_dequantize_is_mx_dequantize(bits, mode, group_size, shape, dtype, streams, monkeypatch):
    """The gate's dequantization (affine as elementwise ops, every bit width; rows split over CPU streams, as on
    machines with many cores) gives mx.dequantize's values bit for bit, whatever the scales' dtype."""
    from mlx_arch.core import quant

    monkeypatch.setattr(quant, "_CPU_STREAMS", [mx.new_stream(mx.cpu) for _ in range(streams)])
    scale = mx.exp(mx.random.normal(shape[:-1] + (1,), key=mx.random.key(7)) * 2)  # rows of very different size
    w = (mx.random.normal(shape, key=mx.random.key(bits)) * 0.05 * scale).astype(dtype)
    q = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    biases = q[2] if len(q) > 2 else None
    with mx.stream(mx.cpu):
        ours = quant.dequantize(q[0], q[1], biases, group_size=group_size, bits=bits, mode=mode)
        ref = mx.dequantize(q[0], q[1], biases, group_size=group_size, bits=bits, mode=mode).astype(mx.float32)
    assert ours.dtype == mx.float32 and np.array_equal(np.array(ours), np.array(ref))


@pytest.mark.parametrize("options", [dict(q_bits=4, q_group_size=64), dict(q_bits=3, q_group_size=32),
                                     dict(q_bits=8, q_group_size=64), dict(q_mode="mxfp4")])
def test_parallel_rounding_writes_the_bytes_of_mlx_on_one_stream(tmp_path, monkeypatch, options):
    """Linear and embedding layers are quantized in row blocks over several streams, or in torch on worker threads
    where torch is imported (`affine.Rounding`: affine layers), and saved with look-ahead (`quantize.round_to_nearest`,
    `save.Lookahead`): the files must be those of MLX's own `nn.quantize` on one stream, byte for byte. Odd row
    counts (vocabulary 1001, 3 streams) give uneven blocks."""
    import convert.affine as affine
    import convert.quantize as q

    src = make_checkpoint(tmp_path / "src", "llama", dtype="bfloat16", num_hidden_layers=2, vocab_size=1001,
                          tie_word_embeddings=False)
    rounded = []
    real_round = affine.round_affine
    monkeypatch.setattr(affine, "round_affine", lambda w, *a: rounded.append(w.shape) or real_round(w, *a))
    outputs = {}
    for streams, torch_ready in ((1, False), (3, False), (3, True)):
        monkeypatch.setattr(q, "_STREAMS", [mx.default_stream(mx.cpu)] if streams == 1 else
                            [mx.new_stream(mx.cpu) for _ in range(streams)])
        monkeypatch.setattr(affine, "torch_ready", lambda: torch_ready)
        outputs[streams, torch_ready] = convert(str(src), tmp_path / f"out{streams}{torch_ready}", quantize=True,
                                                q_method="rtn", skip_validation=True, max_shard_size=20_000,
                                                **options).path
    # affine layers of 2, 4 or 8 bits went through torch (3, 5, 6: MLX, faster there)
    assert bool(rounded) == (options.get("q_mode") != "mxfp4" and options.get("q_bits") in affine.ROUNDED_BITS)
    files = sorted(p.name for p in outputs[1, False].glob("model*.safetensors"))
    assert len(files) > 2
    for other in ((3, False), (3, True)):
        assert files == sorted(p.name for p in outputs[other].glob("model*.safetensors"))
        for name in files:
            assert (outputs[1, False] / name).read_bytes() == (outputs[other] / name).read_bytes(), (other, name)
