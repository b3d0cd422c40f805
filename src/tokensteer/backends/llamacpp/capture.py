"""An eval callback that stops llama.cpp's graph at the final norm and hands matrix products to our kernels."""

from __future__ import annotations

import ctypes
import os

import llama_cpp
import numpy as np

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
                ("dst", ctypes.POINTER(ctypes.c_float)), ("splice", ctypes.c_void_p)]


class Capture:
    """An eval callback for a context: while armed, copy ``result_norm`` and stop the graph there
    (llama.cpp then skips the output layer); while not, ask for no node, so decoding runs as usual.

    llama.cpp calls it for every node of every step, so it runs as a small C function where the
    install built one (``native``), else as the Python ``_call`` below, which does the same. The C one
    also offers every node to ``splice`` (``kernels.splice_function``), which runs the blocks'
    matrix products in our own kernels.
    """

    def __init__(self, room: int, splice: int | None = None) -> None:
        from tokensteer.backends.llamacpp.native import library

        self.on = False
        self.h: np.ndarray | None = None  # [n_outputs * n_embd] float32 of the last capture
        lib = library("evalstop")
        self.native = lib is not None
        if self.native:
            self._buf = np.empty(room, np.float32)  # room: floats of the largest result_norm
            self._state = _CaptureState(0, 0, 0, room, self._buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), splice)
            self.cfunc = ctypes.cast(lib.tokensteer_capture, llama_cpp.ggml_backend_sched_eval_callback)
            self.user_data = ctypes.cast(ctypes.pointer(self._state), ctypes.c_void_p)
        else:
            self.cfunc = llama_cpp.ggml_backend_sched_eval_callback(self._call)
            self.user_data = None

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


