"""Freed memory goes back to the system at once on Linux (glibc), so peak memory stays bounded by a layer.

glibc serves an allocation from its heap unless it is larger than a threshold that it raises, up to 32 MB, each time
a large block is freed. The gate streams models layer by layer: each layer's weights and activations are allocated
and freed in turn, and with the raised threshold they land in the heap, where small long-lived allocations (each
layer's recorded hidden states) pin them: resident memory then grows by tens of MB per layer (1.3 GB instead of
0.5 GB for the transformers pass of a 1.1B model). A fixed 1 MiB threshold gives every larger block its own mapping,
returned to the system when freed. Nothing happens where the C library has no `mallopt` (macOS, musl).

Each of those mappings is then filled page by page, and on a virtual machine a 4 KiB page fault costs as much as
writing the page several times over: a 46 MB bf16-to-float32 conversion took 14 ms into fresh memory and 1.8 ms
into memory already touched. Where the kernel gives transparent huge pages on request (`madvise` mode), glibc asks
for them when the `glibc.malloc.hugetlb=1` tunable is set, which only the environment of a starting process can do:
the `mlx-convert` command therefore starts itself again once with it (`rerun_with_huge_pages`; 4-bit conversion of
a 1.1B model 4.4 s -> 3.6 s, its gate 61 s -> 55 s on a 2-core VM). `MLX_CONVERT_HUGE_PAGES=0` turns this off.
"""

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 20


def bound() -> bool:
    """Fix glibc's mmap threshold at THRESHOLD; whether it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False


TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_wanted(environ=os.environ, thp_mode: Path = THP_MODE) -> bool:
    """Whether this process would get transparent huge pages from glibc only by starting again with `TUNABLE`:
    Linux with glibc 2.35 or later (the first with the tunable), the kernel's mode `madvise` (with `always` every
    mapping gets them already, with `never` none can), and neither the tunable nor MLX_CONVERT_HUGE_PAGES=0 set."""
    if not sys.platform.startswith("linux") or environ.get("MLX_CONVERT_HUGE_PAGES", "1") == "0":
        return False
    if TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
        if name != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
            return False
        return "[madvise]" in thp_mode.read_text()
    except (OSError, ValueError, AttributeError):
        return False


def rerun_with_huge_pages():
    """Replace this process by the same command with `TUNABLE` added to GLIBC_TUNABLES, when `huge_pages_wanted`.
    Called first thing by the `mlx-convert` command only (never by a library import or the tests); if the exec
    fails, the command goes on as it is."""
    if not huge_pages_wanted():
        return
    tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), TUNABLE) if t)
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})
    except OSError:
        pass
