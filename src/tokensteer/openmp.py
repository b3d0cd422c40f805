"""The OpenMP worker pools of threads that hand their work to the engine.

libgomp (torch's and llama.cpp's CPU kernels use it) gives each thread that starts parallel work a
pool of worker threads, kept until that thread exits. Once a process holds more pool threads than
it has CPUs, libgomp stops spinning between parallel regions and puts its threads to sleep, so
every step of the engine's own thread pays for waking them. A thread that loaded a model, or ran
any other parallel work, and now hands generation to the engine releases its pool here.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

OMP_PAUSE_SOFT = 1


@cache
def _pause_functions() -> tuple:
    """``omp_pause_resource_all`` of every OpenMP runtime this process has loaded (found once, on
    first use, which comes after a model's libraries are loaded)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line and line.rstrip().endswith((".so", ".so.1"))}
    except OSError:
        return ()
    out = []
    for path in sorted(paths):
        try:
            fn = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
        out.append(fn)
    return tuple(out)


def release_pool() -> None:
    """Free the calling thread's OpenMP worker pool, if it has one (a later parallel region in this
    thread makes a new one). Never call it from inside parallel work."""
    for fn in _pause_functions():
        fn(OMP_PAUSE_SOFT)
