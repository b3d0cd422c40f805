"""The output layer of a GGUF model whose output matrix is Q8_0, run by our own kernel.

On Gemma 3 270M that layer is the tied 262,144 x 640 Q8_0 embedding, most of the weights, and
llama.cpp's kernel runs it row by row, reading the whole matrix again for each extra row.
``native/q8head.c`` serves several rows per pass over the matrix, activations quantised as
llama.cpp quantises them, so a decoding session can stop llama.cpp's graph at the final norm
(``Capture``) and finish here: extra rows cost little, and a formula's mixed rows (``Session``
``mix``) need no second model. Its AVX-512 VNNI build and the AMX kernel (``native/q8amx.c``) first
repack the matrix once (a copy of about its size) so that one instruction serves 16 weight rows;
the AVX2 build reads the file as it is. Where the install did not build the kernel (no C compiler),
on CPUs with neither AVX-512 VNNI nor AVX2, or where the matrix is another type, ``Q8Head`` raises
ValueError and the backend keeps llama.cpp's own layer.
"""

from __future__ import annotations

import ctypes
import weakref
from functools import cache
from pathlib import Path

import numpy as np

Q8_0 = 8  # ggml's type id
LOGITS_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Give the library's functions their C types: the plain ``tokensteer_q8_0_logits`` (AVX2) or
    the packed trio ``tokensteer_q8_0_pack`` / ``_logits_packed`` / ``_free`` (VNNI, AMX)."""
    if hasattr(lib, "tokensteer_q8_0_pack"):
        lib.tokensteer_q8_0_pack.restype = ctypes.c_void_p
        lib.tokensteer_q8_0_pack.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        lib.tokensteer_q8_0_free.argtypes = [ctypes.c_void_p]
        f = lib.tokensteer_q8_0_logits_packed
    else:
        f = lib.tokensteer_q8_0_logits
    f.restype, f.argtypes = ctypes.c_int, LOGITS_ARGS
    return lib


@cache
def kernel(variant: str | None = None) -> ctypes.CDLL | None:
    """The installed kernel: the best build this CPU runs, or the named ``variant`` (``avx2``
    tests that path on an AVX-512 machine); None where there is none."""
    from tokensteer.backends.llamacpp.native import library

    lib = library("q8head", variant)
    return None if lib is None else declare(lib)


@cache
def amx_kernel() -> ctypes.CDLL | None:
    """The AMX kernel, or None where there is none (no AMX) or Linux refuses tile state."""
    from tokensteer.backends.llamacpp.native import library

    lib = library("q8amx")
    if lib is None or lib.tokensteer_amx_enable() != 0:
        return None
    return declare(lib)


class Q8Head:
    """``logits(u)``: the output matrix of one GGUF file applied to rows ``u`` (final-norm outputs)."""

    def __init__(self, path: Path, n_threads: int, amx: bool = True) -> None:
        """Raises ValueError when the file's output matrix is not a Q8_0 matrix, or the kernel is not
        built here. ``amx``: use the AMX tiles where the CPU has them."""
        import mmap

        from tokensteer.backends.llamacpp.gguf import layout

        best = kernel()
        if best is None:
            raise ValueError("the Q8_0 output kernel is not built for this machine")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            tensors = {t[0]: t[1:] for t in layout(buf).tensors}
        dims, ttype, start, size = tensors.get("output.weight") or tensors["token_embd.weight"]
        if ttype != Q8_0 or len(dims) != 2 or dims[0] % 32:
            raise ValueError("the output matrix is not Q8_0")
        self.width, self.n_vocab = int(dims[0]), int(dims[1])
        self.n_threads = n_threads
        self._w: np.memmap | None = np.memmap(path, np.uint8, mode="r", offset=start, shape=(size,))
        self._kernel: ctypes.CDLL | None = None  # the library that computes the logits
        self._packed: int | None = None  # the matrix repacked for it (C memory, freed by ``free``)
        for lib in ([amx_kernel()] if amx else []) + [best]:
            if lib is None:
                continue
            if not hasattr(lib, "tokensteer_q8_0_pack"):
                self._kernel = lib
                break
            self._packed = lib.tokensteer_q8_0_pack(self._w.ctypes.data, self.n_vocab, self.width, n_threads)
            if self._packed:
                self._kernel = lib
                self._finalizer = weakref.finalize(self, lib.tokensteer_q8_0_free, self._packed)
                break
        if self._kernel is None:
            raise ValueError("the Q8_0 output kernel could not allocate its copy of the matrix")

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
            if self._packed:
                rc = self._kernel.tokensteer_q8_0_logits_packed(self._packed, self.n_vocab, self.width, u.ctypes.data, n, out.ctypes.data, self.n_threads)
            else:
                rc = self._kernel.tokensteer_q8_0_logits(self._w.ctypes.data, self.n_vocab, self.width, u.ctypes.data, n, out.ctypes.data, self.n_threads)
            if rc != 0:
                raise MemoryError("the Q8_0 output kernel could not allocate its buffers")
        return out

    @property
    def uses_amx(self) -> bool:
        """True when the AMX tiles compute the logits."""
        return self._kernel is not None and self._kernel is amx_kernel()

    def free(self) -> None:
        self._w = None
        if self._packed:
            self._finalizer()
            self._packed = None
