"""Fetch: exactly the files a conversion needs, safetensors preferred over .bin, pinned to the commit that
pre-flight resolved; a local folder is used in place; HF_HUB_OFFLINE converts from the cache."""

import shutil

import pytest

from checkpoints import make_checkpoint
from convert import ConvertError, convert
from convert.plan import ConvertPlan
from convert.source import fetch, preflight
from convert_helpers import mlx_lm_logits, reference, rel_error
from pipeline_helpers import hub, weight_downloads  # noqa: F401 (fixture)

EXTRAS = ["original/consolidated.00.pth", "onnx/model.onnx", "notes.txt", "flax_model.msgpack"]


@pytest.fixture(scope="module")
def both_formats(tmp_path_factory):
    """A repo that ships the same weights as safetensors and as .bin, plus files a conversion never needs."""
    root = tmp_path_factory.mktemp("fetch")
    src = make_checkpoint(root / "src", "llama", rope_parameters={"rope_type": "default", "rope_theta": 30000.0})
    shutil.copy(make_checkpoint(root / "bin", "llama", safe=False) / "pytorch_model.bin", src)
    for name in EXTRAS:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"unused")
    (src / "README.md").write_text("---\nlicense: mit\n---\n# Tiny\n")
    return src


def test_fetch_downloads_only_what_is_needed_at_the_resolved_commit(hub, both_formats, tmp_path):
    sha = hub.seed("acme/both", both_formats)
    plan = ConvertPlan("acme/both", tmp_path / "out", revision="main")
    src = preflight(plan)
    assert src.weight_files == ["model.safetensors"] and src.commit == sha
    folder = fetch(plan, src)
    assert folder.name == sha  # the snapshot of that commit, whatever `main` points at later
    fetched = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert weight_downloads(hub) == ["model.safetensors"]
    assert not set(EXTRAS) & set(fetched) and "pytorch_model.bin" not in fetched
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "README.md"):
        assert name in fetched, name


def test_local_folder_is_used_in_place(both_formats, tmp_path):
    plan = ConvertPlan(str(both_formats), tmp_path / "out")
    src = preflight(plan)
    assert fetch(plan, src) == both_formats and src.weight_files == ["model.safetensors"]
    assert src.commit is None and src.repo_id is None


def test_offline_mode_converts_from_the_cache(hub, both_formats, tmp_path, monkeypatch):
    sha = hub.seed("acme/both", both_formats)
    with pytest.raises(ConvertError, match="HF_HUB_OFFLINE is set and acme/both is not in the local cache"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        convert("acme/both", tmp_path / "never")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    convert("acme/both", tmp_path / "online", skip_validation=True)  # fills the cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.requests_log)
    result = convert("acme/both", tmp_path / "offline")
    assert len(hub.requests_log) == before  # not one request
    assert result.validation.passed and sha in (result.path / "README.md").read_text()
    assert rel_error(mlx_lm_logits(result.path), reference(both_formats)) <= 1e-4


def test_named_chat_templates_are_fetched_and_kept(hub, tmp_path):
    """Templates under additional_chat_templates/ (transformers >= 4.54) travel with the model, byte for byte."""
    from transformers import AutoTokenizer

    src = make_checkpoint(tmp_path / "src", "llama")
    templates = src / "additional_chat_templates"
    templates.mkdir()
    (templates / "tool_use.jinja").write_text("{% for m in messages %}<tool>{{ m['content'] }}{% endfor %}")
    (templates / "notes.txt").write_text("not a template")
    hub.seed("acme/templates", src)
    out = convert("acme/templates", tmp_path / "out", skip_validation=True).path
    assert sorted(p.name for p in (out / "additional_chat_templates").iterdir()) == ["tool_use.jinja"]
    copied = out / "additional_chat_templates/tool_use.jinja"
    assert copied.read_bytes() == (templates / "tool_use.jinja").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="tool_use",
                                         tokenize=False)
    assert text == "<tool>hi"
