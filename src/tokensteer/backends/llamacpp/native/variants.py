"""What each native kernel is built as, for which CPUs, and which ggml it was built against.

Shared by ``setup.py`` (which compiles every variant once, at install time) and the loader in
``__init__.py`` (which picks the best built variant this CPU runs). Standard library only: the
build imports this file before tokensteer's dependencies are importable.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
from pathlib import Path
from typing import NamedTuple

AVX2 = ("avx2", "fma", "f16c")
AVX512 = (*AVX2, "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vnni")
AMX = ("amx-tile", "amx-int8")

#: gcc's ``-m`` option for an instruction-set extension -> its flag in /proc/cpuinfo
CPU_FLAG = {"avx512vnni": "avx512_vnni", "amx-tile": "amx_tile", "amx-int8": "amx_int8"}

#: the ggml headers whose contents the kernels' structs and enums come from
GGML_HEADERS = ("ggml.h", "ggml-backend.h")


class Variant(NamedTuple):
    """One build of one kernel: ``library`` (what callers ask for), ``name`` (its instruction
    sets), the C ``source`` in this folder, the ``isa`` it is compiled for (gcc ``-m`` options; the
    CPU must have every one), OpenMP, and whether it links llama-cpp-python's ggml."""

    library: str
    name: str
    source: str
    isa: tuple[str, ...] = ()
    openmp: bool = False
    ggml: bool = False

    @property
    def module(self) -> str:
        """The file stem of the built library, e.g. ``q8head_avx512``."""
        return f"{self.library}_{self.name}"

    def runs_on(self, cpu: frozenset[str]) -> bool:
        """True when a CPU with the /proc/cpuinfo ``cpu`` flags has every instruction set it uses."""
        return all(CPU_FLAG.get(i, i) in cpu for i in self.isa)


#: every build, best first within a library (the loader takes the first one the CPU runs)
VARIANTS = (
    Variant("evalstop", "generic", "evalstop.c", ggml=True),
    Variant("matmul", "avx512", "matmul.c", (*AVX512, "avx512vbmi"), ggml=True),
    Variant("q8amx", "amx", "q8amx.c", (*AVX512, *AMX), openmp=True),
    Variant("q8head", "avx512", "q8head.c", AVX512, openmp=True),
    Variant("q8head", "avx2", "q8head.c", AVX2, openmp=True),
)


def find_ggml() -> tuple[Path, Path | None] | None:
    """llama-cpp-python's ``libggml-base.so`` and the folder of its ggml headers (None when it was
    installed without them), found without importing it; None when it is not installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    pkg = Path(spec.origin).parent
    lib = pkg / "lib" / "libggml-base.so"
    if not lib.is_file():
        return None
    headers = next((d for d in (pkg.parent / "include", pkg / "include") if all((d / h).is_file() for h in GGML_HEADERS)), None)
    return lib, headers


def ggml_identity(lib: Path, headers: Path | None) -> str:
    """``"<ggml version> <ggml commit> <hash of the headers>"`` of the ggml at ``lib`` (the hash
    left out without ``headers``). Kernels record it when built, and are refused where it differs."""
    ggml = ctypes.CDLL(str(lib))
    fields = []
    for fn in (ggml.ggml_version, ggml.ggml_commit):
        fn.restype = ctypes.c_char_p
        fields.append((fn() or b"unknown").decode())
    if headers is not None:
        fields.append(hashlib.sha1(b"".join((headers / h).read_bytes() for h in GGML_HEADERS)).hexdigest()[:16])
    return " ".join(fields)


def same_ggml(built: str, now: str) -> bool:
    """True when ``now`` (this process's ggml) matches ``built``; the header hash is compared where
    both have one (headers may be missing at run time, never at build time)."""
    a, b = built.split(), now.split()
    return len(a) >= 2 and a[:2] == b[:2] and (len(a) < 3 or len(b) < 3 or a[2] == b[2])
