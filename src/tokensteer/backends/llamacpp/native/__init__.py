"""The llama.cpp backend's C kernels, compiled at install time (``setup.py``) once per instruction-set
variant; at run time this module loads the best variant the CPU runs. No compiler runs here: where
no variant was built (no compiler at install, another CPU family, no ggml headers), the variant
built against another ggml, or ``TOKENSTEER_NO_NATIVE=1``, callers keep their pure paths (llama.cpp's
own kernels, a Python callback), which give the same results, only slower. See docs/native.md.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import warnings
from functools import cache
from pathlib import Path

from tokensteer.backends.llamacpp.native.variants import (
    VARIANTS,
    Variant,
    find_ggml,
    ggml_identity,
    same_ggml,
)

HERE = Path(__file__).parent
REBUILD = "reinstall tokensteer to rebuild them (`make install`, or `pip install --no-build-isolation -e .` after llama-cpp-python)"


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it is missing: then only variants
    without instruction-set requirements load)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def built_file(v: Variant) -> Path | None:
    """The installed shared library of ``v``, or None when the install did not build it."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (HERE / (v.module + suffix)).is_file():
            return HERE / (v.module + suffix)
    return None


@cache
def ggml_now() -> str | None:
    """The identity (``variants.ggml_identity``) of the ggml llama-cpp-python loads, or None."""
    found = find_ggml()
    return None if found is None else ggml_identity(*found)


def candidates(name: str, cpu: frozenset[str], variant: str | None = None) -> list[Variant]:
    """The builds of kernel ``name`` a CPU with flags ``cpu`` runs, best first (only ``variant`` if given)."""
    return [v for v in VARIANTS if v.library == name and v.runs_on(cpu) and variant in (None, v.name)]


@cache
def load(name: str, variant: str | None = None) -> tuple[ctypes.CDLL | None, str]:
    """``library``'s answer, and a line on which build it is or why there is none."""
    if os.environ.get("TOKENSTEER_NO_NATIVE"):
        return None, "off (TOKENSTEER_NO_NATIVE is set)"
    fits = candidates(name, cpu_flags(), variant)
    if not fits:
        return None, "no build for this CPU's instruction sets"
    why = f"not built at install; {REBUILD}"
    for v in fits:
        path = built_file(v)
        if path is None:
            continue
        if v.ggml:
            try:
                import llama_cpp  # noqa: F401  (loads the ggml that our library then links to)
            except ImportError:
                return None, "llama-cpp-python is not installed"
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            why = f"the {v.name} build does not load ({e})"
            continue
        if v.ggml:
            lib.tokensteer_ggml_built.restype = ctypes.c_char_p
            built, now = lib.tokensteer_ggml_built().decode(), ggml_now()
            if now is None or not same_ggml(built, now):
                why = f"built against ggml {built}, but llama-cpp-python has {now}; {REBUILD}"
                warnings.warn(f"tokensteer's {name} kernel was {why}; using llama.cpp's own", RuntimeWarning, stacklevel=3)
                return None, why
        return lib, f"{v.name} build"
    return None, why


def library(name: str, variant: str | None = None) -> ctypes.CDLL | None:
    """The built kernel ``name`` (``variants.VARIANTS``): the ``variant`` of that name, else the best
    one this CPU runs; None where none can be used here (``status`` says why)."""
    return load(name, variant)[0]


def status(name: str) -> str:
    """One line on kernel ``name``: the variant in use, or why none is."""
    return load(name, None)[1]
