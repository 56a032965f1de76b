"""Publishing a converted folder to the Hub: one commit, then a check that the remote matches what was written.

The token comes from `HF_TOKEN` or the stored login (huggingface_hub reads both) and is never printed; the
endpoint is read from `HF_ENDPOINT` at call time so that a test or a local Hub can redirect it.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .retry import with_retries


class PublishError(RuntimeError):
    pass


@dataclass
class PublishResult:
    repo_id: str
    url: str
    files: dict = field(default_factory=dict)
    commit: Optional[str] = None
    dry_run: bool = False


def hub_endpoint(endpoint: Optional[str] = None) -> Optional[str]:
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def local_files(folder) -> dict:
    """{relative path: size} of every file to publish."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def remote_files(api, repo_id: str, revision: str) -> dict:
    from huggingface_hub.hf_api import RepoFile

    tree = api.list_repo_tree(repo_id, recursive=True, revision=revision)
    return {f.path: f.size for f in tree if isinstance(f, RepoFile)}


def verify_remote(local: dict, remote: dict):
    """Every written file is on the Hub with the same size."""
    missing = sorted(set(local) - set(remote))
    wrong = sorted(p for p in set(local) & set(remote) if local[p] != remote[p])
    if missing or wrong:
        detail = [f"missing: {', '.join(missing)}"] if missing else []
        detail += [f"size differs: {', '.join(wrong)}"] if wrong else []
        raise PublishError("the uploaded repo does not match the local folder (" + "; ".join(detail) + ")")


def publish(folder, repo_id: str, message: str, *, description: str = "", private: bool = False,
            token: Optional[str] = None, endpoint: Optional[str] = None, dry_run: bool = False) -> PublishResult:
    """Create `repo_id` if needed and upload `folder` in one commit; verify the remote file list and sizes."""
    from huggingface_hub import HfApi

    endpoint = hub_endpoint(endpoint)
    files = local_files(folder)
    base = (endpoint or "https://huggingface.co").rstrip("/")
    if dry_run:
        return PublishResult(repo_id, f"{base}/{repo_id}", files, dry_run=True)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
        # One commit: a failed upload leaves the repo as it was, so a retry never publishes half a model.
        commit = with_retries(lambda: api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                                        commit_message=message, commit_description=description))
        verify_remote(files, with_retries(lambda: remote_files(api, repo_id, commit.oid)))
    except PublishError:
        raise
    except Exception as e:  # network, auth and Hub errors: one line, never the token
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = (f" (the Hub refused the credentials: check HF_TOKEN or `hf auth login`, and write access to "
                f"{repo_id.split('/')[0]})" if status in (401, 403) else "")
        raise PublishError(f"upload to {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0]}{hint}") from e
    return PublishResult(repo_id, str(url), files, commit=commit.oid)
