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

import threading
from pathlib import Path

import llama_cpp
import numpy as np

from tokensteer.backends.llamacpp.batch import Batch
from tokensteer.backends.llamacpp.context import logits_view
from tokensteer.errors import UserError

ROWS = 64  # mixed rows per head call (llama.cpp sizes its logits buffers by this)


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

    def logits(self, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[n, V] float32 logits of the rows ``u`` [n, width], written into ``out`` when given (as ``Q8Head.logits``)."""
        if out is None:
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
                np.multiply(logits_view(self.ctx, k, self.n_vocab), scale[start : start + k, None], out=out[start : start + k])
        return out

    def free(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None
