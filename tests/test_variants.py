"""--variants: several outputs from one read of the source, each written and validated as a single run would,
the gate's source-only parts computed once, published only when all pass, each to its own repo."""

import hashlib

import pytest

from checkpoints import make_checkpoint
from convert import ConvertError, shadow, validate
from convert.cli import main
from convert.plan import variant_plans
from hub_server import LocalHub


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("variants") / "src", "llama", dtype="bfloat16")


def cli(arguments, capsys) -> tuple:
    try:
        main([str(a) for a in arguments])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def files(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_each_variant_equals_its_single_run_and_source_passes_run_once(src, tmp_path, capsys, monkeypatch):
    calls = {"original": 0, "shadow": 0, "tokenizer": 0}
    reference_pass, check_folders, fidelity = validate.reference_pass, shadow.check_folders, validate.tokenizer_fidelity

    def counted_reference(source, weights, *args, **kwargs):
        calls["original"] += type(weights).__name__ == "CheckpointReader"  # the float original's pass
        return reference_pass(source, weights, *args, **kwargs)

    def counted_shadow(*args):
        calls["shadow"] += 1
        return check_folders(*args)

    def counted_tokenizer(*args):
        calls["tokenizer"] += 1
        return fidelity(*args)

    monkeypatch.setattr(validate, "reference_pass", counted_reference)
    monkeypatch.setattr(shadow, "check_folders", counted_shadow)
    monkeypatch.setattr(validate, "tokenizer_fidelity", counted_tokenizer)
    code, out, err = cli(["--hf-path", src, "--mlx-path", tmp_path / "v" / "m", "--variants", "bf16,8,4",
                          "--q-group-size", "32"], capsys)
    assert code == 0, err
    # The float original's held-out pass once for all variants; bf16 holds the source's values: its exact pass is
    # the float original's probe pass, for every variant. The outputs hold the same tokenizer files: one check.
    assert calls == {"original": 1, "shadow": 1, "tokenizer": 1}
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["m-4bit", "m-8bit", "m-bf16"]
    assert out.count("Saved ") == 3
    monkeypatch.setattr(validate, "reference_pass", reference_pass)
    monkeypatch.setattr(shadow, "check_folders", check_folders)
    monkeypatch.setattr(validate, "tokenizer_fidelity", fidelity)
    for name, options in (("m-bf16", ["--dtype", "bfloat16"]), ("m-8bit", ["-q", "--q-bits", "8"]),
                          ("m-4bit", ["-q", "--q-bits", "4"])):
        single = tmp_path / "single" / name
        code, _, err = cli(["--hf-path", src, "--mlx-path", single, "--q-group-size", "32", *options]
                           if "-q" in options else ["--hf-path", src, "--mlx-path", single, *options], capsys)
        assert code == 0, err
        assert files(tmp_path / "v" / name) == files(single), name


def test_published_only_when_every_variant_passes(src, tmp_path, capsys, monkeypatch):
    with LocalHub(tmp_path / "hub") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        base = ["--hf-path", src, "--q-method", "rtn", "--upload-repo", "me/Tiny-{variant}-mlx"]
        strict = {**validate.THRESHOLDS, 4: {**validate.THRESHOLDS[4], "kl_mean": 0.0}}  # no 4-bit output passes
        monkeypatch.setattr(validate, "THRESHOLDS", strict)
        code, _, err = cli([*base, "--mlx-path", tmp_path / "a" / "m", "--variants", "8,4"], capsys)
        assert code == 1 and "1 of 2 variants failed validation, nothing was published" in err and "4bit:" in err
        assert (tmp_path / "a" / "m-8bit" / "config.json").is_file()  # the passing variant stays in place
        assert (tmp_path / "a" / "m-4bit.rejected").is_dir() and not (tmp_path / "a" / "m-4bit").exists()
        assert not hub.storage.exists("me/Tiny-8bit-mlx")
        monkeypatch.undo()
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        code, _, err = cli([*base, "--mlx-path", tmp_path / "b" / "m", "--variants", "bf16,4"], capsys)
        assert code == 0, err
        for variant in ("bf16", "4bit"):
            assert hub.files(f"me/Tiny-{variant}-mlx") == {p.name: p.stat().st_size
                                                          for p in (tmp_path / "b" / f"m-{variant}").iterdir()}


@pytest.mark.parametrize("flags,specs,message", [
    ({}, "4,x", "'x' is not a variant"),
    ({}, "4,4", "lists a variant twice"),
    ({}, " , ", "--variants is empty"),
    ({"quantize": True}, "4", "drop --quantize"),
    ({"q_mode": "mxfp4"}, "4", "drop --q-mode"),
    ({"q_bits": 3}, "4", "drop --q-bits"),
])
def test_bad_variant_lists_are_refused(flags, specs, message):
    with pytest.raises(ConvertError, match=message):
        variant_plans({"hf_path": "org/M", **flags}, specs)


def test_variant_names_folders_and_repos():
    plans = variant_plans({"hf_path": "org/M", "upload_repo": "me/M", "q_group_size": 32}, "fp16,6,mixed_4_6,mxfp4")
    assert [str(p.mlx_path) for p in plans] == ["M-mlx-fp16", "M-mlx-6bit", "M-mlx-mixed_4_6", "M-mlx-mxfp4"]
    assert [p.upload_repo for p in plans] == ["me/M-fp16", "me/M-6bit", "me/M-mixed_4_6", "me/M-mxfp4"]
    assert (plans[1].q_bits, plans[1].q_group_size) == (6, 32) and plans[3].q_group_size == 32
