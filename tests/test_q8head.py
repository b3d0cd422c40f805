"""Our Q8_0 output-layer kernel on small GGUF files, against a numpy reference of the same arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

import tokensteer.backends.llamacpp.q8head as q8head  # noqa: E402
from tokensteer.backends.llamacpp.q8head import Q8Head, kernel  # noqa: E402

pytestmark = pytest.mark.skipif(kernel() is None, reason="the Q8_0 output kernel is not built for this machine")


@pytest.fixture(params=["amx", "best", "avx2"])
def variant(request, monkeypatch):
    """The AMX kernel, the best build this CPU runs without AMX, and the AVX2 build (the AVX2 path
    even on an AVX-512 CPU). Returns Q8Head's ``amx`` argument."""
    if request.param == "amx" and q8head.amx_kernel() is None:
        pytest.skip("no AMX here")
    if request.param == "avx2":
        if kernel("avx2") is None:
            pytest.skip("no AVX2 build here")
        monkeypatch.setattr(q8head, "kernel", lambda: kernel("avx2"))
    return request.param == "amx"


def write(path, W: np.ndarray, qtype=gguf.GGMLQuantizationType.Q8_0, untied: bool = False) -> np.ndarray:
    """A GGUF file whose output matrix is ``W`` [V, H] in ``qtype``; returns the matrix as stored."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    q = gguf.quants.quantize(W, qtype) if qtype != gguf.GGMLQuantizationType.F32 else W
    emb = np.zeros_like(W) if untied else None
    if untied:
        w.add_tensor("token_embd.weight", emb)
        w.add_tensor("output.weight", q, raw_dtype=qtype)
    else:
        w.add_tensor("token_embd.weight", q, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.quants.dequantize(q, qtype) if qtype != gguf.GGMLQuantizationType.F32 else W


def reference(W: np.ndarray, x: np.ndarray) -> np.ndarray:
    """llama.cpp's Q8_0 dot product: activations quantised per 32 values in float32 as its
    ``quantize_row_q8_0`` does (d = amax/127, x * (1/d) rounded half away from zero), times the
    dequantised weights, summed in float64."""
    xb = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    d = np.abs(xb).max(-1, keepdims=True) / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = (xb * inv).astype(np.float32).astype(np.float64)  # the float32 product, then an exact roundf
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)
    return (W.astype(np.float64) @ (q * d).reshape(x.shape[0], -1).astype(np.float64).T).T


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(v=st.integers(1, 70), blocks=st.sampled_from([1, 2, 3, 6, 20]), rows=st.integers(1, 20), seed=st.integers(0, 2**16), untied=st.booleans())
def test_kernel_matches_the_reference_and_rows_do_not_interact(tmp_path_factory, variant, v, blocks, rows, seed, untied):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((v, 32 * blocks)).astype(np.float32)
    path = tmp_path_factory.mktemp("q8") / "m.gguf"
    Wq = write(path, W, untied=untied)
    x = (rng.standard_normal((rows, 32 * blocks)) * rng.uniform(0.1, 10, (rows, 1))).astype(np.float32)
    x[0, :32] = 0  # an all-zero block (scale 0)
    head = Q8Head(path, n_threads=2, amx=variant)
    assert head.uses_amx == variant
    got = head.logits(x)
    want = reference(Wq, x)
    assert got.shape == (rows, v) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    alone = np.concatenate([head.logits(x[i : i + 1]) for i in range(rows)])
    assert np.array_equal(alone, got)  # a row's logits do not depend on the rows beside it
    out = np.empty((rows, v), np.float32)
    assert head.logits(x, out) is out and np.array_equal(out, got)


def test_other_types_and_widths_are_refused(tmp_path):
    W = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    write(tmp_path / "f32.gguf", W, gguf.GGMLQuantizationType.F32)
    with pytest.raises(ValueError, match="not Q8_0"):
        Q8Head(tmp_path / "f32.gguf", 1)


def test_bad_shapes_are_refused_not_read_past(tmp_path, variant):
    W = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    write(tmp_path / "m.gguf", W)
    head = Q8Head(tmp_path / "m.gguf", 1, amx=variant)
    with pytest.raises(ValueError, match="rows of 64"):
        head.logits(np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        head.logits(np.zeros((2, 64), np.float32), np.empty((3, 8), np.float32))
    head.free()
    with pytest.raises(RuntimeError, match="freed"):
        head.logits(np.zeros((1, 64), np.float32))
