"""Value checks applied to every architecture: parity with transformers, cache vs full forward, batch vs single,
fp16 vs fp32, and sanitize idempotence. Cases come from tests/data/model_configs.json."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_map

import mlx_arch
from mlx_arch.core.cache import make_prompt_cache
from checkpoints import load_reference, make_checkpoint

def _load_cases() -> list:
    """The table in data/model_configs.json, then data/cases/*.json (one file per group of families, same shape:
    {"cases": [...]}), in name order; ids must be unique."""
    data = Path(__file__).parent / "data"
    cases = json.loads((data / "model_configs.json").read_text())["cases"]
    for f in sorted((data / "cases").glob("*.json")):
        cases += json.loads(f.read_text())["cases"]
    ids = [c["id"] for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"duplicate case ids in tests/data: {dupes}")
    return cases


CASES = _load_cases()


def case_params(styles=("v5", "v4")):
    """pytest params: one per case and config style."""
    import pytest

    return [
        pytest.param(case, style, id=f"{case['id']}-{style}")
        for case in CASES
        for style in case.get("styles", styles)
    ]


def rel_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def load_hf_folder(path):
    """Our model from a transformers checkpoint folder, through sanitize and strict loading."""
    config = json.loads((Path(path) / "config.json").read_text())
    model = mlx_arch.build_model(config)
    weights = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    mlx_arch.load_weights(model, model.sanitize(weights))
    model.eval()
    return model, config, weights


def probe_tokens(vocab_size: int, length: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, length))


def build_case(tmp_path, case, style):
    path = make_checkpoint(tmp_path / case["id"], case["model_type"], style=style, tokenizer=False,
                           **case.get("overrides", {}))
    return path, *load_hf_folder(path)


def check_parity(path, model, tokens, tol=1e-4):
    ref = load_reference(path)
    with torch.no_grad():
        expected = ref(torch.tensor(tokens)).logits.float().numpy()
    ours = np.array(model(mx.array(tokens)).astype(mx.float32))
    err = rel_error(ours, expected)
    assert err <= tol, f"logits differ from transformers: relative error {err:.2e} > {tol:.0e}"
    return err


def check_cache_vs_full(model, tokens, prefill: int = 5, tol=1e-4):
    """Prefill + one-token decode steps through the cache equal a full forward pass."""
    full = model(mx.array(tokens))
    cache = make_prompt_cache(model)
    steps = [model(mx.array(tokens[:, :prefill]), cache=cache)]
    for i in range(prefill, tokens.shape[1]):
        steps.append(model(mx.array(tokens[:, i : i + 1]), cache=cache))
    err = rel_error(mx.concatenate(steps, axis=1), full)
    assert err <= tol, f"cached decode differs from the full forward: {err:.2e}"


def check_batch_vs_single(model, tokens, tol=1e-4):
    """A right-padded batch gives each row's unbatched logits at its real positions."""
    short = tokens[:, : tokens.shape[1] - 3]
    padded = np.concatenate([short, np.zeros((1, 3), dtype=short.dtype)], axis=1)
    batch = model(mx.array(np.concatenate([tokens, padded], axis=0)))
    assert rel_error(batch[0], model(mx.array(tokens))[0]) <= tol
    assert rel_error(batch[1, : short.shape[1]], model(mx.array(short))[0]) <= tol


def check_fp16_close(model, tokens, tol=5e-2):
    """The fp16 model tracks the fp32 one (catches overflow and dtype leaks such as fp32 upcasts)."""
    full = np.array(model(mx.array(tokens)))
    model.update(tree_map(lambda p: p.astype(mx.float16), model.parameters()))
    half = model(mx.array(tokens))
    assert half.dtype == mx.float16, f"fp16 model returned {half.dtype}"
    assert rel_error(np.array(half.astype(mx.float32)), full) <= tol


def check_sanitize_idempotent(model, weights):
    once = model.sanitize(dict(weights))
    twice = model.sanitize(dict(once))
    assert sorted(once) == sorted(twice)
    for k in once:
        assert once[k].shape == twice[k].shape and mx.array_equal(once[k], twice[k]), k
    assert sorted(once) == sorted(k for k, _ in tree_flatten(model.parameters()))
