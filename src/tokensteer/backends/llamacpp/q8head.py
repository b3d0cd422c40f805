"""The output layer of a GGUF model whose output matrix is Q8_0, run by our own kernel.

On Gemma 3 270M that layer is the tied 262,144 x 640 Q8_0 embedding, most of the weights, and
llama.cpp's kernel runs it row by row, reading the whole matrix again for each extra row.
``native/q8head.c`` reads the matrix once per 4 rows with AVX-512 VNNI (or AVX2) dot products,
activations quantised as llama.cpp quantises them, so a decoding session can stop llama.cpp's graph
at the final norm (``Capture``) and finish here: extra rows cost little, and a formula's mixed rows
(``Session`` ``mix``) need no second model. On CPUs with AMX, ``native/q8amx.c`` repacks the matrix
once into tiles (a copy of about its size) and one tile instruction then serves 16 rows. Where the
install did not build the kernel (no C compiler), on CPUs with neither AVX-512 VNNI nor AVX2, or
where the matrix is another type, ``Q8Head`` raises ValueError and the backend keeps llama.cpp's own
layer.
"""

from __future__ import annotations

import ctypes
import weakref
from functools import cache
from pathlib import Path

import numpy as np

Q8_0 = 8  # ggml's type id


@cache
def kernel(variant: str | None = None) -> ctypes.CDLL | None:
    """The installed kernel: the best build this CPU runs, or the named ``variant`` (``avx2``
    tests that path on an AVX-512 machine); None where there is none."""
    from tokensteer.backends.llamacpp.native import library

    lib = library("q8head", variant)
    if lib is not None:
        f = lib.tokensteer_q8_0_logits
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return lib


@cache
def amx_kernel() -> ctypes.CDLL | None:
    """The AMX kernel, or None where there is none (no AMX) or Linux refuses tile state."""
    from tokensteer.backends.llamacpp.native import library

    lib = library("q8amx")
    if lib is None or lib.tokensteer_amx_enable() != 0:
        return None
    lib.tokensteer_q8_0_pack.restype = ctypes.c_void_p
    lib.tokensteer_q8_0_pack.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    lib.tokensteer_amx_free.argtypes = [ctypes.c_void_p]
    f = lib.tokensteer_q8_0_logits_packed
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return lib


class Q8Head:
    """``logits(u)``: the output matrix of one GGUF file applied to rows ``u`` (final-norm outputs)."""

    def __init__(self, path: Path, n_threads: int, amx: bool = True) -> None:
        """Raises ValueError when the file's output matrix is not Q8_0 with rows of a multiple of 64
        values (the kernel takes blocks in pairs), or the kernel cannot be built here. ``amx``:
        use the AMX tiles where the CPU has them."""
        import mmap

        from tokensteer.backends.llamacpp.gguf import layout

        self._lib = kernel()
        if self._lib is None:
            raise ValueError("the Q8_0 output kernel is not built for this machine")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            tensors = {t[0]: t[1:] for t in layout(buf).tensors}
        dims, ttype, start, size = tensors.get("output.weight") or tensors["token_embd.weight"]
        if ttype != Q8_0 or len(dims) != 2 or dims[0] % 64:
            raise ValueError("the output matrix is not Q8_0 with rows of a multiple of 64 values")
        self.width, self.n_vocab = int(dims[0]), int(dims[1])
        self.n_threads = n_threads
        self._w: np.memmap | None = np.memmap(path, np.uint8, mode="r", offset=start, shape=(size,))
        self._amx = amx_kernel() if amx else None
        self._tiles: int | None = None  # the matrix repacked for AMX (C memory, freed by ``free``)
        if self._amx is not None:
            self._tiles = self._amx.tokensteer_q8_0_pack(self._w.ctypes.data, self.n_vocab, self.width, n_threads)
            if self._tiles:
                self._finalizer = weakref.finalize(self, self._amx.tokensteer_amx_free, self._tiles)
            else:
                self._amx = None  # out of memory: the plain kernel needs no copy

    def logits(self, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[n, V] float32 logits of rows ``u`` [n, width], written into ``out`` when given."""
        if self._w is None:
            raise RuntimeError("this output layer was freed")
        u = np.ascontiguousarray(u, np.float32)
        if u.ndim != 2 or u.shape[1] != self.width:
            raise ValueError(f"rows of {self.width} values expected, got shape {u.shape}")
        n = u.shape[0]
        if out is None:
            out = np.empty((n, self.n_vocab), np.float32)
        elif out.shape != (n, self.n_vocab) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous float32 array of shape {(n, self.n_vocab)}")
        if n:
            if self._tiles:
                rc = self._amx.tokensteer_q8_0_logits_packed(self._tiles, self.n_vocab, self.width, u.ctypes.data, n, out.ctypes.data, self.n_threads)
            else:
                rc = self._lib.tokensteer_q8_0_logits(self._w.ctypes.data, self.n_vocab, self.width, u.ctypes.data, n, out.ctypes.data, self.n_threads)
            if rc != 0:
                raise MemoryError("the Q8_0 output kernel could not allocate its buffers")
        return out

    @property
    def uses_amx(self) -> bool:
        """True when the AMX tiles compute the logits."""
        return self._tiles is not None

    def free(self) -> None:
        self._w = None
        if self._tiles:
            self._finalizer()
            self._tiles = None
