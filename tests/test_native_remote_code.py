"""Official repos that still ship their own modeling code (auto_map + modeling_*.py) convert with the native
implementation when transformers and mlx-convert both implement their model_type: the repo's Python files are
never downloaded nor run, the log and the card say so, and the gate runs transformers' native class."""

import json
import shutil

import pytest

from checkpoints import make_checkpoint
from convert import ConvertError, convert
from pipeline_helpers import downloads, edit_config, hub  # noqa: F401 (fixture)

CODE = "modeling_{name}.py"
AUTO_MAP = {"AutoConfig": "configuration_{name}.Config", "AutoModelForCausalLM": "modeling_{name}.Model"}


def with_remote_code(src, folder, marker, model_type=None):
    """A copy of `src` whose config asks for the repo's code, with code files that leave `marker` if imported."""
    shutil.copytree(src, folder)
    name = model_type or json.loads((src / "config.json").read_text())["model_type"]
    edit_config(folder, auto_map={k: v.format(name=name) for k, v in AUTO_MAP.items()},
                **({"model_type": model_type} if model_type else {}))
    for prefix in ("modeling", "configuration"):
        (folder / f"{prefix}_{name}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder


@pytest.mark.parametrize("model_type,overrides", [("llama", {}), ("phi3", {}), ("internlm3", {})])
def test_native_type_converts_ignoring_the_repo_code(hub, tmp_path, model_type, overrides):
    src = make_checkpoint(tmp_path / "src", model_type, **overrides)
    marker = tmp_path / "marker"
    hub.seed(f"acme/{model_type}", with_remote_code(src, tmp_path / "repo", marker))
    lines = []
    result = convert(f"acme/{model_type}", tmp_path / "out", quantize=True, q_group_size=32, log=lines.append)
    assert result.validation.passed, result.validation.failures
    assert not marker.exists()
    assert not [f for f in downloads(hub) if f.endswith(".py")]
    assert any("ignoring the repo's own code (auto_map AutoConfig" in line for line in lines)
    card = (result.path / "README.md").read_text()
    assert "it was neither downloaded nor run" in card and f"native transformers implementation of `{model_type}`" in card
    assert "auto_map" not in json.loads((result.path / "config.json").read_text())
    assert not list(result.path.glob("*.py"))


def test_local_folder_with_native_type_converts(tmp_path):
    src = make_checkpoint(tmp_path / "src", "qwen2")
    marker = tmp_path / "marker"
    result = convert(str(with_remote_code(src, tmp_path / "repo", marker)), tmp_path / "out", quantize=True,
                     q_group_size=32)
    assert result.validation.passed and not marker.exists()


def test_type_without_native_implementation_is_still_refused(hub, tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama")
    marker = tmp_path / "marker"
    hub.seed("acme/custom", with_remote_code(src, tmp_path / "repo", marker, model_type="acme_lm"))
    with pytest.raises(ConvertError, match=r"asks for its own code \(auto_map AutoConfig, auto_map "
                                           r"AutoModelForCausalLM, .*'acme_lm' has no native implementation"):
        convert("acme/custom", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()
