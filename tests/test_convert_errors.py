"""Bad input gets a one-line ConvertError that says what is wrong and what to do, before any weight is read,
and leaves no output behind."""

import json
import pytest
import torch
from click.testing import CliRunner

from checkpoints import make_checkpoint
from convert import ConvertError, convert
from convert.cli import main


class Payload:
    def __reduce__(self):
        return (print, ("this would run at unpickling time",))


@pytest.fixture
def src(tmp_path):
    return make_checkpoint(tmp_path / "src", "llama")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def refuse(src, tmp_path, match, **options):
    with pytest.raises(ConvertError, match=match) as info:
        convert(str(src), tmp_path / "out", **options)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return str(info.value)


def test_unknown_architecture_lists_the_supported_ones(src, tmp_path):
    edit_config(src, model_type="mamba9")
    message = refuse(src, tmp_path, "model_type 'mamba9' is not supported")
    assert "llama" in message and "qwen3" in message


def test_remote_code_is_refused(src, tmp_path):
    edit_config(src, model_type="acme_lm", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomModel"})
    refuse(src, tmp_path, "never runs checkpoint code")


def test_already_quantized_source_is_refused(src, tmp_path):
    edit_config(src, quantization_config={"quant_method": "gptq", "bits": 4})
    refuse(src, tmp_path, r"already quantized \(gptq\)")


def test_truncated_safetensors(src, tmp_path):
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 1000])
    refuse(src, tmp_path, "model.safetensors is truncated or corrupt")


def test_garbage_safetensors(src, tmp_path):
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    refuse(src, tmp_path, "not a valid safetensors file")


def test_pickle_with_code_is_refused(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama", safe=False)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["evil"] = Payload()  # an arbitrary object: only the weights-only unpickler stops it
    torch.save(state, src / "pytorch_model.bin")
    refuse(src, tmp_path, "never unpickles arbitrary code")


def test_missing_key_is_named(src, tmp_path):
    from safetensors.numpy import load_file, save_file

    weights = load_file(src / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.1.mlp.extra.weight"] = weights["model.norm.weight"]
    save_file(weights, src / "model.safetensors")
    message = refuse(src, tmp_path, "missing keys: model.layers.1.mlp.up_proj.weight")
    assert "unexpected keys: model.layers.1.mlp.extra.weight" in message


def test_missing_config(src, tmp_path):
    (src / "config.json").unlink()
    refuse(src, tmp_path, "config.json is missing")


def test_existing_target_is_kept(src, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="already exists and is not empty"):
        convert(str(src), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    result = convert(str(src), tmp_path / "out", overwrite=True, skip_validation=True)
    assert not (result.path / "keep.txt").exists() and (result.path / "model.safetensors").exists()


def test_failure_during_save_leaves_nothing(src, tmp_path, monkeypatch):
    import convert.save as save

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save, "copy_side_files", explode)
    with pytest.raises(OSError):
        convert(str(src), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_full_disk_is_one_line_and_leaves_nothing(src, tmp_path, monkeypatch, capsys):
    """Running out of space while a `.bin` source is spilled or a shard is written: one line naming the file and
    what to do; neither the staging folder nor the scratch folder stays behind."""
    import errno
    import shutil

    from convert import safetensors_file

    binary = tmp_path / "bin"
    shutil.copytree(make_checkpoint(tmp_path / "made", "llama", safe=False), binary)
    shutil.rmtree(tmp_path / "made")
    real = safetensors_file.write
    for source, calls_before_failure in ((src, 0), (binary, 1)):  # a shard write; a shard after the .bin spill
        calls = []

        def full(path, entries, fmt, *digest):
            calls.append(path)
            if len(calls) > calls_before_failure:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, entries, fmt, *digest)

        monkeypatch.setattr(safetensors_file, "write", full)
        with pytest.raises(SystemExit) as info:
            main(["--hf-path", str(source), "--mlx-path", str(tmp_path / "out")])
        assert info.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("Error: No space left on device (") and err.endswith(
            "free some space or choose another --mlx-path (a conversion needs room for its output, and for a copy "
            "of .bin sources)")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "src"]


def test_dead_network_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    refuse("org/model", tmp_path, "cannot reach http://127.0.0.1:9")


def test_cli_prints_one_line_error_and_exit_code(src, tmp_path, capsys):
    edit_config(src, model_type="mamba9")
    with pytest.raises(SystemExit) as exit_info:
        main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("Error: model_type 'mamba9' is not supported")
    assert "Traceback" not in "\n".join(err)


def test_cli_help_explains_the_flags():
    from convert.cli import cli

    text = CliRunner().invoke(cli, ["--help"]).output
    for flag in ("--hf-path", "--revision", "--mlx-path", "--quantize", "--q-bits", "--q-group-size", "--q-mode",
                 "--quant-recipe", "--quant-predicate", "--dtype", "--dequantize", "--upload-repo", "--private",
                 "--skip-validation", "--dry-run", "--max-shard-size", "--overwrite", "HF_TOKEN"):
        assert flag in text, flag


def test_cli_converts(src, tmp_path):
    from convert.cli import cli

    result = CliRunner().invoke(cli, ["--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "-q",
                                      "--quant-predicate", "mixed_4_6"])
    assert result.exit_code == 0, result.output
    assert "Validation: passed" in result.output and "bits per weight" in result.output
    quant = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert quant["bits"] == 4 and quant["model.embed_tokens"]["bits"] == 6


def test_validate_only_checks_an_existing_folder(src, tmp_path, capsys):
    from mlx_folders import write_mlx_folder

    good = write_mlx_folder(src, tmp_path / "good")
    main(["--hf-path", str(src), "--mlx-path", str(good), "--validate-only"])
    assert json.loads((good / "validation.json").read_text())["passed"] is True

    def break_norm(w):
        w["model.norm.weight"] = w["model.norm.weight"] * -1

    bad = write_mlx_folder(src, tmp_path / "bad", mutate=break_norm)
    with pytest.raises(SystemExit) as exit_info:
        main(["--hf-path", str(src), "--mlx-path", str(bad), "--validate-only"])
    assert exit_info.value.code == 1
    assert "Error: validation failed: logits differ" in capsys.readouterr().err
    assert json.loads((bad / "validation.json").read_text())["passed"] is False
