"""Test-wide settings: no network, no Xet, no writes to the user's Hugging Face cache."""

import os
import tempfile
import sys
from pathlib import Path

# Set before huggingface_hub is imported anywhere.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# huggingface_hub fixes its cache folders when it is imported: point them at a private temporary folder now, so
# no test reads or writes the user's cache (a file cached by an earlier run could hide a missing download).
_HF_HOME = tempfile.mkdtemp(prefix="mlx-convert-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")

import convert  # noqa: E402,F401  (loads the fast BLAS before any test module imports mlx.core)
import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))


@pytest.fixture(autouse=True)
def _no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
