"""Tiny random Hugging Face checkpoints built offline, for parity and pipeline tests.

Weights are redrawn larger than transformers' default init (std 0.02 gives near-zero logits that hide bugs) and
norm weights are perturbed away from 1 so that a mis-mapped norm changes the logits.
"""

import json
import re
from functools import lru_cache
from pathlib import Path

import torch

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_TEXT = (
    "The quick brown fox jumps over the lazy dog. Converting models to MLX keeps their logits. "
    "Release engineers publish four, six and eight bit variants. Über naïve café, 東京, emoji 🙂!\n"
    "def main():\n    return 42\n"
)


@lru_cache(maxsize=4)
def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TEXT] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def save_tokenizer(path, vocab_size: int = SMALL["vocab_size"]):
    _tokenizer(vocab_size).save_pretrained(path)


def make_config(model_type: str, **overrides):
    from transformers import AutoConfig

    params = {**SMALL, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, **overrides}
    return AutoConfig.for_model(model_type, **params)


_NORM = re.compile(r"norm|(^|\.)ln")  # RMSNorm/LayerNorm weights: `...norm.weight`, gpt2's `ln_1`, `ln_f`


# Buffers that are checkpoint data rather than derived state: DeepSeek-V3-style routers' correction biases (zeros
# when built; LFM2-MoE calls its `expert_bias`) and Gemma 4's per-layer output scalars (ones). Redrawn around their
# built value with spread 0.1 (that of the sigmoid scores a bias shifts), so that ignoring one changes the experts
# chosen or the layer's output.
_DATA_BUFFERS = re.compile(r"(^|\.)(e_score_correction_bias|expert_bias|layer_scalar)$")


