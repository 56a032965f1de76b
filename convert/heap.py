"""Freed memory goes back to the system at once on Linux (glibc), so peak memory stays bounded by a layer.

glibc serves an allocation from its heap unless it is larger than a threshold that it raises, up to 32 MB, each time
a large block is freed. The gate streams models layer by layer: each layer's weights and activations are allocated
and freed in turn, and with the raised threshold they land in the heap, where small long-lived allocations (each
layer's recorded hidden states) pin them: resident memory then grows by tens of MB per layer (1.3 GB instead of
0.5 GB for the transformers pass of a 1.1B model). A fixed 1 MiB threshold gives every larger block its own mapping,
returned to the system when freed. Nothing happens where the C library has no `mallopt` (macOS, musl).
"""

import ctypes
import ctypes.util
import sys

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
