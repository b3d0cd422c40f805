"""The output layer alone, as a second llama.cpp model, so mixed rows pay for it once.

A formula that reads its same-model terms only as Σ wᵢ·log pᵢ needs the logits of Σ wᵢ·hᵢ (the
output layer is linear; see ``Session`` ``mix``). llama.cpp has no call that runs just the output
layer, so a mixing session stops the model's graph once ``result_norm`` (the final normalised
hidden state) is computed, through an eval callback, and hands the mixed rows to a model built
from the same GGUF file: one layer whose weights are all zero (the residual stream passes through
it unchanged), the final norm's weight set to one, and the original output matrix with its own
quantisation, so the mixed row goes through the kernel the model's rows use. That model reads
embeddings; its RMS norm divides by rms(u), which ``Head.logits`` multiplies back.

A probe at first use checks that the head reproduces the model's own logits. When it does not (an
architecture whose final norm or input path differs), sessions mix the full logits instead: the
same result, without the saving.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from tokensteer.backends.llamacpp_batch import Batch
from tokensteer.errors import UserError
from tokensteer.models import drop_written_pages

ROWS = 64  # mixed rows per head call (llama.cpp sizes its logits buffers by this)
STOP_AFTER = b"result_norm"  # llama.cpp's name for the final norm's output in every model graph

_ggml = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
_ggml.ggml_get_name.restype, _ggml.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
_ggml.ggml_nelements.restype, _ggml.ggml_nelements.argtypes = ctypes.c_int64, [ctypes.c_void_p]
_ggml.ggml_get_data_f32.restype = ctypes.POINTER(ctypes.c_float)
_ggml.ggml_get_data_f32.argtypes = [ctypes.c_void_p]
_ggml.ggml_is_contiguous.restype, _ggml.ggml_is_contiguous.argtypes = ctypes.c_bool, [ctypes.c_void_p]


class _CaptureState(ctypes.Structure):
    """The C callback's state (``capture_state`` in native/evalstop.c)."""

    _fields_ = [("on", ctypes.c_int32), ("status", ctypes.c_int32), ("n", ctypes.c_int64), ("cap", ctypes.c_int64),
                ("dst", ctypes.POINTER(ctypes.c_float)), ("splice", ctypes.c_void_p), ("max_rows", ctypes.c_int64)]


class Capture:
    """An eval callback for a context: while armed, copy ``result_norm`` and stop the graph there
    (llama.cpp then skips the output layer); while not, ask for no node, so decoding runs as usual.

    llama.cpp calls it for every node of every step, so it runs as a small C function when one can
    be compiled (``native``), else as the Python ``_call`` below, which does the same. The C one
    also offers every node to ``splice`` (``matmul.splice_function``), which runs the blocks'
    matrix products of at most ``limit`` rows in our own kernels.
    """

    def __init__(self, room: int, splice: int | None = None) -> None:
        from tokensteer.backends.native import library

        self.on = False
        self.h: np.ndarray | None = None  # [n_outputs * n_embd] float32 of the last capture
        lib = library("evalstop", Path(_ggml._name).parent, Path(_ggml._name).name)
        self.native = lib is not None
        if self.native:
            self._buf = np.empty(room, np.float32)  # room: floats of the largest result_norm
            self._state = _CaptureState(0, 0, 0, room, self._buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), splice, 0)
            self.cfunc = ctypes.cast(lib.tokensteer_capture, llama_cpp.ggml_backend_sched_eval_callback)
            self.user_data = ctypes.cast(ctypes.pointer(self._state), ctypes.c_void_p)
        else:
            self.cfunc = llama_cpp.ggml_backend_sched_eval_callback(self._call)
            self.user_data = None

    def limit(self, rows: int) -> None:
        """Splice matrix products of at most ``rows`` rows (tokens) in the next decodes."""
        if self.native:
            self._state.max_rows = rows

    def arm(self) -> None:
        self.on, self.h = True, None
        if self.native:
            self._state.on, self._state.status, self._state.n = 1, 0, 0

    def disarm(self) -> None:
        """Stop capturing; ``h`` keeps what the last armed decode copied (None if nothing)."""
        self.on = False
        if self.native:
            self._state.on = 0
            self.h = self._buf[: self._state.n].copy() if self._state.status == 1 else None

    def _call(self, t, ask, _user) -> bool:
        if not self.on:
            return False if ask else True
        name = _ggml.ggml_get_name(t)
        if ask:
            return name == STOP_AFTER
        if name != STOP_AFTER:
            return True
        if ctypes.c_int.from_address(t).value == 0 and _ggml.ggml_is_contiguous(t):  # type (first field) F32
            n = int(_ggml.ggml_nelements(t))
            self.h = np.ctypeslib.as_array(_ggml.ggml_get_data_f32(t), (n,)).copy()
            return False  # stop: the output layer is not needed
        return True  # an odd layout: let the graph finish (no capture, the logits stay valid)


