"""The local Hub server (tests/hub_server.py) driven by the real huggingface_hub client."""

import os

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # must precede the first huggingface_hub import

import hashlib
import random
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import (CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download,
                             snapshot_download)
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import LocalHub, git_sha1  # noqa: E402

TOKEN = "hf_local_test_token"
BIG = 10 * 1024 * 1024 + 123  # LFS by size
README = "---\nlicense: apache-2.0\ntags:\n- mlx\n---\n# Tiny model\n"


@pytest.fixture(autouse=True)
def _no_xet(monkeypatch):
    # The env var is read at import time; the constant is what the client checks at call time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture(scope="module")
def hub():
    with LocalHub() as local_hub:
        yield local_hub


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A folder with regular files, a small LFS-by-suffix file and a >10 MB LFS-by-size file."""
    folder = tmp_path_factory.mktemp("model")
    rng = random.Random(0)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "README.md").write_text(README)
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\nc\n")
    (folder / "model.safetensors").write_bytes(rng.randbytes(4096))
    (folder / "blob.dat").write_bytes(rng.randbytes(BIG))
    return folder


@pytest.fixture
def api(hub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_seed_then_snapshot_download_is_byte_identical(hub, model_dir, tmp_path):
    sha = hub.seed("org/seeded", model_dir)
    path = snapshot_download("org/seeded", endpoint=hub.endpoint, cache_dir=tmp_path, token=TOKEN)
    assert Path(path).name == sha
    assert folder_bytes(Path(path)) == folder_bytes(model_dir)
    assert hub.files("org/seeded") == {k: len(v) for k, v in folder_bytes(model_dir).items()}
    assert hub.last_token == TOKEN
    # Re-seeding the same content makes no new commit.
    assert hub.seed("org/seeded", model_dir) == sha


def test_tree_reports_lfs_and_git_oids(hub, model_dir, api):
    hub.seed("org/tree", model_dir)
    entries = {e.path: e for e in api.list_repo_tree("org/tree", recursive=True)}
    assert entries["tokenizer"].__class__.__name__ == "RepoFolder"
    config = (model_dir / "config.json").read_bytes()
    assert entries["config.json"].lfs is None and entries["config.json"].blob_id == git_sha1(config)
    for name in ("blob.dat", "model.safetensors"):
        data = (model_dir / name).read_bytes()
        assert entries[name].lfs.sha256 == hashlib.sha256(data).hexdigest()
        assert entries[name].size == len(data)
    top = {e.path for e in api.list_repo_tree("org/tree")}
    assert "tokenizer/vocab.txt" not in top and "tokenizer" in top
    assert [e.path for e in api.list_repo_tree("org/tree", path_in_repo="tokenizer")] == ["tokenizer/vocab.txt"]


def test_resolve_headers_and_range(hub, model_dir):
    sha = hub.seed("org/resolve", model_dir)
    big = hf_hub_url("org/resolve", "blob.dat", endpoint=hub.endpoint)
    meta = get_hf_file_metadata(big)
    assert meta.commit_hash == sha and meta.size == BIG
    assert meta.etag == hashlib.sha256((model_dir / "blob.dat").read_bytes()).hexdigest()
    small = get_hf_file_metadata(hf_hub_url("org/resolve", "config.json", endpoint=hub.endpoint))
    assert small.etag == git_sha1((model_dir / "config.json").read_bytes())

    request = urllib.request.Request(big, headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 10-19/{BIG}"
        assert response.read() == (model_dir / "blob.dat").read_bytes()[10:20]


def test_revision_by_branch_and_sha_and_allow_patterns(hub, tmp_path):
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for folder, text in ((v1, "one"), (v2, "two")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
        (folder / "model.safetensors").write_bytes(text.encode() * 100)
    first = hub.seed("org/revs", v1)
    hub.seed("org/revs", v2, revision="dev")
    cache = tmp_path / "cache"

    dev = hf_hub_download("org/revs", "config.json", revision="dev", endpoint=hub.endpoint, cache_dir=cache)
    assert Path(dev).read_text() == "two"
    old = snapshot_download("org/revs", revision=first, endpoint=hub.endpoint, cache_dir=cache)
    assert (Path(old) / "config.json").read_text() == "one"
    assert hub.read("org/revs", "config.json", revision="dev") == b"two"

    hub.requests_log.clear()
    only = snapshot_download("org/revs", revision="dev", allow_patterns=["*.json"], endpoint=hub.endpoint,
                             cache_dir=tmp_path / "cache2")
    assert [p.name for p in Path(only).iterdir()] == ["config.json"]
    assert not any(path.endswith(".safetensors") for _, path in hub.requests_log)


def test_create_repo_and_upload_folder(hub, model_dir, api, tmp_path):
    url = api.create_repo("org/uploaded", private=True)
    assert url.repo_id == "org/uploaded" and hub.is_private("org/uploaded")
    info = api.upload_folder(repo_id="org/uploaded", folder_path=model_dir, commit_message="add model")

    expected = {k: len(v) for k, v in folder_bytes(model_dir).items()}
    assert set(api.list_repo_files("org/uploaded")) == set(expected)
    paths = api.get_paths_info("org/uploaded", ["blob.dat", "config.json", "tokenizer", "nope"])
    assert {p.path: getattr(p, "size", None) for p in paths} == {
        "blob.dat": BIG, "config.json": expected["config.json"], "tokenizer": None}
    model = api.model_info("org/uploaded", files_metadata=True)
    assert model.sha == info.oid and model.private is True
    assert {s.rfilename: s.size for s in model.siblings} == expected
    assert hub.read("org/uploaded", "blob.dat") == (model_dir / "blob.dat").read_bytes()
    assert hub.files("org/uploaded") == expected

    puts = [path for method, path in hub.requests_log if method == "PUT"]
    assert len(puts) >= 2 and all(p.startswith("/_lfs/org/uploaded/") for p in puts)
    assert ("POST", "/api/validate-yaml") in hub.requests_log
    # Uploading unchanged files is a no-op on the client side (preupload returns the remote oids).
    assert api.upload_folder(repo_id="org/uploaded", folder_path=model_dir).oid == info.oid
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info("org/uploaded")


def test_commit_deletions_and_parent_check(hub, model_dir, api):
    sha = hub.seed("org/edits", model_dir)
    ops = [CommitOperationDelete("blob.dat"), CommitOperationDelete("tokenizer/"),
           CommitOperationAdd("notes.txt", b"hello")]
    api.create_commit("org/edits", ops, commit_message="edit", parent_commit=sha)
    assert set(hub.files("org/edits")) == {"config.json", "README.md", "model.safetensors", "notes.txt"}
    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit("org/edits", [CommitOperationAdd("x.txt", b"x")], commit_message="x", parent_commit=sha)
    assert stale.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError):
        api.delete_file("missing.txt", "org/edits")


def test_invalid_readme_front_matter_is_rejected(hub, api):
    api.create_repo("org/bad-readme")
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(path_or_fileobj=b"---\nlicense: mit\n", path_in_repo="README.md", repo_id="org/bad-readme")


def test_create_repo_twice(hub, api):
    api.create_repo("twice")  # no namespace: the whoami user's
    assert hub.files(f"{hub.user}/twice") == {}
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("twice")
    assert conflict.value.response.status_code == 409
    assert api.create_repo("twice", exist_ok=True).repo_id == f"{hub.user}/twice"


def test_not_found_errors(hub, model_dir, api, tmp_path):
    hub.seed("org/errors", model_dir)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json", endpoint=hub.endpoint, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/errors", "config.json", revision="nope", endpoint=hub.endpoint, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/errors", revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/errors", "missing.json", endpoint=hub.endpoint, cache_dir=tmp_path)
    assert api.file_exists("org/errors", "config.json") and not api.file_exists("org/errors", "missing.json")


def test_whoami_and_delete_repo(hub, api):
    assert api.whoami()["name"] == hub.user
    api.create_repo("org/doomed")
    api.delete_repo("org/doomed")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/doomed")
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("org/doomed")
    api.delete_repo("org/doomed", missing_ok=True)


def test_lfs_upload_checks_sha256(hub, api):
    api.create_repo("org/lfs-check")
    oid = hashlib.sha256(b"right").hexdigest()
    request = urllib.request.Request(f"{hub.endpoint}/_lfs/org/lfs-check/{oid}", data=b"wrong", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(request)
    assert bad.value.code == 400


def test_storage_persists_across_restarts(model_dir, tmp_path):
    with LocalHub(tmp_path / "root") as first:
        sha = first.seed("org/kept", model_dir)
    with LocalHub(tmp_path / "root") as second:
        assert HfApi(endpoint=second.endpoint).model_info("org/kept").sha == sha


def test_cli_serves_seeded_repo(model_dir, tmp_path):
    script = Path(__file__).parent.parent / "scripts" / "local_hub.py"
    cmd = [sys.executable, str(script), "--root", str(tmp_path), "--seed", f"org/cli={model_dir / 'tokenizer'}"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith("seeded org/cli")
        endpoint = process.stdout.readline().split()[-1]
        assert endpoint.startswith("http://127.0.0.1:")
        assert HfApi(endpoint=endpoint).list_repo_files("org/cli") == ["vocab.txt"]
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_writes_need_a_valid_token(hub):
    """Like the Hub: reading works anonymously, writing without a token (or with one the hub does not accept) is
    refused with 401."""
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=hub.endpoint, token=False).create_repo("org/anonymous")
    assert info.value.response.status_code == 401
    hub.write_tokens = {"hf_the_right_one"}
    try:
        with pytest.raises(HfHubHTTPError) as info:
            HfApi(endpoint=hub.endpoint, token="hf_wrong").create_repo("org/wrong-token")
        assert info.value.response.status_code == 401
        HfApi(endpoint=hub.endpoint, token="hf_the_right_one").create_repo("org/right-token")
    finally:
        hub.write_tokens = None
    assert not hub.storage.exists("org/anonymous") and hub.storage.exists("org/right-token")
