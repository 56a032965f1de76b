"""The arithmetic the gate's MLX side runs on. Every float32 bound of the gate (exact-weights parity near 1e-5,
cache and batch consistency, the shadow model) assumes true float32 products. MLX's CUDA backend computes float32
matrix products at reduced precision (relative error ~3e-4 against float64, where true float32 gives ~6e-7) with no
switch for it, so a correct conversion would fail there, and looser bounds would let small conversion bugs through.
The gate therefore measures the default device once per run and, when its products are not true float32, runs its
MLX checks on the CPU device, which is; the report states the device and the precision measured."""

import base64
import hashlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

TRUE_FLOAT32 = 1e-5  # relative error of a 256-deep float32 product: ~6e-7 in true float32


@dataclass(frozen=True)
class GateBackend:
    default: str  # the device MLX computes on by default
    default_precision: float  # its float32 product's relative error against float64
    device: str  # the device the gate's MLX checks run on
    precision: float
    note: str = ""
    blas: str = ""  # the BLAS serving MLX's CPU float32 products, when the checks ran on the CPU (`blas.py`)

    def to_dict(self) -> dict:
        return asdict(self)


def matmul_precision(device) -> float:
    """Relative error (max over entries, against float64) of a float32 product of random 256x256 matrices."""
    import mlx.core as mx

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 256)).astype(np.float32), rng.standard_normal((256, 256)).astype(np.float32)
    with mx.stream(device):
        ours = np.array(mx.array(a) @ mx.array(b))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    return float(np.abs(ours - exact).max() / np.abs(exact).max())


def choose(default=None, probe=matmul_precision) -> GateBackend:
    """Where the gate's MLX checks run: the default device if its float32 is true float32, else the CPU."""
    import mlx.core as mx

    from . import blas

    default = default if default is not None else mx.default_device()
    precision = probe(default)
    if precision <= TRUE_FLOAT32 or default == mx.cpu:
        on_cpu = default == mx.cpu
        return GateBackend(str(default), precision, str(default), precision, blas=blas.STATUS if on_cpu else "")
    cpu = probe(mx.cpu)
    note = (f"the {default} device's float32 products have relative error {precision:.1e} (true float32: "
            f"{cpu:.0e}); the gate's MLX checks ran on the CPU, in true float32")
    return GateBackend(str(default), precision, cpu_name(), cpu, note, blas.STATUS)


def cpu_name() -> str:
    """The CPU device as reports name it ("Device(cpu, 0)", like the default device; not "DeviceType.cpu")."""
    import mlx.core as mx

    return str(mx.Device(mx.cpu))


def device_of(backend: GateBackend):
    import mlx.core as mx

    return mx.cpu if backend.device == cpu_name() else mx.default_device()


# MLX's backends on Linux: each of these distributions installs its own `mlx/lib/libmlx.so` (the `mlx` package
# itself holds the Python bindings only), so when several are installed the one installed last is the one that runs.
CPU_BACKEND = "mlx-cpu"
CUDA_BACKENDS = ("mlx-cuda-13", "mlx-cuda-12")
LIBRARY = "mlx/lib/libmlx.so"


def _record_hash(dist) -> Optional[tuple]:
    """(the library file on disk, its sha256 as its distribution's RECORD states it) or None."""
    for f in dist.files or ():
        if str(f) == LIBRARY and f.hash is not None:
            return Path(dist.locate_file(f)), f.hash.value
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def installed_backends(path: Optional[list] = None) -> tuple:
    """(the MLX backend distribution whose library is the one on disk, or None when that cannot be told; every
    backend distribution installed, as "name version") from the installed packages' metadata (`path`: where to
    look, default sys.path). With one backend installed that is it; with several, the library's hash decides."""
    from importlib.metadata import distributions

    found = {}
    for dist in distributions(**({"path": path} if path is not None else {})):
        name = (dist.metadata["Name"] or "").lower()
        if name in (CPU_BACKEND, *CUDA_BACKENDS) and name not in found:
            found[name] = dist
    names = [f"{name} {dist.version}" for name, dist in sorted(found.items())]
    if len(found) <= 1:
        return (next(iter(found), None), names)
    on_disk = {}
    for name, dist in found.items():
        located = _record_hash(dist)
        if located and located[0].is_file():
            path_hash = on_disk.setdefault(located[0], _sha256(located[0]))
            if path_hash == located[1]:
                return name, names
    return None, names


def install_problem(path: Optional[list] = None) -> str:
    """A one-line warning when MLX's CUDA backend is installed but another backend's library replaced its own (an
    installer that ran mlx-cpu after it), else ""."""
    active, names = installed_backends(path)
    cuda = [n for n in names if n.split()[0] in CUDA_BACKENDS]
    if not cuda or active is None or active in CUDA_BACKENDS:
        return ""
    name, ver = cuda[0].split()
    return (f"{name} {ver} is installed but {LIBRARY} is {active}'s (installed after it), so MLX runs on the CPU "
            f"only: to use the GPU run `pip install --force-reinstall --no-deps {name}=={ver}`")


def setup_notes(path: Optional[list] = None) -> list:
    """One-line notes on what makes this machine's gate slower than it could be, for the log."""
    from . import blas

    notes = [install_problem(path)] if sys.platform.startswith("linux") else []
    if blas.STATUS.startswith("MLX's bundled reference BLAS"):
        notes.append(f"the gate's CPU products use {blas.STATUS}: it will run many times slower; "
                     "`pip install cmeel-openblas` gives MLX a fast BLAS")
    return [n for n in notes if n]
