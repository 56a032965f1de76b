"""Helpers for the pipeline stage tests: a local Hub fixture, config edits, and what was downloaded."""

import json

import pytest

from hub_server import LocalHub

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local Hub that huggingface_hub reaches through HF_ENDPOINT (read by the pipeline at call time), with a
    download cache of its own: huggingface_hub fixed its default cache folder when it was first imported, which
    may be before conftest pointed HF_HOME elsewhere, and a cached file would hide a download."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    with LocalHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return config


def downloads(hub) -> list:
    """Repo file paths fetched with GET, in order (HEAD requests only ask for metadata)."""
    return [path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in hub.requests_log
            if method == "GET" and "/resolve/" in path]


def weight_downloads(hub) -> list:
    return [path for path in downloads(hub) if path.endswith(WEIGHT_SUFFIXES)]
