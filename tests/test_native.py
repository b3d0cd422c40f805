"""The native kernels: built at install time per instruction set, picked by CPU at load, refused
when built against another ggml, off with TOKENSTEER_NO_NATIVE=1; never a compiler at run time."""

from __future__ import annotations

import os
import subprocess

import pytest

from tokensteer.backends.llamacpp import native
from tokensteer.backends.llamacpp.native.variants import (
    AMX,
    AVX2,
    AVX512,
    CPU_FLAG,
    VARIANTS,
    same_ggml,
)

pytestmark = pytest.mark.fallback
OFF = bool(os.environ.get("TOKENSTEER_NO_NATIVE"))
LIBRARIES = sorted({v.library for v in VARIANTS})


def flags(*isa: str) -> frozenset[str]:
    return frozenset(CPU_FLAG.get(i, i) for i in isa)


@pytest.fixture
def fresh(monkeypatch):
    """The loader with empty caches, and no way to start a compiler."""
    def no_compiler(*args, **kwargs):
        raise AssertionError(f"a process was started at run time: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess.Popen, "__init__", no_compiler)
    native.load.cache_clear()
    yield native
    native.load.cache_clear()


@pytest.mark.parametrize(("cpu", "want"), [
    (flags(*AVX512, "avx512vbmi", *AMX), {"q8amx": "amx", "q8head": "avx512", "matmul": "avx512"}),  # Intel with AMX
    (flags(*AVX512, "avx512vbmi"), {"q8amx": None, "q8head": "avx512", "matmul": "avx512"}),  # AMD EPYC (Zen 4)
    (flags(*AVX512), {"q8amx": None, "q8head": "avx512", "matmul": None}),  # AVX-512 VNNI without VBMI
    (flags(*AVX2), {"q8amx": None, "q8head": "avx2", "matmul": None}),
    (flags("avx2", "f16c"), {"q8amx": None, "q8head": None, "matmul": None}),  # no FMA: no AVX2 build
    (frozenset(), {"q8amx": None, "q8head": None, "matmul": None}),  # another CPU family
])
def test_each_cpu_gets_the_best_build_it_runs(cpu, want):
    for name, variant in want.items():
        got = native.candidates(name, cpu)
        assert (got[0].name if got else None) == variant
    assert [v.name for v in native.candidates("evalstop", cpu)] == ["generic"]


def test_a_build_never_asks_for_an_instruction_set_the_cpu_lacks():
    for v in VARIANTS:
        assert v.runs_on(flags(*v.isa))
        for missing in v.isa:
            assert not v.runs_on(flags(*v.isa) - flags(missing))


@pytest.mark.skipif(OFF, reason="TOKENSTEER_NO_NATIVE is set")
def test_the_install_built_every_kernel_this_cpu_runs(fresh):
    """Fails where the install skipped a kernel (no compiler, ggml headers missing): `make install`
    must build them. Loading starts no compiler."""
    for name in LIBRARIES:
        for v in fresh.candidates(name, fresh.cpu_flags()):
            assert fresh.built_file(v) is not None, f"{v.module} was not built: {fresh.status(name)}"
            assert fresh.library(name, v.name) is not None, fresh.load(name, v.name)[1]
        assert fresh.status(name).endswith("build") or not fresh.candidates(name, fresh.cpu_flags())


@pytest.mark.skipif(OFF, reason="TOKENSTEER_NO_NATIVE is set")
def test_the_loader_follows_the_cpu_flags(fresh, monkeypatch):
    """An AVX2-only CPU gets the AVX2 output kernel and no block kernel, even where more was built."""
    if native.built_file(native.candidates("q8head", flags(*AVX2))[0]) is None:
        pytest.skip("no AVX2 build here")
    monkeypatch.setattr(native, "cpu_flags", lambda: flags(*AVX2))
    assert "q8head_avx2" in native.library("q8head")._name
    assert native.library("matmul") is None and "instruction sets" in native.status("matmul")


@pytest.mark.skipif(OFF, reason="TOKENSTEER_NO_NATIVE is set")
def test_a_kernel_built_against_another_ggml_is_refused_not_run(fresh, monkeypatch):
    if not fresh.candidates("matmul", fresh.cpu_flags()) or fresh.library("matmul") is None:
        pytest.skip("no block kernel here")
    fresh.load.cache_clear()
    monkeypatch.setattr(native, "ggml_now", lambda: "0.0.1 0000000 0123456789abcdef")
    with pytest.warns(RuntimeWarning, match="built against ggml"):
        assert native.library("matmul") is None
    assert "llama-cpp-python has 0.0.1" in native.status("matmul")
    assert native.library("q8head") is not None or not native.candidates("q8head", native.cpu_flags())  # no ggml in it


def test_ggml_identities_compare_the_header_hash_only_where_both_have_it():
    assert same_ggml("0.25.3 abc1234 ffff", "0.25.3 abc1234 ffff")
    assert not same_ggml("0.25.3 abc1234 ffff", "0.25.3 abc1234 eeee")
    assert same_ggml("0.25.3 abc1234 ffff", "0.25.3 abc1234")  # headers gone at run time: version and commit
    assert not same_ggml("0.25.3 abc1234 ffff", "0.25.4 abc1234")
    assert not same_ggml("0.25.3 abc1234", "0.25.3 def5678")


def test_no_native_turns_every_kernel_off(fresh, monkeypatch):
    monkeypatch.setenv("TOKENSTEER_NO_NATIVE", "1")
    for name in LIBRARIES:
        assert fresh.library(name) is None and "TOKENSTEER_NO_NATIVE" in fresh.status(name)
