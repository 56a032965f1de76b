"""Llama with per-layer sliding windows (`layer_types` + `sliding_window`).

transformers' llama has no sliding window; its ministral model is llama plus exactly this feature, so a ministral
checkpoint relabelled `llama` is the reference.
"""

import json

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import make_checkpoint
from mlx_arch.core.cache import KVCache, RotatingKVCache, make_prompt_cache
from model_test_runner import check_cache_vs_full, check_parity, load_hf_folder, probe_tokens

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


@pytest.fixture(scope="module")
def sliding_llama(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("sliding") / "ckpt", "ministral", tokenizer=False,
                           num_hidden_layers=3, layer_types=LAYER_TYPES, sliding_window=4, head_dim=16)
    cfg_file = path / "config.json"
    config = json.loads(cfg_file.read_text())
    config["model_type"] = "llama"
    (path / "llama").mkdir()
    for f in path.iterdir():
        if f.is_file():
            (path / "llama" / f.name).write_bytes(f.read_bytes())
    (path / "llama" / "config.json").write_text(json.dumps(config))
    model, _, _ = load_hf_folder(path / "llama")
    return path, model


def test_layers_get_their_windows(sliding_llama):
    _, model = sliding_llama
    assert [layer.window for layer in model.layers] == [4, None, 4]
    cache = make_prompt_cache(model)
    assert [type(c) for c in cache] == [RotatingKVCache, KVCache, RotatingKVCache]


def test_matches_transformers_beyond_the_window(sliding_llama):
    path, model = sliding_llama
    tokens = probe_tokens(model.args.vocab_size, 17)
    check_parity(path, model, tokens)


def test_window_changes_the_logits(sliding_llama):
    """Guard against a window that is silently ignored: without it the logits must differ."""
    _, model = sliding_llama
    tokens = mx.array(probe_tokens(model.args.vocab_size, 17))
    windowed = np.array(model(tokens))
    saved = [layer.window for layer in model.layers]
    for layer in model.layers:
        layer.window = None
    try:
        full = np.array(model(tokens))
    finally:
        for layer, w in zip(model.layers, saved):
            layer.window = w
    assert np.allclose(windowed[:, :4], full[:, :4], atol=1e-5)
    assert np.abs(windowed[:, 8:] - full[:, 8:]).max() > 1e-3


@pytest.mark.parametrize("prefill", [1, 3, 9])
def test_rotating_cache_decode_equals_full_forward(sliding_llama, prefill):
    _, model = sliding_llama
    check_cache_vs_full(model, probe_tokens(model.args.vocab_size, 15, seed=prefill), prefill=prefill)


def test_chat_mode_chunks_equal_full_forward(sliding_llama):
    """Alternating multi-token and single-token updates through the rotating cache."""
    _, model = sliding_llama
    tokens = probe_tokens(model.args.vocab_size, 22, seed=5)
    full = np.array(model(mx.array(tokens)))
    cache = make_prompt_cache(model)
    outs, pos = [], 0
    for size in [6, 1, 1, 5, 1, 7, 1]:
        outs.append(np.array(model(mx.array(tokens[:, pos : pos + size]), cache=cache)))
        pos += size
    assert np.allclose(np.concatenate(outs, axis=1), full, atol=1e-4)