def randomize(model, seed: int = 0, std: float = 0.05):
    """Redraw every parameter: matrices N(0, std), norm-like vectors 1 + N(0, 0.1), biases N(0, std); then the
    persistent buffers that are checkpoint data (`_DATA_BUFFERS`), after every parameter so that the parameters'
    draws stay those of a model without such buffers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1 and _NORM.search(name) and not name.endswith("bias"):
                mean = 0.0 if torch.all(p == 0) else 1.0  # (1 + w) norms are stored as zeros
                p.copy_(mean + 0.1 * noise)
            else:
                p.copy_(std * noise)
        saved = set(model.state_dict())
        for name, b in model.named_buffers():
            if name in saved and _DATA_BUFFERS.search(name):
                mean = 1.0 if torch.all(b == 1) else 0.0
                b.copy_(mean + 0.1 * torch.randn(b.shape, generator=gen, dtype=torch.float32))
    return model


# Keys that some transformers-4 config classes named differently (transformers 5 still reads them).
_V4_NAMES = {"gpt_neox": {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"}}
# InternLM3 checkpoints (remote code) name its biases `qkv_bias` / `bias`; InternLM3Config maps them.
_V4_NAMES["internlm3"] = {"attention_bias": "qkv_bias", "mlp_bias": "bias"}
# Qwen3-MoE Hub configs say `num_experts`; transformers 5 writes `num_local_experts`.
_V4_NAMES["qwen3_moe"] = {"num_local_experts": "num_experts"}
# Families whose transformers-4 configs kept the sliding layers' RoPE base in its own top-level key.
_V4_LOCAL_ROPE = {"gemma3_text": "rope_local_base_freq"}


def _gemma4_hub_style(config: dict) -> dict:
    """Gemma 4 came out with transformers 5: its Hub configs keep `rope_parameters`, but say `global_head_dim` and
    `num_global_key_value_heads` where transformers 5.25 writes `per_layer_config`."""
    overrides = next(iter((config.pop("per_layer_config", None) or {}).values()), {})
    for key, hub_key in (("head_dim", "global_head_dim"), ("num_key_value_heads", "num_global_key_value_heads")):
        if key in overrides:
            config[hub_key] = overrides[key]
    return config


# Families whose Hub configs differ from what transformers 5 writes in another way than transformers 4's keys.
_HUB_STYLE = {"gemma4_text": _gemma4_hub_style}


def _exaone_moe_hub_keys(config: dict) -> dict:
    """K-EXAONE's Hub configs say `is_moe_layer`, which ExaoneMoeConfig ignores; lists the config class derives
    (`mlp_layer_types` from `first_k_dense_replace`, `layer_types` from an integer `sliding_window_pattern`) are
    left out where the derivation gives them back, so that the keys they derive from are read."""
    n, kinds = config["num_hidden_layers"], config.get("mlp_layer_types")
    if kinds:
        config["is_moe_layer"] = [k == "sparse" for k in kinds]
        if kinds == ["dense" if i < config.get("first_k_dense_replace", 1) else "sparse" for i in range(n)]:
            del config["mlp_layer_types"]
    period = config.get("sliding_window_pattern")
    if isinstance(period, int) and period > 0 and config.get("layer_types") == [
            "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]:
        del config["layer_types"]
    return config


def _mimo_v2_flash_hub_keys(config: dict) -> dict:
    """MiMo-V2-Flash's Hub config (remote-code era): `hybrid_layer_pattern` / `moe_layer_freq` (1 = sliding / sparse),
    `sliding_window_size` (the window less the query), top-level `rope_theta` / `swa_rope_theta` /
    `partial_rotary_factor`; MiMoV2FlashConfig reads only `sliding_window_size` of these. Lists it derives the same
    way by default are left out."""
    n, types, kinds = config["num_hidden_layers"], config.get("layer_types"), config.get("mlp_layer_types")
    config["hybrid_layer_pattern"] = [int(t == "sliding_attention") for t in types]
    if types == ["full_attention" if i == 0 or (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]:
        del config["layer_types"]
    config["moe_layer_freq"] = [int(k == "sparse") for k in kinds]
    if kinds == ["dense"] + ["sparse"] * (n - 1):
        del config["mlp_layer_types"]
    config["sliding_window_size"] = config.pop("sliding_window") - 1
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope["full_attention"]["rope_theta"]
    config["swa_rope_theta"] = rope["sliding_attention"]["rope_theta"]
    config["partial_rotary_factor"] = rope["full_attention"].get("partial_rotary_factor", 0.334)
    return config


# Keys of Hub configs that transformers 5 no longer writes (FACTS.md): rewritten before transformers 4's keys.
_HUB_KEYS = {"exaone_moe": _exaone_moe_hub_keys, "mimo_v2_flash": _mimo_v2_flash_hub_keys}


def to_v4_style(config: dict) -> dict:
    """Rewrite a transformers-5 config dict the way transformers 4 saved it (most of the Hub)."""
    config = dict(config)
    if config.get("model_type") in _HUB_STYLE:
        config = _HUB_STYLE[config["model_type"]](config)
        config["torch_dtype"] = config.pop("dtype", None) or config.get("torch_dtype")
        return config
    if config.get("model_type") in _HUB_KEYS:
        config = _HUB_KEYS[config["model_type"]](config)
    params = config.pop("rope_parameters", None)
    if isinstance(params, dict):
        if all(isinstance(v, dict) for v in params.values()):
            if config.get("model_type") in _V4_LOCAL_ROPE and "sliding_attention" in params:
                config[_V4_LOCAL_ROPE[config["model_type"]]] = params["sliding_attention"]["rope_theta"]
            params = params.get("full_attention", next(iter(params.values())))
        params = dict(params)
        if "rope_theta" in params:
            config["rope_theta"] = params.pop("rope_theta")
        if "partial_rotary_factor" in params:
            config["partial_rotary_factor"] = params.pop("partial_rotary_factor")
        if params.get("rope_type", "default") != "default":
            config["rope_scaling"] = params
    for new, old in _V4_NAMES.get(config.get("model_type"), {}).items():
        if new in config:
            config[old] = config.pop(new)
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    return config


def make_checkpoint(
    path,
    model_type: str,
    dtype: str = "float32",
    style: str = "v5",
    shard_size=None,
    safe: bool = True,
    tokenizer: bool = True,
    seed: int = 0,
    **overrides,
) -> Path:
    """Write a tiny random checkpoint of `model_type` to `path` and return the path."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = make_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = randomize(AutoModelForCausalLM.from_config(config), seed=seed)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    if not safe:
        # transformers 5 only writes safetensors: write the legacy pickle layout ourselves.
        for f in path.glob("model*.safetensors*"):
            f.unlink()
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, path / "pytorch_model.bin")
    if style == "v4":
        cfg_file = path / "config.json"
        cfg_file.write_text(json.dumps(to_v4_style(json.loads(cfg_file.read_text())), indent=2))
    if tokenizer:
        save_tokenizer(path, config.vocab_size)
    return path


def load_reference(path):
    """The transformers model of a checkpoint folder, in float32 and eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
