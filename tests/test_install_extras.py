"""The `[cuda]` extra: MLX's CPU and CUDA backends are separate distributions that each install
`mlx/lib/libmlx.so`, and mlx-convert requires the CPU one by default. These tests run pip, offline, on stub wheels of
MLX's packages (same names, dependencies and conflicting file; version 99.0) with the requirement lines of our own
setup.cfg, and check which library ends up on disk and what `convert.backend` reports about it."""

import base64
import configparser
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from convert import backend

ROOT = Path(__file__).resolve().parents[1]
CPU, CUDA = b"stub: MLX's CPU backend library", b"stub: MLX's CUDA backend library"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MLX's backend packages are Linux-only")


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def stub_wheel(folder: Path, name: str, version: str, files: dict, requires: tuple = (), extras: tuple = ()):
    """A minimal pure-Python wheel: `files` {path: bytes}, Requires-Dist lines `requires`."""
    dist = f"{name.replace('-', '_')}-{version}"
    info = f"{dist}.dist-info"
    metadata = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
                         + [f"Provides-Extra: {e}" for e in extras] + [f"Requires-Dist: {r}" for r in requires]) + "\n"
    contents = {**files, f"{info}/METADATA": metadata.encode(),
                f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "\n".join([_record_line(p, d) for p, d in contents.items()] + [f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        for path, data in {**contents, f"{info}/RECORD": record.encode()}.items():
            z.writestr(path, data)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    stub_wheel(folder, "mlx", "99.0", {"mlx/__init__.py": b""}, extras=("cpu", "cuda13"),
               requires=('mlx-cpu==99.0; platform_system == "Linux" and extra == "cpu"',
                         'mlx-cuda-13==99.0; platform_system == "Linux" and extra == "cuda13"'))
    stub_wheel(folder, "mlx-cpu", "99.0", {backend.LIBRARY: CPU})
    stub_wheel(folder, "mlx-cuda-13", "99.0", {backend.LIBRARY: CUDA}, requires=("nvidia-cublas==13.*",))
    stub_wheel(folder, "nvidia-cublas", "13.0.0", {"nvidia/cublas/__init__.py": b""})
    return folder


def our_mlx_requirements(extra: str = None) -> list:
    """setup.cfg's requirement lines that name MLX: install_requires, plus those of `extra`."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    if extra:
        lines += cfg["options.extras_require"][extra].splitlines()
    return [line.strip() for line in lines if line.strip().startswith("mlx")]


def pip_install(stubs: Path, target: Path, requirements: list):
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(stubs),
                             "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(target),
                             *requirements], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_default_install_brings_the_cpu_backend(stubs, tmp_path):
    requirements = our_mlx_requirements()
    assert any(r.startswith("mlx[cpu]") for r in requirements), requirements
    pip_install(stubs, tmp_path, requirements)
    assert (tmp_path / backend.LIBRARY).read_bytes() == CPU
    assert backend.installed_backends([str(tmp_path)]) == ("mlx-cpu", ["mlx-cpu 99.0"])
    assert backend.install_problem([str(tmp_path)]) == ""


def test_cuda_extra_ends_with_the_cuda_library(stubs, tmp_path):
    """`pip install 'mlx-convert[cuda]'` resolves both backends in one run; pip installs the one without
    dependencies (mlx-cpu) first, so the CUDA library is the one left on disk, and the hash check says so."""
    requirements = our_mlx_requirements("cuda")
    assert any(r.startswith("mlx[cuda13]") for r in requirements), requirements
    pip_install(stubs, tmp_path, requirements)
    assert (tmp_path / backend.LIBRARY).read_bytes() == CUDA
    active, installed = backend.installed_backends([str(tmp_path)])
    assert active == "mlx-cuda-13" and installed == ["mlx-cpu 99.0", "mlx-cuda-13 99.0"]
    assert backend.install_problem([str(tmp_path)]) == ""

    # An installer that puts mlx-cpu's file down last leaves the GPU unused: said in one line, with the fix.
    (tmp_path / backend.LIBRARY).write_bytes(CPU)
    assert backend.installed_backends([str(tmp_path)])[0] == "mlx-cpu"
    problem = backend.install_problem([str(tmp_path)])
    assert "mlx-cuda-13 99.0 is installed" in problem and "--force-reinstall --no-deps mlx-cuda-13==99.0" in problem
    assert "\n" not in problem

    # A library that matches neither record (modified by hand): nothing is claimed.
    (tmp_path / backend.LIBRARY).write_bytes(b"something else")
    assert backend.installed_backends([str(tmp_path)])[0] is None
    assert backend.install_problem([str(tmp_path)]) == ""


def test_slow_blas_is_noted(monkeypatch, tmp_path):
    from convert import blas

    monkeypatch.setattr(blas, "STATUS", "MLX's bundled reference BLAS (the cmeel-openblas wheel is not installed)")
    notes = backend.setup_notes([str(tmp_path)])
    assert len(notes) == 1 and "pip install cmeel-openblas" in notes[0] and "not installed" in notes[0]
    monkeypatch.setattr(blas, "STATUS", "OpenBLAS (cmeel-openblas)")
    assert backend.setup_notes([str(tmp_path)]) == []


@pytest.mark.parametrize("given", [None, "7"])
def test_openblas_threads_stop_spinning_soon_unless_told_otherwise(given):
    """`import convert` (before numpy and MLX load their OpenBLAS) sets a short idle spin for OpenBLAS's threads,
    which otherwise hold cores for ~0.1 s after each product while torch and numpy need them; a value the user set
    is kept. Checked in a fresh interpreter, where the libraries have not read the environment yet."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    code = ("import sys, os; assert 'numpy' not in sys.modules; import convert; "
            "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), convert.blas.STATUS)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == (given or "20"), out