def head_path(src: Path, cache: Path) -> Path:
    """Where the head model of ``src`` is kept: named by the file's path, size and time."""
    st = src.stat()
    key = hashlib.sha1(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache / f"{src.stem}.head-{key}.gguf"


_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


class _Reader:
    """Just enough of the GGUF layout to walk it (the ``gguf`` package's reader takes ~30 s to
    parse a 262k-token vocabulary into Python objects; we only need to copy those bytes)."""

    def __init__(self, buf, off: int = 0) -> None:
        self.buf, self.off = buf, off

    def uint(self, n: int) -> int:
        v = int.from_bytes(self.buf[self.off : self.off + n], "little")
        self.off += n
        return v

    def string(self) -> bytes:
        n = self.uint(8)
        self.off += n
        return bytes(self.buf[self.off - n : self.off])

    def skip_value(self, vtype: int) -> None:
        if vtype == _STRING:
            n = self.uint(8)  # (not ``self.off += self.uint(8)``: that adds to the offset before the read)
            self.off += n
        elif vtype == _ARRAY:
            etype, count = self.uint(4), self.uint(8)
            if etype in _SCALAR:
                self.off += _SCALAR[etype] * count
            else:
                for _ in range(count):
                    self.skip_value(etype)
        else:
            self.off += _SCALAR[vtype]


@dataclass
class Layout:
    """Where things are in a GGUF file: the metadata bytes, the block count's value, and each
    tensor as (name, dims, ggml type, first byte, byte count)."""

    n_kv: int
    kv: range
    block_count: tuple[int, int] | None  # (offset, width) of its value
    align: int
    tensors: list[tuple[str, list[int], int, int, int]]


def layout(buf) -> Layout:
    """Walk a GGUF file's header (``buf``: bytes or an mmap). Raises ValueError on anything else."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        r = _Reader(buf)
        if bytes(buf[:4]) != b"GGUF" or not 2 <= int.from_bytes(buf[4:8], "little") <= 3:
            raise ValueError("not a GGUF v2/v3 file")
        r.off = 8
        n_tensors, n_kv = r.uint(8), r.uint(8)
        kv_start, patch, align = r.off, None, 32
        for _ in range(n_kv):
            key, vtype = r.string(), r.uint(4)
            if key.endswith(b".block_count") and vtype in (4, 5, 10, 11):
                patch = (r.off, _SCALAR[vtype])
            if key == b"general.alignment" and vtype == 4:
                align = int.from_bytes(buf[r.off : r.off + 4], "little")
            r.skip_value(vtype)
        kv = range(kv_start, r.off)
        infos = []
        for _ in range(n_tensors):
            name, nd = r.string(), r.uint(4)
            dims = [r.uint(8) for _ in range(nd)]
            infos.append((name.decode(), dims, r.uint(4), r.uint(8)))
        data = -(-r.off // align) * align
        tensors = []
        for name, dims, ttype, offset in infos:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            tensors.append((name, dims, ttype, data + offset, math.prod(dims) // block * size))
    except (IndexError, ValueError, KeyError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the file as GGUF: {e}") from None
    return Layout(n_kv, kv, patch, align, tensors)


def read_tensor(path: Path, name: str) -> tuple[int, list[int], bytes]:
    """One tensor of a GGUF file: its ggml type, dims (row length first) and raw bytes."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for t_name, dims, ttype, start, n in layout(buf).tensors:
            if t_name == name:
                return ttype, dims, buf[start : start + n]
    raise KeyError(name)


def build_head(src: Path, dst: Path) -> None:
    """Write the head model of the GGUF file ``src`` to ``dst`` (atomically): its metadata with one
    block, that block's matrices zero, the final norm's weight one, the output matrix and any
    other tensor copied (the input embedding too when it doubles as the output matrix).
    Raises ValueError when the file has no RMS-normed output layer to copy."""
    import mmap

    from gguf import GGMLQuantizationType

    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        lay = layout(buf)
        if lay.block_count is None:
            raise ValueError("no block count")
        kv = bytearray(buf[lay.kv.start : lay.kv.stop])
        pos, width = lay.block_count[0] - lay.kv.start, lay.block_count[1]
        kv[pos : pos + width] = (1).to_bytes(width, "little")
        n_kv, align = lay.n_kv, lay.align
        names = {t[0] for t in lay.tensors}
        if "output_norm.weight" not in names or "output_norm.bias" in names or not any(n.startswith("blk.0.") for n in names):
            raise ValueError("no RMS-normed output layer")
        q4 = int(GGMLQuantizationType.Q4_0)
        out: list[tuple[str, list[int], int, bytes | range]] = []  # data, or the source bytes to copy
        untied = "output.weight" in names  # then the input embedding is never read (rows come as embeddings)
        for name, dims, ttype, first, size in lay.tensors:
            count = math.prod(dims)
            if name.startswith("blk.") and not name.startswith("blk.0."):
                continue
            if name.startswith("blk.") or (untied and name == "token_embd.weight"):
                if len(dims) >= 2 and dims[0] % 32 == 0:  # a zero matrix, as small as it gets
                    out.append((name, dims, q4, bytes(count // 32 * 18)))
                else:
                    out.append((name, dims, 0, bytes(4 * count)))  # F32 zeros
            elif name == "output_norm.weight":
                out.append((name, dims, 0, np.ones(count, np.float32).tobytes()))
            else:
                out.append((name, dims, ttype, range(first, first + size)))

        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as w:
                w.write(b"GGUF" + (3).to_bytes(4, "little") + len(out).to_bytes(8, "little") + n_kv.to_bytes(8, "little"))
                w.write(kv)
                offset = 0
                for name, dims, ttype, data in out:
                    raw = name.encode()
                    w.write(len(raw).to_bytes(8, "little") + raw + len(dims).to_bytes(4, "little"))
                    w.write(b"".join(d.to_bytes(8, "little") for d in dims) + ttype.to_bytes(4, "little") + offset.to_bytes(8, "little"))
                    offset += -(-len(data) // align) * align
                w.write(bytes(-w.tell() % align))
                for _, _, _, data in out:
                    if isinstance(data, range):  # copied from the source in 16 MB pieces
                        for i in range(data.start, data.stop, 1 << 24):
                            w.write(buf[i : min(data.stop, i + (1 << 24))])
                    else:
                        w.write(data)
                    w.write(bytes(-len(data) % align))
            drop_written_pages(tmp)  # the output layer then streams ~20 % faster
            os.chmod(tmp, 0o644)
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


class Head:
    """The head model of one GGUF file: ``logits(u)`` is the output layer applied to rows ``u``."""

    def __init__(self, path: Path, n_threads: int, eps: float) -> None:
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = False  # the same plain kernels as the model itself
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise ValueError(f"llama.cpp cannot load {path}")
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = p.n_batch = p.n_ubatch = ROWS
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = n_threads
        p.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, p)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise UserError("llama.cpp could not create a context for the output layer (out of memory?)")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.width = int(llama_cpp.llama_model_n_embd(self.model))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model)))
        self.eps = eps
        self.batch = Batch(ROWS, self.width)
        self.batch.pos[:] = np.arange(ROWS)  # every call starts from an empty cache: rows at 0..k-1
        self.batch.logits[:] = 1
        self.lock = threading.Lock()

    def logits(self, u: np.ndarray) -> np.ndarray:
        """[n, V] float32 logits of the rows ``u`` [n, width] (a copy)."""
        out = np.empty((u.shape[0], self.n_vocab), np.float32)
        scale = np.sqrt(np.square(u, dtype=np.float64).mean(-1) + self.eps).astype(np.float32)
        with self.lock:
            for start in range(0, u.shape[0], ROWS):
                k = min(ROWS, u.shape[0] - start)
                llama_cpp.llama_memory_clear(self.mem, False)  # rows are independent: no history
                self.batch.embd[:k] = u[start : start + k]
                self.batch.c.n_tokens = k
                rc = llama_cpp.llama_decode(self.ctx, self.batch.c)
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed with code {rc} in the output layer")
                addr = ctypes.cast(llama_cpp.llama_get_logits(self.ctx), ctypes.c_void_p).value
                view = np.ctypeslib.as_array((ctypes.c_float * (k * self.n_vocab)).from_address(addr)).reshape(k, -1)
                np.multiply(view, scale[start : start + k, None], out=out[start : start + k])
        return out

    def free(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None
