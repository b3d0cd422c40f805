"""Our kernels for llama.cpp's block matrix products and GEGLU, against numpy references of the same
arithmetic (spliced into the bundled model: ``test_llamacpp.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

from tokensteer.backends.llamacpp import kernels as matmul  # noqa: E402

pytestmark = pytest.mark.skipif(matmul.kernel() is None, reason="the block kernels cannot be built on this machine")

Q = gguf.GGMLQuantizationType


def encode(rng: np.random.Generator, kind: str, n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """A random matrix in GGUF encoding ``kind`` and its dequantised values. Q8_0 and Q5_0 come from
    gguf's quantiser; Q4_K and Q6_K (which gguf only decodes) from random blocks with sane scales."""
    if kind in ("Q8_0", "Q5_0"):
        raw = gguf.quants.quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), Q[kind])
    else:
        size, scale_at = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,))}[kind]
        raw = rng.integers(0, 256, (n_out, n_in // 256, size), dtype=np.uint8)
        for at in scale_at:  # fp16 scales: finite, small
            raw[..., at : at + 2] = rng.uniform(0.001, 0.05, raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
        raw = raw.reshape(n_out, -1)
    return raw, gguf.quants.dequantize(raw, Q[kind]).reshape(n_out, n_in)


def reference(W: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The kernel's arithmetic: activations rounded to 8 bits per 32 values (scale amax/127 in
    float32, round half to even), times the dequantised weights, summed in float64."""
    xb = x.reshape(x.shape[0], -1, 32)
    d = (np.abs(xb).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.rint((xb * inv).astype(np.float32))
    return (W.astype(np.float64) @ (q * d).reshape(x.shape[0], -1).astype(np.float64).T).T


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["Q8_0", "Q5_0", "Q4_K", "Q6_K"]), n_out=st.integers(1, 40), units=st.integers(1, 3),
       rows=st.integers(1, 9), slices=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_kernel_matches_the_reference_and_rows_do_not_interact(kind, n_out, units, rows, slices, seed):
    rng = np.random.default_rng(seed)
    n_in = units * 256
    raw, W = encode(rng, kind, n_out, n_in)
    x = (rng.standard_normal((rows, n_in)) * rng.uniform(0.01, 20, (rows, 1))).astype(np.float32)
    got = matmul.matmul(raw, kind, n_out, x, slices)
    want = reference(W, x)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for r in range(rows):  # a row alone gets the same numbers, bit for bit, as in the batch
        assert np.array_equal(matmul.matmul(raw, kind, n_out, x[r : r + 1]), got[r : r + 1])


def test_rows_of_64_values_for_the_32_value_types():
    rng = np.random.default_rng(1)
    raw, W = encode(rng, "Q5_0", 5, 640)  # Gemma 3's attention and FFN inputs: 640 = 10 x 64
    x = rng.standard_normal((3, 640)).astype(np.float32)
    assert np.allclose(matmul.matmul(raw, "Q5_0", 5, x), reference(W, x), rtol=1e-4, atol=1e-3)


def test_kernel_refuses_other_types_and_shapes():
    rng = np.random.default_rng(0)
    raw, W = encode(rng, "Q5_0", 2, 96)  # 3 blocks of 32: any whole number of blocks
    x = rng.standard_normal((2, 96)).astype(np.float32)
    assert np.allclose(matmul.matmul(raw, "Q5_0", 2, x), reference(W, x), rtol=1e-4, atol=1e-3)
    raw, _ = encode(rng, "Q4_K", 2, 256)
    with pytest.raises(ValueError, match="shape"):
        matmul.matmul(raw, "Q4_K", 2, np.zeros((1, 128), np.float32))  # half a Q4_K super-block
    with pytest.raises(ValueError, match="Q4_0"):
        matmul.matmul(raw, "Q4_0", 2, np.zeros((1, 64), np.float32))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 300), slices=st.integers(1, 4), scale=st.floats(0.1, 30), seed=st.integers(0, 2**16))
def test_geglu_is_tanh_gelu_times_the_gate(n, slices, scale, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal(n) * scale).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    x = a.astype(np.float64)
    want = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))) * b
    assert np.allclose(matmul.geglu(a, b, slices), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0", "Q4_K", "Q6_K"])
def test_a_new_matrix_at_a_packed_address_is_packed_again(kind):
    """Matrices run from panels packed at first use and kept by address; once a model
    is loaded (``weights_moved``), a matrix whose bytes changed in place is packed again."""
    lib = matmul.kernel()
    rng = np.random.default_rng(7)
    first, W1 = encode(rng, kind, 20, 256)
    second, W2 = encode(rng, kind, 20, 256)
    buf = np.ascontiguousarray(first).view(np.uint8).copy()
    x = rng.standard_normal((3, 256)).astype(np.float32)
    matmul.weights_moved()
    assert lib.tokensteer_matmul_prepare(matmul.TYPES[kind], buf.ctypes.data, 20, 256) == 1  # panels for this type
    out = np.empty((3, 20), np.float32)
    lib.tokensteer_matmul_slice(matmul.TYPES[kind], buf.ctypes.data, 20, 256, x.ctypes.data, 3, 256, out.ctypes.data, 20, 0, 1)
    assert np.allclose(out, reference(W1, x), rtol=1e-4, atol=1e-4 * np.abs(reference(W1, x)).max())
    buf[...] = np.ascontiguousarray(second).view(np.uint8).reshape(buf.shape)
    matmul.weights_moved()
    lib.tokensteer_matmul_prepare(matmul.TYPES[kind], buf.ctypes.data, 20, 256)
    lib.tokensteer_matmul_slice(matmul.TYPES[kind], buf.ctypes.data, 20, 256, x.ctypes.data, 3, 256, out.ctypes.data, 20, 0, 1)
    assert np.allclose(out, reference(W2, x), rtol=1e-4, atol=1e-4 * np.abs(reference(W2, x)).max())

