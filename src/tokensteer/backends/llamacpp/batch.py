"""A llama_batch whose arrays are numpy arrays we own, so a step fills them without a Python loop."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np


class Batch:
    """Room for ``n`` inputs: token ids, or with ``width`` embedding rows of that width instead."""

    def __init__(self, n: int, width: int | None = None) -> None:
        self.token = np.zeros(n, np.int32)
        self.embd = np.zeros((n, width), np.float32) if width else None
        self.pos = np.zeros(n, np.int32)
        self.n_seq_id = np.ones(n, np.int32)
        self.seq = np.zeros(n, np.int32)
        self.logits = np.zeros(n, np.int8)
        p_seq = ctypes.POINTER(llama_cpp.llama_seq_id)
        self.seq_ptrs = (p_seq * n)(*(ctypes.cast(self.seq.ctypes.data + 4 * i, p_seq) for i in range(n)))
        self.c = llama_cpp.llama_batch(
            n_tokens=0,
            token=None if width else self.token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            embd=self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if width else None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self.seq_ptrs,
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
