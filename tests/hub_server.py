"""A small local Hugging Face Hub server for tests and demos (standard library only).

It speaks the subset of the Hub HTTP API that `huggingface_hub` uses to download and upload model repos
(see /work/shared/HUB.md): repo info, tree listing, resolve (HEAD/GET with Range), paths-info, whoami,
create/delete repo, validate-yaml, preupload, LFS batch + PUT upload and NDJSON commits.
Errors carry the `X-Error-Code` header the client maps to exception types.

Storage, under one root folder:

    {root}/{namespace}/{name}/repo.json          {"private": bool, "refs": {branch: commit sha}}
    {root}/{namespace}/{name}/commits/{sha}.json  {"parent", "summary", "files": {path: entry}}
    {root}/{namespace}/{name}/blobs/{sha256}      file contents, content-addressed

A new repo gets an empty first commit (no .gitattributes), so `sha` always exists.
A file entry is {"sha256", "size", "lfs", "oid"}; `oid` is the git sha1 of the content, or of the LFS
pointer for LFS files (as on the Hub), and the ETag is that git sha1 for regular files, the sha256 for LFS.

Usage in tests:

    with LocalHub() as hub:
        sha = hub.seed("org/model", folder)
        snapshot_download("org/model", endpoint=hub.endpoint, cache_dir=...)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Same spirit as the Hub: big files and weight formats go through LFS.
LFS_MIN_SIZE = 10 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".npz", ".msgpack", ".h5", ".onnx")
DEFAULT_USER = "me"  # tests publish to me/...; whoami names this user (and `orgs`)
CHUNK = 1024 * 1024


class HubError(Exception):
    """An HTTP error with the `X-Error-Code` the client maps to an exception type."""

    def __init__(self, status: int, message: str, code: str | None = None, headers=None, extra=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def wants_lfs(path: str, size: int) -> bool:
    # Empty files cannot be LFS (the client forces them to "regular" too).
    return size > 0 and (size >= LFS_MIN_SIZE or path.endswith(LFS_SUFFIXES))


def split_repo_id(repo_id: str) -> tuple[str, str]:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(re.fullmatch(r"[\w.-]+", p) and not p.startswith(".") for p in parts):
        raise HubError(400, f"Invalid repo id {repo_id!r}: expected 'namespace/name'")
    return parts[0], parts[1]


class Storage:
    """Repos on disk: refs, commit snapshots and content-addressed blobs. Thread-safe via one lock."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.lock = threading.RLock()

    def _dir(self, repo_id: str) -> Path:
        return self.root.joinpath(*split_repo_id(repo_id))

    def exists(self, repo_id: str) -> bool:
        return (self._dir(repo_id) / "repo.json").is_file()

    def meta(self, repo_id: str) -> dict:
        if not self.exists(repo_id):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return json.loads((self._dir(repo_id) / "repo.json").read_text())

    def _write_json(self, path: Path, obj: dict) -> None:
        # Write-then-rename so concurrent readers never see half a file.
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)

    def create(self, repo_id: str, private: bool = False) -> None:
        with self.lock:
            if self.exists(repo_id):
                raise HubError(409, "You already created this model repo")
            repo = self._dir(repo_id)
            (repo / "commits").mkdir(parents=True, exist_ok=True)
            (repo / "blobs").mkdir(exist_ok=True)
            self._write_json(repo / "repo.json", {"private": bool(private), "refs": {}})
            # The Hub gives every new repo a first commit, so `sha` is never missing.
            self.commit(repo_id, "main", {}, "initial commit")

    def delete(self, repo_id: str) -> None:
        with self.lock:
            self.meta(repo_id)
            shutil.rmtree(self._dir(repo_id))

    def resolve(self, repo_id: str, revision: str) -> str:
        """Branch name or commit sha -> commit sha."""
        refs = self.meta(repo_id)["refs"]
        if revision in refs:
            return refs[revision]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and (self._dir(repo_id) / "commits" / f"{revision}.json").is_file():
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def record(self, repo_id: str, sha: str) -> dict:
        return json.loads((self._dir(repo_id) / "commits" / f"{sha}.json").read_text())

    def files(self, repo_id: str, sha: str) -> dict[str, dict]:
        return self.record(repo_id, sha)["files"]

    def blob_path(self, repo_id: str, sha256: str) -> Path:
        return self._dir(repo_id) / "blobs" / sha256

    def put_blob(self, repo_id: str, data: bytes, lfs: bool) -> dict:
        """Store bytes and return the file entry that points to them."""
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_path(repo_id, sha256)
        if not path.exists():
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        oid = git_sha1(lfs_pointer(sha256, len(data)) if lfs else data)
        return {"sha256": sha256, "size": len(data), "lfs": lfs, "oid": oid}

    def lfs_entry(self, repo_id: str, sha256: str) -> dict:
        """Entry for an LFS object that was uploaded earlier through the batch API."""
        path = self.blob_path(repo_id, sha256)
        if not path.is_file():
            raise HubError(400, f"LFS object {sha256} was not uploaded")
        size = path.stat().st_size
        return {"sha256": sha256, "size": size, "lfs": True, "oid": git_sha1(lfs_pointer(sha256, size))}

    def commit(self, repo_id: str, branch: str, files: dict, summary: str, parent: str | None = None) -> str:
        """Record `files` as the full new snapshot of `branch`; returns the commit sha."""
        with self.lock:
            meta = self.meta(repo_id)
            head = meta["refs"].get(branch)
            if parent is not None and parent != head:
                raise HubError(412, f"parentCommit {parent} is not the head of {branch} ({head})")
            record = {"parent": head, "summary": summary, "time": time.time_ns(), "files": files}
            sha = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
            self._write_json(self._dir(repo_id) / "commits" / f"{sha}.json", record)
            meta["refs"][branch] = sha
            self._write_json(self._dir(repo_id) / "repo.json", meta)
            return sha


