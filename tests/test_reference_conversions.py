"""The streamed transformers reference loads parameters that transformers builds from several checkpoint tensors
(`WeightConverter`s: per-expert MoE weights fused into one parameter), one layer's group at a time, and names what a
checkpoint lacks."""

import json
import shutil

import numpy as np
import pytest
import torch

from mlx_arch.core.base import text_config

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
             num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {  # family -> (config class name, its own names for 4 experts of intermediate size 32)
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, intermediate_size=32)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=32, intermediate_size=48)),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, intermediate_size=32)),
}
# One expert's tensor of layer 1, as a Hub checkpoint names it (Mixtral keeps its original module names).
ONE_EXPERT_KEY = {"mixtral": "model.layers.1.block_sparse_moe.experts.2.w3.weight",
                  "qwen3_moe": "model.layers.1.mlp.experts.2.up_proj.weight",
                  "olmoe": "model.layers.1.mlp.experts.2.up_proj.weight"}


def tiny_moe(family, folder):
    """A random 2-layer, 4-expert checkpoint of `family` in the per-expert layout Hub checkpoints have."""
    import transformers

    name, own = FAMILIES[family]
    config = getattr(transformers, name)(**SIZES, **own)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # the default 0.02 leaves logits near zero, where any loading mistake hides
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder)  # transformers 5 writes the original per-expert keys (reverts its converters)
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def moe(request, tmp_path_factory):
    return request.param, tiny_moe(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")


def keys_of(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


def rewritten(source, folder, edit):
    """A copy of `source` whose tensors are `edit(state dict)`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    tensors = edit(load_file(str(source / "model.safetensors")))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def reference_outputs(folder, ids):
    """Logits and each decoder layer's output of the fully loaded transformers model."""
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layers = []
    for layer in full.model.layers:
        layer.register_forward_hook(lambda m, a, out: layers.append((out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        logits = full(input_ids=ids, use_cache=False).logits
    return logits.numpy(), [h.numpy() for h in layers]


def streamed(folder):
    from convert.reference import CheckpointReader, StreamedForward, build_reference

    return StreamedForward(build_reference(folder), CheckpointReader(folder))


def assert_same_outputs(folder, run):
    ids = torch.randint(0, SIZES["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    logits, layers = run(ids.numpy())
    ref_logits, ref_layers = reference_outputs(folder, ids)
    assert np.abs(ref_logits).std() > 0.5  # a real signal, not near-zero logits
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert len(layers) == len(ref_layers) == SIZES["num_hidden_layers"]
    for ours, theirs in zip(layers, ref_layers):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_checkpoint_holds_per_expert_keys(moe):
    family, folder = moe
    assert ONE_EXPERT_KEY[family] in keys_of(folder)
    assert not any(k.endswith("gate_up_proj") for k in keys_of(folder))


def test_fused_experts_load_like_from_pretrained(moe):
    _, folder = moe
    assert_same_outputs(folder, streamed(folder))


def test_fused_layout_checkpoint_loads_by_plain_keys(moe, tmp_path):
    """A checkpoint already holding the fused parameters (transformers' in-memory names) needs no converter."""
    from transformers import AutoModelForCausalLM

    _, folder = moe
    fused = rewritten(folder, tmp_path / "fused", lambda _: AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32).state_dict())
    assert any(k.endswith("experts.gate_up_proj") for k in keys_of(fused))
    run = streamed(fused)
    assert all(isinstance(s, str) for s in run.sources.values())
    assert_same_outputs(folder, run)


def test_experts_are_read_one_layer_at_a_time(moe):
    """Each module holds only its own parameters while it runs; a fused expert parameter is read from its own
    layer's checkpoint tensors only, when its module runs."""
    _, folder = moe
    run = streamed(folder)
    model, reader = run.model, run.reader
    reads, per_module, real_counts = [], [], []
    original_get = reader.get
    reader.get = lambda key, *rest: reads.append(key) or original_get(key, *rest)

    def before(module, args):  # registered after the loading hook, so it sees what the load did
        real_counts.append(sum(1 for p in model.parameters() if not p.is_meta))
        per_module.append((run._names[id(module)], list(reads)))
        reads.clear()

    for module in model.modules():
        if any(p is not None for p in module._parameters.values()):
            module.register_forward_pre_hook(before)
    run(np.zeros((1, 5), dtype=np.int64))
    assert 0 < max(real_counts) <= 2  # gate_up_proj and down_proj of one experts module at most
    assert all(p.is_meta for p in model.parameters())
    experts = [(name, keys) for name, keys in per_module if name.endswith("mlp.experts")]
    assert len(experts) == SIZES["num_hidden_layers"]
    for name, keys in experts:
        layer = name.split(".")[2]
        assert len(keys) == 3 * 4 and all(k.startswith(f"model.layers.{layer}.") for k in keys)


def test_missing_expert_tensor_is_named(moe, tmp_path):
    family, folder = moe
    key = ONE_EXPERT_KEY[family]
    broken = rewritten(folder, tmp_path / "broken", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(ValueError) as info:
        streamed(broken)
    message = str(info.value)
    assert "\n" not in message and key in message and "model.layers.1.mlp.experts.gate_up_proj" in message
    assert "layers.0" not in message  # nothing else is reported


def test_missing_last_expert_is_refused_by_shape(moe, tmp_path):
    """A whole last expert missing leaves no gap to name: the converted parameter's shape refuses it."""
    family, folder = moe
    last = ONE_EXPERT_KEY[family].split(".experts.2.")[0] + ".experts.3."
    broken = rewritten(folder, tmp_path / "broken", lambda t: {k: v for k, v in t.items() if last not in k})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.\w+: .*shape"):
        streamed(broken)(np.zeros((1, 3), dtype=np.int64))


def test_parameter_nothing_provides_is_named(moe, tmp_path):
    """Neither a key, a renaming nor a converter gives layer 1's down_proj or the final norm: both are named."""
    family, folder = moe
    down = {"mixtral": ".w2.", "qwen3_moe": ".down_proj.", "olmoe": ".down_proj."}[family]
    gone = lambda k: k == "model.norm.weight" or (k.startswith("model.layers.1.") and down in k)
    broken = rewritten(folder, tmp_path / "broken", lambda t: {k: v for k, v in t.items() if not gone(k)})
    with pytest.raises(ValueError, match="lacks weights the reference needs") as info:
        streamed(broken)
    message = str(info.value)
    assert "\n" not in message
    assert "model.layers.1.mlp.experts.down_proj" in message and "model.norm.weight" in message


def test_text_config_of_a_container_and_of_a_plain_config():
    container = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
                 "tie_word_embeddings": False, "image_token_index": 32000, "quantization_config": {"bits": 4},
                 "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024},
                 "text_config": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                                 "vocab_size": 32064}}
    text = text_config(container)
    assert text["model_type"] == "llama" and text["num_hidden_layers"] == 32 and text["vocab_size"] == 32064
    assert text["tie_word_embeddings"] is False and text["quantization_config"] == {"bits": 4}
    assert "vision_config" not in text and "text_config" not in text and "architectures" not in text
    container["text_config"]["tie_word_embeddings"] = True  # the text model's own statement wins
    assert text_config(container)["tie_word_embeddings"] is True
    plain = {"model_type": "qwen3", "num_hidden_layers": 28, "tie_word_embeddings": True}
    assert text_config(plain) == plain
    assert json.loads(json.dumps(text))  # still a plain JSON dict
