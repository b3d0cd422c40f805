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
def library(name: str, link_dir: Path, link: str) -> ctypes.CDLL | None:
    """``name``.c from this folder as a loaded shared library linked against ``link`` in
    ``link_dir``, built once into ``$TOKENSTEER_HOME/native``; None when it cannot be built."""
    from tokensteer.models import home

    if os.environ.get("TOKENSTEER_NO_NATIVE"):
        return None
    src = HERE / f"{name}.c"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or not src.is_file():
        return None
    key = hashlib.sha1(src.read_bytes() + str(link_dir.resolve()).encode()).hexdigest()[:12]
    out = home() / "native" / f"{name}-{key}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                so = Path(tmp) / out.name
                cmd = [cc, "-O2", "-shared", "-fPIC", "-o", str(so), str(src), f"-L{link_dir}", f"-l:{link}", f"-Wl,-rpath,{link_dir}"]
                if subprocess.run(cmd, capture_output=True, timeout=120).returncode != 0:
                    return None
                os.replace(so, out)  # whole or not at all: a reader never sees a half-written library
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        return ctypes.CDLL(str(out))
    except OSError:
        return None
