"""Writing the output folder in the layout mlx-lm reads, into a staging folder that is renamed into place only
when complete. Shards are written tensor by tensor, so peak memory is a few tensors, whatever the shard size."""

import contextlib
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import affine, safetensors_file
from .errors import ConvertError
from .source import TEMPLATE_DIR

COPIED_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
    "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE",
]


def plan_shards(weights: dict, max_bytes: int) -> list:
    """Names per shard, in order, each shard at most max_bytes (a single larger tensor gets its own shard)."""
    shards, current, size = [], [], 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current] if current else shards


SAFETENSORS_DTYPES = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.uint16: "U16", mx.uint32: "U32", mx.uint64: "U64", mx.int8: "I8",
    mx.int16: "I16", mx.int32: "I32", mx.int64: "I64", mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32",
}


def stream_safetensors(path: Path, tensors: list, digest=None) -> int:
    """Write (name, lazy array) pairs as a safetensors file, evaluating and releasing one tensor at a time.

    The header only needs shapes and dtypes, which lazy arrays know without being computed. While one layer's
    tensors are written, the next layers' are already being computed (`Lookahead`). `tensors` is emptied.
    `digest` (a hashlib object) is fed the file's bytes. Returns the number of data bytes written.
    """
    ahead = Lookahead(tensors)
    entries = [(name, SAFETENSORS_DTYPES[a.dtype], a.shape, a.nbytes, functools.partial(ahead.bytes_of, i))
               for i, (name, a) in enumerate(tensors)]
    tensors.clear()
    with affine.threads_restored():
        return safetensors_file.write(path, entries, "mlx", digest)


class Lookahead:
    """Evaluates a shard's tensors in order, starting later layers' tensors (`mx.async_eval`) while earlier ones are
    written: layers quantized on different streams (`quantize.round_to_nearest`) then run side by side, and the
    writing overlaps the computing. A layer (the tensors sharing a name up to the last dot, e.g. weight, scales and
    biases) is started with all of its tensors, up to `cores - 1` layers ahead, and only while the layers in flight
    hold at most 1.25x the shard's largest layer in output bytes: two vocabulary-sized layers never overlap, so the
    peak memory stays that of about one layer (tested)."""

    def __init__(self, tensors: list):
        self.arrays = [a for _, a in tensors]
        names = [name.rpartition(".")[0] for name, _ in tensors]
        self.groups = []  # [start, stop) index ranges of consecutive tensors of one layer
        for i, name in enumerate(names):
            if i and names[i - 1] == name:
                self.groups[-1][1] = i + 1
            else:
                self.groups.append([i, i + 1])
        self.group_of = [g for g, (start, stop) in enumerate(self.groups) for _ in range(start, stop)]
        self.size = [sum(a.nbytes for a in self.arrays[start:stop]) for start, stop in self.groups]
        self.budget = 1.25 * max(self.size, default=0)
        self.width = max(1, (os.cpu_count() or 1) - 1)
        self.started = 0  # groups before this one were started

    def bytes_of(self, i: int):
        """Tensor i's bytes; `arrays[i]` is released (the caller holds the bytes)."""
        g = self.group_of[i]
        self.started = max(self.started, g + 1)
        in_flight = sum(self.size[g : self.started])
        while (self.started < len(self.groups) and self.started <= g + self.width
               and in_flight + self.size[self.started] <= self.budget):
            start, stop = self.groups[self.started]
            # Only the arrays themselves: an op queued on the default stream that waits for another stream's result
            # would hold up that queue (the source reads are there), and nothing would overlap.
            first = self.arrays[start]
            if isinstance(first, affine.Deferred):
                first.job.start()  # read here, rounded on the worker threads
            else:
                mx.async_eval(self.arrays[start:stop])
            in_flight += self.size[self.started]
            self.started += 1
        array, self.arrays[i] = self.arrays[i], None
        if isinstance(array, affine.Deferred):
            return memoryview(np.ascontiguousarray(array.job.part(array.index)).reshape(-1).view(np.uint8))
        mx.eval(array)  # on its own stream; the flattening below, on the default stream, then waits for nothing
        flat = mx.contiguous(array.reshape(-1)).view(mx.uint8)
        mx.eval(flat)
        return memoryview(np.asarray(flat))


MANIFEST = ".mlx-convert-manifest.json"


class Manifest:
    """What a staging folder already holds, for resuming a run that was killed while writing shards: the run's key
    (a digest of the source and of every option that shapes the output) and, per finished shard, its tensor names,
    size and SHA-256. A shard is reused only when all of them match; the file never reaches the output."""

    def __init__(self, folder: Path, key: str):
        self.path, self.key = Path(folder) / MANIFEST, key
        stored = read_manifest(self.path)
        self.shards = stored.get("shards", {}) if stored.get("key") == key else {}
        self.reused = 0

    def verified(self, folder: Path, file: str, keys: list) -> int:
        """The data bytes of `file` when it is a finished shard of exactly `keys`, intact; else None."""
        entry, path = self.shards.get(file), Path(folder) / file
        if not entry or entry["tensors"] != keys or not path.is_file() or path.stat().st_size != entry["size"]:
            return None
        if file_digest(path) != entry["sha256"]:
            return None
        self.reused += 1
        return entry["data_bytes"]

    def record(self, folder: Path, file: str, keys: list, data_bytes: int, sha256: str):
        """`file` is finished: `sha256` is its digest, computed as it was written (`stream_safetensors`)."""
        path = Path(folder) / file
        self.shards[file] = {"tensors": keys, "size": path.stat().st_size, "sha256": sha256,
                             "data_bytes": data_bytes}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "shards": self.shards}))
        tmp.replace(self.path)  # atomic: a kill never leaves half a manifest

    def remove(self):
        self.path.unlink(missing_ok=True)


