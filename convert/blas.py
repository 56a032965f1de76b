"""A fast BLAS for MLX's CPU backend on Linux, loaded before `mlx.core` is first imported.

The `mlx[cpu]` wheel takes its `cblas_*` symbols from a bundled reference (netlib) BLAS: float32 products run at a
few GFLOP/s, which makes the gate's reference-sized products slow. MLX resolves those symbols through the global
scope first, so a library loaded with RTLD_GLOBAL before `mlx.core` serves them instead. We use OpenBLAS from the
`cmeel-openblas` wheel; its only non-system dependency, `libgfortran.so.5`, is missing on many machines, and the
MLX wheel bundles one under an auditwheel-mangled name: a copy of it with the standard SONAME (the same edit as
`patchelf --set-soname`, in a cache folder) satisfies OpenBLAS. When nothing loads, MLX keeps its own BLAS and
`STATUS` says so. Nothing happens on macOS (MLX uses Accelerate and Metal) or once `mlx.core` is imported.

`MLX_CONVERT_BLAS=/path/to/libblas.so` names another library with plain `cblas_*` symbols; `MLX_CONVERT_BLAS=none`
keeps MLX's own.
"""

import ctypes
import glob
import os
import sys
from pathlib import Path

STATUS = "not loaded"


def _site_dirs() -> list:
    import site

    dirs = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path  # PYTHONPATH targets too
    return list(dict.fromkeys(d for d in dirs if d and os.path.isdir(d)))


def _find(pattern: str):
    for d in _site_dirs():
        hits = sorted(glob.glob(os.path.join(d, pattern)))
        if hits:
            return hits[0]
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlx-convert" / "blas"


def _standard_soname_copy(library: str, soname: str) -> str:
    """A copy of `library` whose SONAME reads `soname` (shorter than the mangled one, so it is edited in place)."""
    target = _cache_dir() / soname
    if target.exists():
        return str(target)
    data = bytearray(Path(library).read_bytes())
    old = os.path.basename(library).encode() + b"\0"
    if data.count(old) != 1 or len(soname) + 1 > len(old):
        raise OSError(f"cannot rename the SONAME of {library}")
    at = data.index(old)
    data[at : at + len(old)] = soname.encode().ljust(len(old), b"\0")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, target)  # atomic: concurrent processes see a whole file or none
    return str(target)


def _load_gfortran_from_mlx():
    """Load the MLX backend wheel's bundled libgfortran (and its libquadmath) under the standard SONAME: mlx-cpu's
    (`mlx_cpu.libs`) or, on a CUDA install, mlx-cuda-13's (`mlx_cuda_13.libs`)."""
    gfortran = _find("mlx_*.libs/libgfortran-*.so.5*")
    if gfortran is None:
        raise OSError("no libgfortran.so.5 on this machine and none bundled with mlx")
    for dep in glob.glob(os.path.join(os.path.dirname(gfortran), "libquadmath-*")):
        ctypes.CDLL(dep, mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(_standard_soname_copy(gfortran, "libgfortran.so.5"), mode=ctypes.RTLD_GLOBAL)


def _load_openblas() -> str:
    path = _find("cmeel.prefix/lib/libopenblas.so.0")
    if path is None:
        raise OSError("the cmeel-openblas wheel is not installed")
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        if "libgfortran" not in str(e):
            raise
        _load_gfortran_from_mlx()
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return "OpenBLAS (cmeel-openblas)"


def load() -> str:
    """Load a fast BLAS if this is Linux and MLX is not imported yet; returns (and keeps in STATUS) what MLX uses."""
    global STATUS
    if STATUS != "not loaded":
        return STATUS
    choice = os.environ.get("MLX_CONVERT_BLAS", "")
    if not sys.platform.startswith("linux") or choice.lower() == "none":
        STATUS = "MLX's own"
    elif "mlx.core" in sys.modules:
        STATUS = "MLX's bundled reference BLAS (mlx.core was imported before mlx-convert)"
    else:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(os.cpu_count() or 1))
        # OpenBLAS's idle threads spin for 2**28 cycles (~0.1 s) after each call, on cores that torch's threads
        # (the reference, calibration) and numpy's OpenBLAS then need: 2**20 (~0.3 ms) still keeps them warm
        # between back-to-back products. Read when each OpenBLAS loads (this one, then numpy's). Measured on 2
        # cores: the 1.1B 4-bit gate 47-52 s -> 42 s, GPTQ on two 1.1B-shaped layers 85 s -> 67 s.
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")
        try:
            if choice:
                ctypes.CDLL(choice, mode=ctypes.RTLD_GLOBAL)
                STATUS = choice
            else:
                STATUS = _load_openblas()
        except OSError as e:
            STATUS = f"MLX's bundled reference BLAS ({str(e).splitlines()[0][:160]})"
    return STATUS