def file_info(path: str, entry: dict) -> dict:
    """Tree / paths-info entry for one file, as the Hub returns it."""
    info = {"type": "file", "path": path, "size": entry["size"], "oid": entry["oid"]}
    if entry["lfs"]:
        pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
        info["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    return info


def folder_info(folder: str, files: dict) -> dict:
    # A stable fake tree id: hash of what the folder contains.
    inside = sorted((p, e["oid"]) for p, e in files.items() if p.startswith(folder + "/"))
    return {"type": "directory", "path": folder, "oid": hashlib.sha1(json.dumps(inside).encode()).hexdigest()}


def parent_folders(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def list_tree(files: dict, folder: str, recursive: bool) -> list[dict]:
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    inside = [p for p in sorted(files) if p.startswith(prefix)]
    if prefix and not inside:
        raise HubError(404, f"{folder} does not exist", "EntryNotFound")
    depth = prefix.count("/")
    # Direct children only, unless recursive.
    keep = (lambda p: True) if recursive else (lambda p: p.count("/") == depth)
    folders = sorted({f for p in inside for f in parent_folders(p) if f.startswith(prefix) and keep(f)})
    return [folder_info(f, files) for f in folders] + [file_info(p, files[p]) for p in inside if keep(p)]


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`bytes=a-b` / `bytes=a-` / `bytes=-n` -> inclusive (start, end); None means the whole file."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start > end or start >= size:
        raise HubError(416, f"Range {header} not satisfiable for size {size}")
    return start, end


def check_front_matter(content: str) -> None:
    # The Hub rejects a README whose YAML block is never closed; full YAML validation is out of scope.
    if content.startswith("---") and not re.search(r"^---\s*$", content[3:], re.MULTILINE):
        message = "Invalid YAML front matter in README.md: missing closing '---'"
        raise HubError(400, message, extra={"errors": [{"message": message}]})


REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"
# (method, regex on the still-quoted URL path, handler method); groups are unquoted before the call.
ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{REPO}(?:/revision/{REV})?", "repo_info"),
    ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.+))?", "tree"),
    ("POST", rf"/api/models/{REPO}/paths-info/{REV}", "paths_info"),
    ("POST", rf"/api/models/{REPO}/preupload/{REV}", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/{REV}", "commit"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", rf"/_lfs/{REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs_upload"),
    ("HEAD", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
    ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
]


