"""No traceback reaches the user: unusual inputs, a busy output folder, a flaky Hub, signals and our own faults each
end in one line that says what is wrong and what to do, at the earliest stage that can know, with nothing left
behind (no output, no hidden staging folder) and the user's files intact."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from checkpoints import make_checkpoint
from convert.cli import main
from pipeline_helpers import hub  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("rel") / "src", "llama", dtype="bfloat16")


def run_cli(args, capsys):
    """(exit code, stdout, stderr) of `mlx-convert args`."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def leftovers(out):
    """The output folder and any hidden sibling a run may create (staging, scratch, lock)."""
    return sorted(p.name for p in out.parent.glob(f"*{out.name}*"))


def edited_copy(src, dest, config=None, drop=()):
    shutil.copytree(src, dest)
    if config is not None:
        path = dest / "config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text())) or json.loads(path.read_text())))
    for name in drop:
        (dest / name).unlink()
    return dest


def set_key(key, value):
    def change(config):
        config[key] = value
        return config
    return change


# id -> (config change, files to drop, extra args, expected message)
LOCAL_CASES = {
    "negative-size": (set_key("hidden_size", -64), (), [], r"hidden_size = -64 is not a plausible size"),
    "string-size": (set_key("num_hidden_layers", "2"), (), [], r"num_hidden_layers = '2' is not a plausible size"),
    "huge-vocab": (set_key("vocab_size", 10**12), (), [], r"vocab_size = 1000000000000 is not a plausible size"),
    "bad-rope": (set_key("rope_parameters", {"rope_type": "no-such-rope", "rope_theta": 1e4}), (), [],
                 r"does not describe a valid llama model: .*no-such-rope"),
    "no-tokenizer": (None, ("tokenizer.json", "tokenizer_config.json"), [],
                     r"the source has no tokenizer .* or pass --skip-validation"),
    "unsupported-quantized": (set_key("quantization_config", {"quant_method": "bitnet"}), (), [],
                              r"already quantized \(bitnet\)"),
}


@pytest.mark.parametrize("case", LOCAL_CASES)
def test_bad_local_input_is_one_line_before_any_conversion(good, tmp_path, capsys, case):
    change, drop, extra, message = LOCAL_CASES[case]
    src = edited_copy(good, tmp_path / "src", change, drop)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "out"
    code, _, err = run_cli(["--hf-path", src, "--mlx-path", out, "-q", *extra], capsys)
    lines = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    import re

    assert re.search(message, lines[0]), lines[0]
    assert leftovers(out) == []
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_missing_tokenizer_is_fine_without_the_gate(good, tmp_path, capsys):
    src = edited_copy(good, tmp_path / "src", drop=("tokenizer.json", "tokenizer_config.json"))
    code, _, err = run_cli(["--hf-path", src, "--mlx-path", tmp_path / "out", "--skip-validation"], capsys)
    assert code == 0, err


def test_full_disk_is_refused_before_converting(good, tmp_path, capsys, monkeypatch):
    import collections

    import convert.checks as checks

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    code, _, err = run_cli(["--hf-path", good, "--mlx-path", tmp_path / "out"], capsys)
    assert code == 1 and "not enough disk space for the output" in err and "GiB free" in err
    assert leftovers(tmp_path / "out") == []


def test_unwritable_output_is_refused_before_converting(good, tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): permissions cannot be tested")
        code, _, err = run_cli(["--hf-path", good, "--mlx-path", locked / "out"], capsys)
        assert code == 1 and "cannot write to" in err
    finally:
        locked.chmod(0o700)


def test_a_second_run_on_the_same_output_stops_at_once(good, tmp_path, capsys):
    import convert.save as save

    out = tmp_path / "out"
    with save.locked(out):
        code, _, err = run_cli(["--hf-path", good, "--mlx-path", out, "--skip-validation"], capsys)
    assert code == 1 and f"another mlx-convert run (pid {os.getpid()}) is writing" in err
    assert leftovers(out) == []


def test_stale_staging_of_a_killed_run_is_cleared_and_never_taken_for_output(good, tmp_path, capsys):
    out = tmp_path / "out"
    stale = tmp_path / ".out.partial-999999"  # no such process
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    code, _, err = run_cli(["--hf-path", good, "--mlx-path", out, "--skip-validation"], capsys)
    assert code == 0, err
    assert leftovers(out) == ["out"] and (out / "config.json").exists()


