"""OpenMP worker pools and the engine's thread.

libgomp (torch's and llama.cpp's CPU kernels use it) gives each thread that starts parallel work a
pool of worker threads, kept until that thread exits. While a process holds no more pool threads
than CPUs, idle workers spin a while before they sleep, so back-to-back parallel regions (one
forward pass) start at once; with more, libgomp puts them to sleep almost at once, and every step
of the engine's thread pays for waking them. So a thread that loaded a model or ran other parallel
work, and now hands generation to the engine, releases its pool (``release_pool``).

Long spinning is what makes a busy machine slow, though: a spinning worker takes the CPU from
the thread it waits for. ``bound_spinning``, run before any OpenMP runtime loads, keeps the spin
short (``GOMP_SPINCOUNT``) unless the user chose a policy; pools are released only where the spin
is bounded, and otherwise libgomp's own cautious default is left as it is.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

OMP_PAUSE_SOFT = 1
#: spins of an idle worker before it sleeps: enough for the next region of the same forward pass
SPIN_COUNT = "1000"
_bounded = False


def _libgomp_paths() -> set[str]:
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if "libgomp" in line and line.rstrip().endswith((".so", ".so.1"))}
    except OSError:
        return set()


def bound_spinning() -> None:
    """Keep idle OpenMP workers' spinning short (``GOMP_SPINCOUNT``) if no runtime has loaded yet
    and the user set no policy; a policy the user set is theirs."""
    global _bounded
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        _bounded = True
    elif not _libgomp_paths():
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
        _bounded = True


def spinning_bounded() -> bool:
    """Whether ``bound_spinning`` found the spin bounded (so ``release_pool`` acts)."""
    return _bounded


@cache
def _pause_functions() -> tuple:
    """``omp_pause_resource_all`` of every OpenMP runtime this process has loaded (found once, on
    first use, which comes after a model's libraries are loaded)."""
    out = []
    for path in sorted(_libgomp_paths()):
        try:
            fn = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
        out.append(fn)
    return tuple(out)


def release_pool() -> None:
    """Free the calling thread's OpenMP worker pool, if it has one and spinning is bounded (a later
    parallel region in this thread makes a new one). Never call it from inside parallel work."""
    if not _bounded:
        return
    for fn in _pause_functions():
        fn(OMP_PAUSE_SOFT)