def read_manifest(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_weights(weights: dict, folder: Path, max_bytes: int, progress=None, manifest=None) -> int:
    """Write shards and the index; `weights` is emptied as shards are written so their memory can be freed. With
    a `Manifest`, shards an interrupted run already finished are verified and kept instead of computed again."""
    shards = plan_shards(weights, max_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for keys, file in zip(progress(shards) if progress else shards, names):
        done = manifest.verified(folder, file, keys) if manifest else None
        if done is None:
            # Streamed tensor by tensor: the peak is one output tensor plus the source tensors behind it, whatever
            # the shard size (mx.save_safetensors would hold the whole evaluated shard).
            digest = hashlib.sha256() if manifest else None
            done = stream_safetensors(folder / file, [(k, weights.pop(k)) for k in keys], digest)
            if manifest:
                manifest.record(folder, file, keys, done, digest.hexdigest())
        else:
            for k in keys:  # never computed: the lazy arrays are simply dropped
                del weights[k]
        total += done
        weight_map.update({k: file for k in keys})
    if manifest:
        manifest.remove()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def output_config(config: dict, dtype: str, quantization=None) -> dict:
    """The source config plus what mlx-lm needs: quantization, and transformers-4 RoPE keys, which mlx-lm reads
    instead of `rope_parameters` (without them it silently uses the default base)."""
    out = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    out["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" not in config:
        from mlx_arch.core.base import rope_config, rope_scaling

        rope = rope_config(config)
        if "rope_theta" in rope:
            out["rope_theta"] = rope["rope_theta"]
        if "partial_rotary_factor" in rope and "partial_rotary_factor" not in config:
            out["partial_rotary_factor"] = rope["partial_rotary_factor"]
        scaling = rope_scaling(rope)
        if scaling and "rope_scaling" not in config:
            out["rope_scaling"] = scaling
    if quantization:
        out["quantization"] = quantization
        out["quantization_config"] = quantization
    return out


def copy_side_files(source: Path, folder: Path) -> list:
    """Tokenizer files, chat templates, generation config and license, byte for byte."""
    copied = []
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
            copied.append(name)
    for template in sorted((source / TEMPLATE_DIR).glob("*.jinja")):
        name = f"{TEMPLATE_DIR}/{template.name}"
        (folder / TEMPLATE_DIR).mkdir(exist_ok=True)
        shutil.copyfile(template, folder / name)
        copied.append(name)
    return copied


def check_target(target: Path, overwrite: bool):
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ConvertError(f"{target} already exists and is not empty: choose another --mlx-path or pass "
                           "--overwrite")


def fresh_sibling(target: Path, kind: str) -> Path:
    """A new, empty hidden folder beside `target` (same disk, so a rename into place is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = target.parent / f".{target.name}.{kind}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


@contextlib.contextmanager
def locked(target: Path):
    """Hold `target`'s lock for the whole run: a second run aimed at the same folder stops at once with a clear
    message instead of interleaving. Also clears what runs killed outright (SIGKILL) left: hidden staging and
    scratch siblings of dead processes, which are never mistaken for an output (only a finished staging folder is
    renamed into place)."""
    import fcntl

    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise ConvertError(f"another mlx-convert run (pid {owner}) is writing {target}: wait for it to finish or "
                           "choose another --mlx-path") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        remove_stale_siblings(target)
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        handle.close()


def remove_stale_siblings(target: Path, resumable: bool = True):
    """Staging and scratch folders of runs that no longer exist (their pid is in the folder name). Staging folders
    holding finished shards stay for `staging` to resume or remove (`resumable`)."""
    for kind in ("partial", "scratch", "old"):
        for folder in stale_siblings(target, kind):
            if not (resumable and kind == "partial" and (folder / MANIFEST).is_file()):
                shutil.rmtree(folder, ignore_errors=True)


def stale_siblings(target: Path, kind: str) -> list:
    found = []
    for folder in sorted(target.parent.glob(f".{target.name}.{kind}-*")):
        pid = folder.name.rsplit("-", 1)[-1]
        if folder.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            found.append(folder)
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def scratch(target: Path):
    """A hidden sibling folder of `target` for intermediate files (e.g. `.bin` sources rewritten as safetensors),
    removed at the end however the run ends. Beside the output, so on a disk that was chosen to hold a model."""
    folder = fresh_sibling(Path(target).absolute(), "scratch")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staging(target: Path, overwrite: bool, resume_key: str = None):
    """A temporary sibling folder, renamed to `target` on success and removed on failure. With `resume_key`, the
    staging folder that a killed run with the same key left is taken over (see `Manifest`)."""
    target = Path(target).absolute()
    check_target(target, overwrite)
    tmp = fresh_sibling(target, "partial")
    for old in stale_siblings(target, "partial"):
        if resume_key and tmp.is_dir() and not any(tmp.iterdir()) and \
                read_manifest(old / MANIFEST).get("key") == resume_key:
            tmp.rmdir()
            old.rename(tmp)  # resumed: `Manifest` tells which shards are finished
        else:
            shutil.rmtree(old, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
