"""Builds the llama.cpp backend's C kernels at install time; everything else is in pyproject.toml.

Each kernel is compiled once per instruction-set variant (``native/variants.py``) and the package
loads the best one the CPU runs. Every build is optional: without a C compiler, on another CPU
family, or without llama-cpp-python's ggml in this environment (install it first and build with
``--no-build-isolation``, as ``make install`` does), the install still succeeds and the package
runs its pure fallbacks. See docs/native.md.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = Path("src/tokensteer/backends/llamacpp/native")
_spec = importlib.util.spec_from_file_location("tokensteer_native_variants", NATIVE / "variants.py")
variants = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = variants
_spec.loader.exec_module(variants)


def extensions() -> list[Extension]:
    """One optional extension per variant this machine's compiler could target."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    ggml = variants.find_ggml()
    if ggml is not None and ggml[1] is None:
        print("tokensteer: llama-cpp-python has no ggml headers here; its kernels are not built", file=sys.stderr)
        ggml = None
    elif ggml is None:
        print("tokensteer: llama-cpp-python is not installed in the build environment; the kernels that "
              "link its ggml are not built (install it first, then pip install --no-build-isolation)", file=sys.stderr)
    exts = []
    for v in variants.VARIANTS:
        if (v.isa and not x86) or (v.ggml and ggml is None):
            continue
        compile_args = ["-O3", "-g0", *(f"-m{isa}" for isa in v.isa)] + (["-fopenmp"] if v.openmp else [])
        ext = Extension(f"tokensteer.backends.llamacpp.native.{v.module}", [str(NATIVE / v.source)], extra_compile_args=compile_args,
                        extra_link_args=["-fopenmp"] if v.openmp else [], depends=[str(NATIVE / h) for h in ("ggml_built.h", "panels.h", "geglu.h")], optional=True)
        if v.ggml:
            lib, headers = ggml
            ext.include_dirs = [str(headers)]
            ext.define_macros = [("TOKENSTEER_GGML", f'"{variants.ggml_identity(lib, headers)}"')]
            ext.library_dirs = ext.runtime_library_dirs = [str(lib.parent)]
            ext.libraries = [f":{lib.name}"]
        exts.append(ext)
    return exts


class BuildKernels(build_ext):
    """build_ext that says which kernels it built (a failed one is skipped, as ``optional`` asks)
    and, building in place (editable installs), first removes the last build's libraries, so a
    kernel that no longer builds is not left behind in its old version."""

    def run(self) -> None:
        if self.inplace:
            for old in (Path(__file__).resolve().parent / NATIVE).glob("*.so"):
                old.unlink()
        super().run()
        built = [e.name.rsplit(".", 1)[1] for e in self.extensions if Path(self.get_ext_fullpath(e.name)).is_file()]
        print(f"tokensteer: native kernels built: {', '.join(built) or 'none'}", file=sys.stderr)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildKernels})
