"""Resume: a conversion killed (SIGKILL) while writing shards, run again with the same arguments, keeps the shards
the killed run finished (verified by size and SHA-256 against the staging folder's manifest) and ends with the
same bytes as an uninterrupted run. Other arguments, or a damaged shard, are never taken over."""

import hashlib
import signal
import subprocess
import sys

import pytest

from checkpoints import make_checkpoint
from convert.cli import main

# Runs the CLI in a child process that SIGKILLs itself as it starts writing its third shard: deterministic, and
# as abrupt as a kill from outside (nothing can be cleaned up).
KILLED_AT_THIRD_SHARD = """
import os, signal, sys
import convert.save as save
original, seen = save.stream_safetensors, []
def stream(path, tensors, *rest):
    seen.append(path)
    if len(seen) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(path, tensors, *rest)
save.stream_safetensors = stream
from convert.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("resume") / "src", "llama", dtype="bfloat16", num_hidden_layers=4)


def args(src, out, *extra):
    return ["--hf-path", str(src), "--mlx-path", str(out), "-q", "--q-method", "rtn", "--max-shard-size", "12KB",
            *extra]


def run(arguments, capsys) -> str:
    main([str(a) for a in arguments])
    return capsys.readouterr().err


def files(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def killed(src, out, *extra):
    done = subprocess.run([sys.executable, "-c", KILLED_AT_THIRD_SHARD, *args(src, out, *extra)], capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-500:]
    assert not out.exists()
    staging = list(out.parent.glob(f".{out.name}.partial-*"))
    assert len(staging) == 1 and (staging[0] / ".mlx-convert-manifest.json").is_file()
    return staging[0]


def test_killed_run_resumes_and_matches_an_uninterrupted_run(src, tmp_path, capsys):
    whole = tmp_path / "a" / "model"
    run(args(src, whole), capsys)
    assert sum(1 for f in whole.glob("model-*.safetensors")) > 3  # the kill lands mid-way
    resumed = tmp_path / "b" / "model"
    killed(src, resumed)
    log = run(args(src, resumed), capsys)
    assert "resumed: 2 shard(s)" in log
    assert files(resumed) == files(whole)  # manifest gone, every byte the same
    assert sorted(p.name for p in resumed.parent.iterdir()) == ["model"]


def test_damaged_shard_is_written_again(src, tmp_path, capsys):
    out = tmp_path / "model"
    staging = killed(src, out, "--skip-validation")  # the gate is the first test's
    first = sorted(staging.glob("model-*.safetensors"))[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    first.write_bytes(bytes(data))
    log = run(args(src, out, "--skip-validation"), capsys)
    assert "resumed: 1 shard(s)" in log
    whole = tmp_path / "whole" / "model"
    run(args(src, whole, "--skip-validation"), capsys)
    assert files(out) == files(whole)


def test_other_arguments_start_afresh(src, tmp_path, capsys):
    out = tmp_path / "model"
    killed(src, out, "--skip-validation")
    log = run(args(src, out, "--skip-validation", "--q-bits", "8"), capsys)
    assert "resumed" not in log
    whole = tmp_path / "whole" / "model"
    run(args(src, whole, "--skip-validation", "--q-bits", "8"), capsys)
    assert files(out) == files(whole)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model", "whole"]
