"""Download and publish through the real huggingface_hub client against the local Hub server."""

import json

import pytest

from checkpoints import make_checkpoint
from convert import ConvertError, convert
from convert_helpers import mlx_lm_logits, ours, rel_error
from hub_server import LocalHub

SOURCE_REPO = "acme/Tiny-Llama"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with LocalHub(tmp_path / "hub") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_test_secret_token_123")
        yield server


@pytest.fixture
def seeded(hub, tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama", shard_size="100KB")
    (src / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\ntags: [tiny]\n---\n# Tiny\n")
    (src / "modeling_notes.txt").write_text("not needed for a conversion")
    hub.seed(SOURCE_REPO, src)
    return src


def weight_requests(hub):
    return [p for m, p in hub.requests_log if m == "GET" and p.endswith((".safetensors", ".bin"))]


def test_convert_and_publish_round_trip(hub, seeded, tmp_path, capsys):
    result = convert(SOURCE_REPO, tmp_path / "out", quantize=True, q_bits=8, q_group_size=32,
                     upload_repo="me/Tiny-Llama-8bit")
    out = result.path
    assert result.validation.passed
    remote = hub.files("me/Tiny-Llama-8bit")
    local = {p.name: p.stat().st_size for p in out.iterdir()}
    assert remote == local
    assert "modeling_notes.txt" not in remote  # only the files a conversion needs were fetched
    card = hub.read("me/Tiny-Llama-8bit", "README.md").decode()
    assert "library_name: mlx" in card and "base_model: acme/Tiny-Llama" in card and "license: apache-2.0" in card
    assert "| result | passed |" in card and "mlx_lm import load" in card
    config = json.loads(hub.read("me/Tiny-Llama-8bit", "config.json"))
    assert config["quantization"]["bits"] == 8
    assert json.loads(hub.read("me/Tiny-Llama-8bit", "validation.json"))["passed"] is True
    assert hub.read("me/Tiny-Llama-8bit", "tokenizer.json") == (seeded / "tokenizer.json").read_bytes()
    assert hub.last_token == "hf_test_secret_token_123"
    assert "hf_test_secret_token_123" not in capsys.readouterr().out + card + json.dumps(result.__dict__, default=str)

    # What was published loads in mlx-lm from a fresh download and computes our logits.
    from huggingface_hub import snapshot_download

    fetched = snapshot_download("me/Tiny-Llama-8bit", endpoint=hub.endpoint, cache_dir=tmp_path / "dl")
    assert rel_error(mlx_lm_logits(fetched), ours(out)) <= 1e-6


def test_revision_is_honoured(hub, seeded, tmp_path):
    first = hub.seed(SOURCE_REPO, seeded)
    config = json.loads((seeded / "config.json").read_text())
    config["model_type"] = "no_such_arch"
    (seeded / "config.json").write_text(json.dumps(config))
    hub.seed(SOURCE_REPO, seeded)  # main now points at a broken commit
    with pytest.raises(ConvertError, match="no_such_arch"):
        convert(SOURCE_REPO, tmp_path / "a", skip_validation=True)
    result = convert(SOURCE_REPO, tmp_path / "b", revision=first, skip_validation=True)
    assert first in (result.path / "README.md").read_text()


def test_refusals_happen_before_any_weight_is_downloaded(hub, seeded, tmp_path):
    config = json.loads((seeded / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom.Model"}
    config["model_type"] = "acme_lm"  # only the repo's code implements it (native types convert despite auto_map)
    (seeded / "config.json").write_text(json.dumps(config))
    hub.seed("acme/remote-code", seeded)
    with pytest.raises(ConvertError, match="never runs checkpoint code"):
        convert("acme/remote-code", tmp_path / "out")
    assert weight_requests(hub) == []


@pytest.mark.parametrize("repo,message", [("acme/missing", "not found"), ])
def test_hub_errors_are_one_line(hub, tmp_path, repo, message):
    with pytest.raises(ConvertError, match=message) as info:
        convert(repo, tmp_path / "out")
    assert "\n" not in str(info.value) and "hf_test_secret" not in str(info.value)


def test_gated_repo_says_how_to_get_access(hub, seeded, tmp_path):
    hub.seed("acme/gated", seeded)
    hub.gated["acme/gated"] = {"hf_accepted_token"}
    with pytest.raises(ConvertError) as info:
        convert("acme/gated", tmp_path / "out")
    assert str(info.value) == (f"acme/gated is gated: accept its conditions at {hub.endpoint}/acme/gated with your "
                               "account, then log in with `hf auth login` or set HF_TOKEN")
    assert weight_requests(hub) == [] and not (tmp_path / "out").exists()
    hub.gated["acme/gated"].add("hf_test_secret_token_123")  # the user accepts the conditions
    assert convert("acme/gated", tmp_path / "out", skip_validation=True).path.is_dir()


def test_failed_validation_publishes_nothing(hub, seeded, tmp_path, monkeypatch):
    import convert.validate as validate

    real = validate.compare_outputs

    def diverge(report, mask, logits, layers, ref_logits, ref_layers):
        real(report, mask, logits * 3, layers, ref_logits, ref_layers)  # simulate a broken conversion

    monkeypatch.setattr(validate, "compare_outputs", diverge)
    with pytest.raises(ConvertError, match="validation failed: logits differ"):
        convert(SOURCE_REPO, tmp_path / "out", upload_repo="me/broken")
    assert not (tmp_path / "out").exists() and (tmp_path / "out.rejected" / "validation.json").exists()
    with pytest.raises(Exception):
        hub.files("me/broken")


def test_dry_run_publishes_nothing(hub, seeded, tmp_path):
    result = convert(SOURCE_REPO, tmp_path / "out", upload_repo="me/dry", dry_run=True, skip_validation=True)
    assert result.published.dry_run and "config.json" in result.published.files
    with pytest.raises(Exception):
        hub.files("me/dry")
    assert "Not validated" in (result.path / "README.md").read_text()


def test_private_flag_reaches_the_hub(hub, seeded, tmp_path):
    convert(SOURCE_REPO, tmp_path / "out", upload_repo="me/private-one", private=True, skip_validation=True)
    from huggingface_hub import HfApi

    assert HfApi(endpoint=hub.endpoint).model_info("me/private-one").private is True


def test_nan_weight_in_the_source_is_refused_and_nothing_published(hub, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = make_checkpoint(tmp_path / "src", "llama")
    weights = load_file(src / "model.safetensors")
    weights["model.layers.1.self_attn.o_proj.weight"][3, 7] = float("nan")
    save_file(weights, src / "model.safetensors")
    hub.seed("acme/nan-model", src)
    with pytest.raises(ConvertError, match="non-finite values in model.layers.1.self_attn.o_proj.weight"):
        convert("acme/nan-model", tmp_path / "out", upload_repo="me/nan-model")
    with pytest.raises(Exception):
        hub.files("me/nan-model")


def test_rejected_upload_keeps_the_output_and_the_retry_publishes_it(hub, seeded, tmp_path, capsys):
    """The Hub refuses the token: one line naming the cause and the retry command, the token never shown, the
    converted folder kept; the retry (`--validate-only --upload-repo`) publishes it without converting again."""
    from convert.cli import main

    hub.write_tokens = {"hf_some_other_token"}
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as info:
        convert(SOURCE_REPO, out, quantize=True, upload_repo="me/retry", skip_validation=True)
    message = str(info.value)
    assert "\n" not in message and "hf_test_secret_token_123" not in message
    assert message.startswith("upload to me/retry failed:") and "401" in message
    assert "check HF_TOKEN or `hf auth login`, and write access to me" in message
    assert f"--mlx-path {out} --validate-only --upload-repo me/retry" in message
    assert (out / "config.json").is_file() and list(out.glob("model*.safetensors"))
    assert "Not validated" in (out / "README.md").read_text()
    with pytest.raises(Exception):
        hub.files("me/retry")

    hub.write_tokens = None
    main(["--hf-path", SOURCE_REPO, "--mlx-path", str(out), "--validate-only", "--upload-repo", "me/retry"])
    assert "Published to" in capsys.readouterr().out
    assert hub.files("me/retry") == {p.name: p.stat().st_size for p in out.iterdir()}
    card = hub.read("me/retry", "README.md").decode()
    assert "| result | passed |" in card and "Not validated" not in card
    assert "# me/retry" in card and 'load("me/retry")' in card
    assert json.loads(hub.read("me/retry", "validation.json"))["passed"] is True


def test_remote_that_differs_from_the_folder_is_caught(hub, seeded, tmp_path):
    from convert.publish import PublishError, local_files, remote_files, verify_remote
    from huggingface_hub import HfApi

    out = convert(SOURCE_REPO, tmp_path / "out", upload_repo="me/checked", skip_validation=True).path
    api = HfApi(endpoint=hub.endpoint)
    remote = remote_files(api, "me/checked", "main")
    verify_remote(local_files(out), remote)  # what was published matches
    with (out / "config.json").open("a") as f:
        f.write(" ")
    (out / "extra.txt").write_text("written after the upload")
    with pytest.raises(PublishError, match=r"missing: extra.txt; size differs: config.json"):
        verify_remote(local_files(out), remote)
