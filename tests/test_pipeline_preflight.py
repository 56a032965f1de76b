"""Pre-flight on a Hub repo: only config.json and the weight index are read, and every refusal happens before
any weight is downloaded, with a one-line message."""

import shutil

import pytest

from checkpoints import make_checkpoint
from convert import ConvertError, convert
from convert.plan import ConvertPlan
from convert.source import preflight
from pipeline_helpers import downloads, edit_config, hub, weight_downloads  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("pre") / "src", "llama", shard_size="100KB")


def seed_edited(hub, src, tmp_path, repo, extra_files=(), **config):
    folder = tmp_path / repo.replace("/", "_")
    shutil.copytree(src, folder)
    edit_config(folder, **config)
    for name in extra_files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("# code\n")
    return hub.seed(repo, folder)


def test_preflight_reads_only_config_and_index(hub, sharded):
    sha = hub.seed("acme/sharded", sharded)
    src = preflight(ConvertPlan("acme/sharded", "out"))
    assert src.commit == sha and src.config["model_type"] == "llama"
    assert len(src.weight_files) > 1 and all(f.startswith("model-") for f in src.weight_files)
    assert sorted(downloads(hub)) == ["config.json", "model.safetensors.index.json"]


@pytest.mark.parametrize("config,files,message", [
    (dict(model_type="mamba9"), (), "model_type 'mamba9' is not supported; supported: .*llama"),
    # A model_type that only the repo's code implements (a native one converts: tests/test_native_remote_code.py).
    (dict(model_type="acme_lm", auto_map={"AutoModelForCausalLM": "modeling_x.Model"}), (),
     r"asks for its own code \(auto_map AutoModelForCausalLM\) and 'acme_lm' has no native implementation .*"
     r"mlx-convert never runs checkpoint code"),
    (dict(model_type="acme_lm"), ("modeling_custom.py",), r"asks for its own code \(modeling_custom.py\)"),
    (dict(quantization_config={"quant_method": "awq", "bits": 4}), (), r"already quantized \(awq\)"),
], ids=["model_type", "auto_map", "code-file", "pre-quantized"])
def test_refusals_happen_before_any_weight_download(hub, sharded, tmp_path, config, files, message):
    seed_edited(hub, sharded, tmp_path, "acme/refused", files, **config)
    with pytest.raises(ConvertError, match=message) as info:
        convert("acme/refused", tmp_path / "out", quantize=True)
    assert "\n" not in str(info.value)
    assert weight_downloads(hub) == [] and not (tmp_path / "out").exists()


def test_other_python_files_are_neither_refused_nor_fetched(hub, sharded, tmp_path):
    """An inference handler or example script does not make the checkpoint need remote code; it is not downloaded."""
    seed_edited(hub, sharded, tmp_path, "acme/handler", ("handler.py", "scripts/example.py"))
    out = convert("acme/handler", tmp_path / "out", skip_validation=True).path
    assert (out / "config.json").is_file() and not list(out.rglob("*.py"))
    assert not [f for f in downloads(hub) if f.endswith(".py")]


def test_quantization_that_cannot_apply_is_refused_before_download(hub, tmp_path):
    # Every layer's input size (96 or 160) is indivisible by 64: "quantizing" would change nothing.
    src = make_checkpoint(tmp_path / "src", "llama", hidden_size=96, intermediate_size=160, head_dim=24)
    hub.seed("acme/odd", src)
    with pytest.raises(ConvertError, match="no layer can be quantized with group size 64: .* input size 96"):
        convert("acme/odd", tmp_path / "out", quantize=True, q_group_size=64)
    assert weight_downloads(hub) == []


def test_repo_without_config_is_refused(hub, tmp_path):
    folder = tmp_path / "no_config"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    hub.seed("acme/no-config", folder)
    with pytest.raises(ConvertError, match="has no config.json"):
        convert("acme/no-config", tmp_path / "out")
    assert weight_downloads(hub) == []


def test_unknown_revision_is_one_line(hub, sharded, tmp_path):
    hub.seed("acme/sharded", sharded)
    with pytest.raises(ConvertError, match="revision not found; check --revision"):
        convert("acme/sharded", tmp_path / "out", revision="v9")


def test_explicit_endpoint_wins_over_the_environment(hub, sharded, monkeypatch):
    hub.seed("acme/sharded", sharded)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    src = preflight(ConvertPlan("acme/sharded", "out", endpoint=hub.endpoint))
    assert src.repo_id == "acme/sharded"