# Handlers that change the Hub: like the Hub, they need a token (LFS uploads go to a pre-signed URL instead).
WRITES = {"create_repo", "delete_repo", "preupload", "commit", "lfs_batch"}


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to a method below; methods return a JSON-able object or send the response themselves."""

    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response therefore sets Content-Length
    timeout = 60  # idle keep-alive connections must not pin handler threads forever
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms ACK stalls

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = lambda self: self._dispatch()

    @property
    def hub(self) -> "LocalHub":
        return self.server.hub

    @property
    def storage(self) -> Storage:
        return self.hub.storage

    # -- plumbing -------------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        body = self._read_body()  # always drain the body, or the next request on this connection breaks
        self.token = self._bearer_token()
        self.hub._record(self.command, unquote(url.path), self.token)
        fault = self.hub._take_fault(self.command, unquote(url.path))
        if fault == "drop":  # a dropped connection: no response at all
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault is not None:
            time.sleep(fault.get("delay", 0))
            if fault.get("status"):
                self._send_json(fault["status"], {"error": "injected fault"})
                return
        try:
            for method, pattern, name in ROUTES:
                match = re.fullmatch(pattern, url.path) if method == self.command else None
                if match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    if name in WRITES:
                        self._authorize_write()
                    result = getattr(self, name)(body=body, query=parse_qs(url.query), **args)
                    if result is not None:
                        self._send_json(200, result)
                    return
            raise HubError(404, f"No route for {self.command} {url.path}")
        except HubError as e:
            message = e.message.encode("ascii", "replace").decode()
            headers = {"X-Error-Message": message, **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
            self._send_json(e.status, {"error": e.message, **e.extra}, headers)
        except Exception as e:  # a server bug: answer 500 instead of dropping the connection
            traceback.print_exc()
            self._send_json(500, {"error": repr(e)})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # streamed LFS PUTs
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _bearer_token(self) -> str | None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return (token.strip() or None) if scheme.lower() == "bearer" else None

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _authorize_write(self) -> None:
        # Any token is accepted unless the hub was given a list of valid ones.
        if not self.token or (self.hub.write_tokens is not None and self.token not in self.hub.write_tokens):
            raise HubError(401, "Invalid credentials in Authorization header")
        if self.token in self.hub.read_tokens:
            raise HubError(403, "You don't have the rights to create a model under this namespace")

    def _readable(self, repo: str) -> dict:
        # Like the Hub: a private repo looks missing without a token (any token is accepted).
        meta = self.storage.meta(repo)
        if meta["private"] and not self.token:
            raise HubError(404, f"Repository {repo} not found", "RepoNotFound")
        return meta

    def _json_body(self, body: bytes) -> dict:
        try:
            return json.loads(body or b"{}")
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None

    # -- account and repos ----------------------------------------------------------------------------------

    def whoami(self, **_) -> dict:
        if not self.token:
            raise HubError(401, "Invalid credentials in Authorization header")
        access = {"displayName": "local-hub", "role": "write"}
        if self.token in self.hub.read_tokens:
            access["role"] = "read"
        return {"type": "user", "name": self.hub.user, "fullname": self.hub.user,
                "orgs": [{"name": org} for org in sorted(self.hub.orgs)],
                "auth": {"type": "access_token", "accessToken": access}}

    def _repo_id_from(self, body: bytes) -> tuple[str, dict]:
        request = self._json_body(body)
        if request.get("type", "model") != "model":
            raise HubError(400, "The local hub only serves model repos")
        return f"{request.get('organization') or self.hub.user}/{request['name']}", request

    def create_repo(self, body: bytes, **_) -> dict:
        repo, request = self._repo_id_from(body)
        # huggingface_hub 2.x sends `visibility`; older clients send `private`.
        private = request.get("private", request.get("visibility") == "private")
        url = f"{self.hub.endpoint}/{repo}"
        try:
            self.storage.create(repo, private)
        except HubError as e:
            e.extra["url"] = url
            raise
        return {"url": url, "name": repo, "id": repo}

    def delete_repo(self, body: bytes, **_) -> dict:
        self.storage.delete(self._repo_id_from(body)[0])
        return {}

    def validate_yaml(self, body: bytes, **_) -> dict:
        check_front_matter(self._json_body(body).get("content", ""))
        return {"errors": [], "warnings": []}

    # -- reading --------------------------------------------------------------------------------------------

    def repo_info(self, repo: str, rev: str = "main", **_) -> dict:
        meta = self._readable(repo)
        sha = self.storage.resolve(repo, rev)
        record = self.storage.record(repo, sha)
        siblings = []
        for path, entry in sorted(record["files"].items()):
            sibling = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
            if entry["lfs"]:
                lfs = file_info(path, entry)["lfs"]
                sibling["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        modified = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(record["time"] / 1e9))
        return {"id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha, "private": meta["private"],
                "gated": False, "disabled": False, "lastModified": modified, "tags": [], "siblings": siblings}

    def tree(self, repo: str, rev: str, query: dict, path: str = "", **_) -> list:
        self._readable(repo)
        files = self.storage.files(repo, self.storage.resolve(repo, rev))
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        return list_tree(files, path, recursive)  # one page: no `Link` header, so the client stops here

    def paths_info(self, repo: str, rev: str, body: bytes, **_) -> list:
        self._readable(repo)
        files = self.storage.files(repo, self.storage.resolve(repo, rev))
        # The client posts a form (`paths=a&paths=b`); accept JSON too.
        is_json = "json" in self.headers.get("Content-Type", "")
        paths = self._json_body(body).get("paths", []) if is_json else parse_qs(body.decode()).get("paths", [])
        found = []
        for path in (p.strip("/") for p in paths):
            if path in files:
                found.append(file_info(path, files[path]))
            elif any(f.startswith(path + "/") for f in files):
                found.append(folder_info(path, files))
        return found  # missing paths are silently left out, as on the Hub

    def resolve(self, repo: str, rev: str, path: str, **_) -> None:
        self._readable(repo)
        granted = self.hub.gated.get(repo)
        if granted is not None and self.token not in granted and path not in ("README.md", ".gitattributes"):
            # Like the Hub: the card stays readable; files need an account that accepted the conditions.
            raise HubError(403 if self.token else 401, f"Access to model {repo} is restricted. You must have "
                           "access to it and be authenticated to access it. Please log in.", "GatedRepo")
        sha = self.storage.resolve(repo, rev)
        entry = self.storage.files(repo, sha).get(path)
        if entry is None:
            # The commit header lets the client cache the file's absence.
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        etag = f'"{entry["sha256"] if entry["lfs"] else entry["oid"]}"'
        headers = {"X-Repo-Commit": sha, "ETag": etag, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if entry["lfs"]:  # what the Hub puts on its LFS redirect; served directly here
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(entry["size"])})
        self._send_blob(self.storage.blob_path(repo, entry["sha256"]), entry["size"], headers)

    def _send_blob(self, blob: Path, size: int, headers: dict) -> None:
        span = parse_range(self.headers.get("Range"), size) if self.command == "GET" else None
        start, end = span or (0, size - 1)
        if span:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self.send_response(206 if span else 200)
        for key, value in {"Content-Length": str(end - start + 1), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(blob, "rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0 and (chunk := f.read(min(CHUNK, remaining))):
                self.wfile.write(chunk)
                remaining -= len(chunk)

    # -- writing --------------------------------------------------------------------------------------------

    def preupload(self, repo: str, rev: str, body: bytes, **_) -> dict:
        self._readable(repo)
        files = self.storage.files(repo, self.storage.resolve(repo, rev))
        answers = []
        for wanted in self._json_body(body).get("files", []):
            current = files.get(wanted["path"])
            # The client skips unchanged files by comparing this oid (sha256 for LFS, git sha1 otherwise).
            oid = None if current is None else current["sha256"] if current["lfs"] else current["oid"]
            mode = "lfs" if wants_lfs(wanted["path"], wanted["size"]) else "regular"
            answers.append({"path": wanted["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": answers}

    def lfs_batch(self, repo: str, body: bytes, **_) -> dict:
        self._readable(repo)
        objects = []
        for obj in self._json_body(body).get("objects", []):
            if not re.fullmatch(r"[0-9a-f]{64}", obj.get("oid", "")):
                raise HubError(422, f"Invalid LFS oid {obj.get('oid')!r}")
            answer = {"oid": obj["oid"], "size": obj["size"]}
            blob = self.storage.blob_path(repo, obj["oid"])
            if not (blob.is_file() and blob.stat().st_size == obj["size"]):  # already stored => no action
                href = f"{self.hub.endpoint}/_lfs/{repo}/{obj['oid']}"
                answer.update(authenticated=True, actions={"upload": {"href": href, "expires_in": 3600}})
            objects.append(answer)
        return {"transfer": "basic", "objects": objects}

    def lfs_upload(self, repo: str, oid: str, body: bytes, **_) -> dict:
        self.storage.meta(repo)
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Uploaded bytes do not match sha256 {oid}")
        self.storage.put_blob(repo, body, lfs=True)
        return {}

    def commit(self, repo: str, rev: str, body: bytes, query: dict, **_) -> dict:
        self._readable(repo)
        if query.get("create_pr"):
            raise HubError(400, "create_pr is not supported by the local hub")
        with self.storage.lock:  # read head, apply, write: one atomic step
            head = self.storage.meta(repo)["refs"].get(rev)
            if head is None:
                raise HubError(404, f"Branch {rev} not found (commits go to a branch)", "RevisionNotFound")
            files = dict(self.storage.files(repo, head))
            header = {}
            for line in filter(None, map(bytes.strip, body.splitlines())):
                item = json.loads(line)
                if item["key"] == "header":
                    header = item["value"]
                else:
                    self._apply(repo, files, item["key"], item["value"])
            sha = self.storage.commit(repo, rev, files, header.get("summary", ""), header.get("parentCommit"))
        return {"commitUrl": f"{self.hub.endpoint}/{repo}/commit/{sha}", "commitOid": sha,
                "success": True, "pullRequestUrl": None}

    def _apply(self, repo: str, files: dict, key: str, value: dict) -> None:
        """Apply one NDJSON commit operation to the `files` snapshot."""
        path = value["path"].strip("/")
        if key == "file":
            files[path] = self.storage.put_blob(repo, base64.b64decode(value["content"]), lfs=False)
        elif key == "lfsFile":
            files[path] = self.storage.lfs_entry(repo, value["oid"])
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")


class LocalHub:
    """A local Hub on 127.0.0.1, plus direct access to its storage for test setup and assertions.

    `root` defaults to a temporary folder removed by `stop()`. `requests_log` lists (method, unquoted path)
    of every request; `last_token` is the last Bearer token a request carried. Writes need a token: any token,
    or one of `write_tokens` when given. `gated[repo_id]` is the set of tokens that accepted a gated repo's
    conditions: other requests for its files are refused as the Hub refuses them.
    """

    def __init__(self, root: str | Path | None = None, *, user: str = DEFAULT_USER,
                 host: str = "127.0.0.1", port: int = 0, write_tokens: set | None = None):
        self._tmp = None if root is not None else tempfile.TemporaryDirectory(prefix="local-hub-")
        self.storage = Storage(root if root is not None else self._tmp.name)
        self.storage.root.mkdir(parents=True, exist_ok=True)
        self.user, self.host, self.port = user, host, port
        self.write_tokens = write_tokens
        self.read_tokens: set = set()  # tokens whoami reports as read-only, and that cannot write
        self.faults: list = []  # injected failures, see `fail`
        self.orgs: set = {"org", "acme"}  # organisations whoami lists for the user
        self.gated: dict[str, set] = {}
        self.requests_log: list[tuple[str, str]] = []
        self.last_token: str | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def fail(self, times: int = 1, status: int = 503, match: str = "", delay: float = 0.0, drop: bool = False):
        """Make the next `times` requests whose path contains `match` fail: with HTTP `status`, after `delay`
        seconds (a slow answer), or by dropping the connection (`drop`)."""
        self.faults.append({"times": times, "status": status, "match": match, "delay": delay, "drop": drop})

    def _take_fault(self, method: str, path: str):
        for fault in self.faults:
            if fault["times"] > 0 and fault["match"] in path:
                fault["times"] -= 1
                return "drop" if fault["drop"] else fault
        return None

    def _record(self, method: str, path: str, token: str | None) -> None:
        self.requests_log.append((method, path))
        if token:
            self.last_token = token

    def _bind(self) -> None:
        self._server = ThreadingHTTPServer((self.host, self.port), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self.port = self._server.server_address[1]  # the ephemeral port actually chosen

    def start(self) -> "LocalHub":
        """Serve from a daemon thread; returns self."""
        self._bind()
        # A short poll interval keeps stop() fast (shutdown waits for the current poll to end).
        serve = lambda: self._server.serve_forever(poll_interval=0.05)  # noqa: E731
        self._thread = threading.Thread(target=serve, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self, ready=None) -> None:
        """Serve in the calling thread until interrupted; `ready(endpoint)` is called once bound."""
        self._bind()
        if ready is not None:
            ready(self.endpoint)
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._thread = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- direct storage access ------------------------------------------------------------------------------

    def seed(self, repo_id: str, folder: str | Path, revision: str = "main", private: bool = False) -> str:
        """Add/overwrite every file of `folder` on branch `revision` in one commit; returns the commit sha.

        Creates the repo (with `private`) and the branch (from main) if needed. Re-seeding identical files
        makes no new commit.
        """
        if re.fullmatch(r"[0-9a-f]{40}", revision):
            raise ValueError("seed() commits to a branch, not to a commit sha")
        folder, st = Path(folder), self.storage
        with st.lock:
            if not st.exists(repo_id):
                st.create(repo_id, private)
            refs = st.meta(repo_id)["refs"]
            base = refs.get(revision, refs["main"])
            files = dict(st.files(repo_id, base))
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                rel = path.relative_to(folder)
                if rel.parts[0] in (".git", ".cache"):  # what upload_folder ignores too
                    continue
                data = path.read_bytes()
                files[rel.as_posix()] = st.put_blob(repo_id, data, wants_lfs(rel.as_posix(), len(data)))
            if revision in refs and files == st.files(repo_id, base):
                return base
            return st.commit(repo_id, revision, files, f"Seed from {folder.name}")

    def _files(self, repo_id: str, revision: str) -> dict[str, dict]:
        return self.storage.files(repo_id, self.storage.resolve(repo_id, revision))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, int]:
        """{path: size} at `revision` (branch or commit sha)."""
        return {path: entry["size"] for path, entry in self._files(repo_id, revision).items()}

    def read(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        entry = self._files(repo_id, revision).get(path)
        if entry is None:
            raise FileNotFoundError(f"{path} not in {repo_id}@{revision}")
        return self.storage.blob_path(repo_id, entry["sha256"]).read_bytes()

    def is_private(self, repo_id: str) -> bool:
        return self.storage.meta(repo_id)["private"]


def run_server(root: str | Path, port: int = 0, seeds=(), host: str = "127.0.0.1",
               user: str = DEFAULT_USER) -> None:
    """Run a hub in the foreground (no pytest needed); `seeds` is [(repo_id, folder), ...]."""
    hub = LocalHub(root, user=user, host=host, port=port)
    for repo_id, folder in seeds:
        print(f"seeded {repo_id} from {folder} at {hub.seed(repo_id, folder)}", flush=True)
    try:
        hub.serve_forever(ready=lambda endpoint: print(f"Local Hub serving {root} at {endpoint}", flush=True))
    except KeyboardInterrupt:
        pass
