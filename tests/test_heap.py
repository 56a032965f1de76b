"""glibc memory settings: the `mlx-convert` command starts itself again once with glibc's huge-page tunable where
the kernel gives transparent huge pages on request, and never otherwise (nor on a library import)."""

import os
import subprocess
import sys

import pytest

from convert import heap

PROBE = "import os, convert\nprint(os.environ.get('GLIBC_TUNABLES'), os.getpid())\n"


def glibc_version() -> tuple:
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
        return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else ()
    except (ValueError, OSError, AttributeError):
        return ()


def thp_mode() -> str:
    try:
        return heap.THP_MODE.read_text()
    except OSError:
        return ""


@pytest.mark.parametrize("mode,environ,wanted", [
    ("always madvise [never]\n", {}, False),  # no huge pages to be had
    ("[always] madvise never\n", {}, False),  # every mapping has them already
    ("always [madvise] never\n", {}, True),
    ("always [madvise] never\n", {"MLX_CONVERT_HUGE_PAGES": "0"}, False),
    ("always [madvise] never\n", {"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.hugetlb=1"}, False),
])
def test_huge_pages_wanted_only_in_madvise_mode_and_once(tmp_path, mode, environ, wanted):
    if not sys.platform.startswith("linux") or glibc_version() < (2, 35):
        pytest.skip("the tunable exists in glibc 2.35 and later on Linux only; this machine has another C library")
    (tmp_path / "enabled").write_text(mode)
    assert heap.huge_pages_wanted(environ, tmp_path / "enabled") is wanted
    assert heap.huge_pages_wanted({}, tmp_path / "missing") is False  # no THP in this kernel


def run_as(tmp_path, name: str, **env) -> list:
    script = tmp_path / name
    script.write_text(PROBE)
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MLX_CONVERT_HUGE_PAGES")}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env={**environ, **env},
                          check=True)
    return done.stdout.split()


def test_the_command_restarts_with_the_tunable_and_nothing_else_does(tmp_path):
    if "[madvise]" not in thp_mode() or glibc_version() < (2, 35):
        pytest.skip("this machine's kernel mode or C library gives nothing to restart for (see the test above)")
    tunables, _ = run_as(tmp_path, "mlx-convert")
    assert tunables == heap.TUNABLE
    tunables, _ = run_as(tmp_path, "mlx-convert", GLIBC_TUNABLES="glibc.malloc.check=0")
    assert tunables == "glibc.malloc.check=0:" + heap.TUNABLE  # the user's own tunables are kept
    assert run_as(tmp_path, "mlx-convert", MLX_CONVERT_HUGE_PAGES="0")[0] == "None"
    assert run_as(tmp_path, "my-script.py")[0] == "None"  # importing the package restarts nothing
