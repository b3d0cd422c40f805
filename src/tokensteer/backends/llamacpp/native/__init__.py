"""Small C helpers, compiled on first use with the system C compiler and cached; callers fall back
to Python when there is no compiler (the helpers only make a hot path cheaper, never change results)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

HERE = Path(__file__).parent


@cache
def library(name: str, link_dir: Path | None = None, link: str | None = None, flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """``name``.c from this folder as a loaded shared library (linked against ``link`` in
    ``link_dir`` if given, compiled with extra ``flags``), built once into ``$TOKENSTEER_HOME/native``;
    None when it cannot be built (no compiler, or a CPU the source refuses)."""
    from tokensteer.models import home

    if os.environ.get("TOKENSTEER_NO_NATIVE"):
        return None
    src = HERE / f"{name}.c"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or not src.is_file():
        return None
    linked = [f"-L{link_dir}", f"-l:{link}", f"-Wl,-rpath,{link_dir}"] if link_dir is not None and link else []
    # the CPU is part of the key: ``-march=native`` builds must not move to another machine's cache
    key = hashlib.sha1(src.read_bytes() + " ".join([*linked, *flags, _cpu()]).encode()).hexdigest()[:12]
    out = home() / "native" / f"{name}-{key}.so"
    failed = out.with_suffix(".failed")  # a source this CPU or compiler refused: do not retry each run
    if failed.exists():
        return None
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                so = Path(tmp) / out.name
                cmd = [cc, "-O2", *flags, "-shared", "-fPIC", "-o", str(so), str(src), *linked]
                done = subprocess.run(cmd, capture_output=True, timeout=120)
                if done.returncode != 0:
                    failed.write_bytes(done.stderr[-4000:])
                    return None
                os.replace(so, out)  # whole or not at all: a reader never sees a half-written library
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        return ctypes.CDLL(str(out))
    except OSError:
        return None


def _cpu() -> str:
    """The CPU's model name and feature flags (empty where /proc/cpuinfo is missing)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    wanted = ("model name", "flags", "Features")
    return "|".join(sorted({line for line in info.splitlines() if line.split(":")[0].strip() in wanted}))
