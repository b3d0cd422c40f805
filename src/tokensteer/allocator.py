"""Freed memory stays in the process for the next step.

Each decode step allocates and frees tensors of a megabyte or more (a row of logits over a large
vocabulary, its log-probabilities, the sampler's weights). glibc returns such blocks to the system
at once (above its mmap threshold, or by trimming a thread's heap), so every step faults all their
pages in again, which can cost more than the arithmetic. ``keep_freed_memory`` raises those
thresholds, as a long-running server wants; the blocks are then reused.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
SETTINGS = (
    (M_MMAP_THRESHOLD, 32 << 20),  # blocks below this come from the heap, and are reused there
    (M_TRIM_THRESHOLD, 128 << 20),  # free memory a heap keeps before it gives some back
    (M_TOP_PAD, 16 << 20),  # extra room a heap takes when it grows
)


def keep_freed_memory() -> bool:
    """Set glibc's allocator to keep freed blocks below 32 MB for reuse. False (and nothing set)
    off Linux, without glibc, or where the user chose any ``MALLOC_*_`` setting themselves."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
