"""The matrix products of llama.cpp's transformer blocks, run by our own kernels.

llama.cpp multiplies a quantised weight matrix by each row of a batch separately, decoding every
weight block again for every row, so a decode step costs more with every row it carries.
``native/matmul.c`` repacks each Q8_0, Q5_0, Q4_K or Q6_K matrix once into panels of 16 weight
rows (``native/panels.h``, a copy of about the matrix's size kept for the process), where one
AVX-512 VNNI instruction serves 16 weight rows and each decoded weight vector meets up to 8 rows.
It is spliced into llama.cpp's own graphs: the eval
callback (``Capture``) offers each node to ``tokensteer_splice`` before llama.cpp computes the
graph, which turns a matching product into a ggml custom op that llama.cpp's threads run in place.

A row's result never depends on the other rows of the call, so batched rows stay bit-identical to
rows decoded alone. Where the install did not build the kernel (no C compiler, no ggml headers
beside llama-cpp-python), on CPUs without AVX-512 VNNI/VBMI, or with ``TOKENSTEER_NO_NATIVE=1``,
llama.cpp keeps its own (see docs/native.md).
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np

TYPES = {"Q8_0": 8, "Q5_0": 6, "Q4_K": 12, "Q6_K": 14}  # ggml type ids the kernel takes


@cache
def kernel() -> ctypes.CDLL | None:
    """The installed kernel for this CPU and this llama.cpp, or None where there is none."""
    from tokensteer.backends.llamacpp.native import library

    lib = library("matmul")
    if lib is not None:
        f = lib.tokensteer_matmul_slice
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        lib.tokensteer_matmul_prepare.restype = ctypes.c_int
        lib.tokensteer_matmul_prepare.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    return lib


def weights_moved() -> None:
    """Tell the kernel that a model was loaded: a matrix it keeps packed is checked against the
    bytes now at its address before it is used again (a new model may sit where a freed one was)."""
    lib = kernel()
    if lib is not None:
        lib.tokensteer_weights_moved()


def splice_function() -> int | None:
    """Address of ``tokensteer_splice`` for the eval callback, or None where the kernel cannot run."""
    lib = kernel()
    return None if lib is None else ctypes.cast(lib.tokensteer_splice, ctypes.c_void_p).value


def matmul(weights: np.ndarray, type_name: str, n_out: int, x: np.ndarray, slices: int = 1) -> np.ndarray:
    """``x @ W.T`` for the GGUF-encoded matrix ``weights`` (raw bytes of ``n_out`` rows) and float
    rows ``x`` [n, n_in], computed in ``slices`` pieces of output rows as llama.cpp's threads would.
    For tests; raises ValueError for a type or shape the kernel does not take."""
    lib = kernel()
    if lib is None:
        raise ValueError("the matrix kernel is not built for this machine")
    if type_name not in TYPES:
        raise ValueError(f"the kernel takes {', '.join(TYPES)} weights, not {type_name}")
    w = np.ascontiguousarray(weights).view(np.uint8)
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty((x.shape[0], n_out), np.float32)
    weights_moved()  # a new array may sit where an earlier one was packed
    lib.tokensteer_matmul_prepare(TYPES[type_name], w.ctypes.data, n_out, x.shape[1])
    for i in range(slices):
        rc = lib.tokensteer_matmul_slice(TYPES[type_name], w.ctypes.data, n_out, x.shape[1], x.ctypes.data, x.shape[0],
                                         x.shape[1], out.ctypes.data, n_out, i, slices)
        if rc == 1:
            raise ValueError(f"rows of {x.shape[1]} {type_name} values are not a shape the kernel takes")
        if rc != 0:
            raise MemoryError("the matrix kernel could not allocate its buffers")
    return out


def geglu(a: np.ndarray, b: np.ndarray, slices: int = 1) -> np.ndarray:
    """``gelu(a) * b`` (tanh GELU) as the spliced GEGLU op computes it, in ``slices`` pieces. For tests."""
    lib = kernel()
    if lib is None:
        raise ValueError("the matrix kernel is not built for this machine")
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    if a.shape != b.shape:
        raise ValueError(f"gelu(a) * b needs arrays of one shape, got {a.shape} and {b.shape}")
    y = np.empty_like(a)
    f = lib.tokensteer_geglu_slice
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    for i in range(slices):
        f(a.ctypes.data, b.ctypes.data, y.ctypes.data, a.size, i, slices)
    return y
