"""The `mlx-convert` command through click's test runner: flags reach the pipeline, the Hub endpoint comes from
HF_ENDPOINT at call time, progress goes to stderr and the summary to stdout, and every user error is one
`Error:` line with a non-zero exit code."""

import json

import pytest
from click.testing import CliRunner

from checkpoints import make_checkpoint
from convert.cli import cli
from convert_helpers import mlx_lm_logits, ours, reference, rel_error
from pipeline_helpers import hub  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "src", "llama", style="v4",
                           rope_parameters={"rope_type": "default", "rope_theta": 40000.0})


def run(*args, cwd=None):
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(cli, [str(a) for a in args])
    with runner.isolated_filesystem(temp_dir=cwd):
        return runner.invoke(cli, [str(a) for a in args])


def test_hub_repo_to_the_default_folder(hub, src, tmp_path):
    sha = hub.seed("acme/Tiny-Model", src)
    result = run("--hf-path", "acme/Tiny-Model", "--revision", "main", "-q", "--q-bits", "8", "--q-group-size", "32",
                 cwd=tmp_path)
    assert result.exit_code == 0, result.output
    out = next(tmp_path.glob("*/Tiny-Model-mlx-8bit"))
    summary = result.stdout.strip().splitlines()
    assert summary[0].startswith("Saved Tiny-Model-mlx-8bit (") and "bits per weight" in summary[0]
    assert summary[0].endswith(" s") and summary[1] == "Validation: passed"
    assert "load" in result.stderr and "save" in result.stderr  # progress bars
    assert sha in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert rel_error(mlx_lm_logits(out), ours(out)) <= 1e-6


def test_float32_sharded_output_matches_transformers(src, tmp_path):
    out = tmp_path / "out"
    result = run("--hf-path", src, "--mlx-path", out, "--dtype", "float32", "--max-shard-size", "100KB",
                 "--skip-validation")
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 40000.0
    assert "Not validated" in (out / "README.md").read_text()
    expected = reference(src)
    assert rel_error(ours(out), expected) <= 1e-4 and rel_error(mlx_lm_logits(out), expected) <= 1e-4


@pytest.mark.parametrize("args,code,message", [
    (["-q", "--q-bits", "7"], 1, "Error: --q-bits 7 is not supported"),
    (["--q-bits", "8"], 1, "Error: --q-bits and --q-group-size apply only when quantizing"),
    (["--quant-predicate", "mixed_4_6", "--q-bits", "3"], 1, "Error: --quant-recipe mixed_4_6 sets the bits"),
    (["--max-shard-size", "lots"], 2, "is not a size such as 5GB"),
    (["--q-mode", "int3"], 2, "Invalid value for '--q-mode'"),
], ids=["bits", "bits-without-q", "recipe-bits", "shard-size", "mode"])
def test_bad_flags_are_one_line_errors(src, tmp_path, args, code, message):
    result = run("--hf-path", src, "--mlx-path", tmp_path / "out", *args)
    assert result.exit_code == code and message in result.stderr, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_existing_folder_is_refused_before_work(src, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    result = run("--hf-path", src, "--mlx-path", tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'out'} already exists and is not empty: choose another --mlx-path or pass --overwrite"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