def test_our_own_fault_says_it_is_a_bug(good, tmp_path, capsys, monkeypatch):
    import convert.api as api

    def broken(*args, **kwargs):
        raise RuntimeError("something impossible")

    monkeypatch.setattr(api, "convert_weights", broken)
    code, _, err = run_cli(["--hf-path", good, "--mlx-path", tmp_path / "out", "--skip-validation"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "internal error in mlx-convert (RuntimeError: something impossible at test_reliability.py:" in err
    assert "this is a bug" in err and "--verbose" in err
    assert leftovers(tmp_path / "out") == []
    code, _, err = run_cli(["--hf-path", good, "--mlx-path", tmp_path / "out", "--skip-validation", "--verbose"],
                           capsys)
    assert code == 2 and "Traceback (most recent call last)" in err


# --- the Hub -----------------------------------------------------------------------------------------------------

@pytest.fixture
def seeded(hub, good, monkeypatch):
    from huggingface_hub.utils import _http

    monkeypatch.setenv("HF_TOKEN", "hf_write_token")
    monkeypatch.setenv("MLX_CONVERT_RETRY_DELAY", "0.01")  # our retries (uploads), then huggingface_hub's (downloads)
    monkeypatch.setitem(_http.http_backoff.__kwdefaults__, "base_wait_time", 0.01)
    monkeypatch.setitem(_http.http_backoff.__kwdefaults__, "max_wait_time", 0.02)
    hub.seed("acme/tiny", good)
    return "acme/tiny"


PUBLISH_CASES = {
    "bad-repo-id": ("me/bad name!", None, r"--upload-repo 'me/bad name!' is not a valid repo id"),
    "no-namespace-rights": ("someone-else/tiny-4bit", None, r"cannot publish to 'someone-else'"),
    "read-only-token": ("me/tiny-4bit", "read-only", r"the token is read-only"),
    "no-token": ("me/tiny-4bit", "none", r"publishing needs a Hugging Face token"),
    "holds-another-model": ("me/other", "other", r"me/other already holds 2 files of another model"),
}


@pytest.mark.parametrize("case", PUBLISH_CASES)
def test_publishing_problems_are_found_before_downloading(hub, seeded, tmp_path, capsys, monkeypatch, case):
    repo, setup, message = PUBLISH_CASES[case]
    if setup == "read-only":
        hub.read_tokens.add("hf_write_token")
    elif setup == "none":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
        import huggingface_hub.constants as constants

        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    elif setup == "other":
        other = tmp_path / "other"
        other.mkdir()
        (other / "weights.bin").write_bytes(b"x")
        (other / "notes.txt").write_text("another model")
        hub.seed("me/other", other)
    code, _, err = run_cli(["--hf-path", seeded, "--mlx-path", tmp_path / "out", "-q", "--upload-repo", repo],
                           capsys)
    import re

    assert code == 1 and "Traceback" not in err and re.search(message, err), err
    assert not [p for p in hub.requests_log if p[1].endswith(".safetensors")]  # no weight was downloaded
    assert leftovers(tmp_path / "out") == []


def test_transient_hub_errors_are_retried(hub, seeded, tmp_path, capsys):
    hub.fail(times=2, status=503, match="model.safetensors")
    hub.fail(times=1, drop=True, match="/commit/")
    code, out, err = run_cli(["--hf-path", seeded, "--mlx-path", tmp_path / "out", "-q", "--upload-repo",
                              "me/tiny-4bit"], capsys)
    assert code == 0, err
    assert "Published to" in out and hub.files("me/tiny-4bit")


def test_a_hub_that_keeps_failing_is_one_line(hub, seeded, tmp_path, capsys):
    hub.fail(times=100, status=502, match="model.safetensors")
    code, _, err = run_cli(["--hf-path", seeded, "--mlx-path", tmp_path / "out"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert "kept failing (HTTP 502)" in lines[0] and "try again later" in lines[0]
    assert leftovers(tmp_path / "out") == []


# --- signals -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage,after", [("load", 2.5), ("validate", 5.0)])
def test_sigterm_leaves_nothing_behind(tmp_path, stage, after):
    """A real `mlx-convert` process, terminated during its run: exit status 130 and no output or staging."""
    src = make_checkpoint(tmp_path / "src", "llama", num_hidden_layers=8, hidden_size=256, intermediate_size=768,
                          num_attention_heads=4, num_key_value_heads=4)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from convert.cli import main; main()", "--hf-path", str(src),
                             "--mlx-path", str(out), "-q"], env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    if proc.poll() is not None:
        pytest.skip(f"the run finished within {after} s, before the {stage} stage could be interrupted")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Interrupted: no partial output was left behind." in err and "Traceback" not in err
    assert leftovers(out) == []


def test_sigkill_leaves_nothing_the_next_run_takes_for_output(tmp_path):
    """SIGKILL cannot be caught: what the killed run leaves is hidden (a staging folder that was never renamed into
    place), and the next run aimed at the same folder clears it and converts."""
    src = make_checkpoint(tmp_path / "src", "llama", num_hidden_layers=8, hidden_size=256, intermediate_size=768,
                          num_attention_heads=4, num_key_value_heads=4)
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from convert.cli import main; main()", "--hf-path", str(src), "--mlx-path",
               str(out), "-q"]
    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    time.sleep(4.0)
    if proc.poll() is not None:
        pytest.skip("the run finished within 4 s, before it could be killed")
    proc.kill()
    proc.wait(timeout=30)
    assert not out.exists()  # only hidden siblings can be left
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert leftovers(out) == ["out"] and (out / "validation.json").exists()
