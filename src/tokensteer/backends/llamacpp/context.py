"""llama.cpp set-up shared by the backend and its sessions: initialisation, threads, contexts."""

from __future__ import annotations

import logging
import os
import threading

import llama_cpp

from tokensteer.backends import env_threads
from tokensteer.backends.llamacpp.batch import Batch
from tokensteer.backends.llamacpp.capture import Capture
from tokensteer.errors import UserError

DEFAULT_CTX = 4096  # KV cells shared by all rows of a session
N_BATCH = 512  # most tokens per llama_decode call (prefill chunks)
MIN_SEQS = 16  # sequence ids per context; more are made when a batch needs them
MAX_SEQS = 256  # llama.cpp's LLAMA_MAX_SEQ
TORCH_HINT = "use --backend torch (Python: backend='torch')"

INIT_LOCK = threading.Lock()
_initialised = False


def init_llama() -> None:
    """Initialise llama.cpp once per process and keep its log quiet unless asked."""
    global _initialised
    with INIT_LOCK:
        if _initialised:
            return
        log = logging.getLogger("llama-cpp-python")
        if log.level == logging.NOTSET and not os.environ.get("TOKENSTEER_LLAMA_VERBOSE"):
            log.setLevel(logging.CRITICAL)
        llama_cpp.llama_backend_init()
        _initialised = True


def default_threads() -> int:
    """Threads for llama.cpp: ``$TOKENSTEER_THREADS`` or the CPUs this process may use (≤ 8)."""
    return env_threads() or max(1, min(8, len(os.sched_getaffinity(0))))


class CannotLoad(UserError):
    """llama.cpp cannot load this GGUF file (corrupt, or an architecture it does not know); the only
    failure ``--backend auto`` answers by trying transformers instead."""


def check_n_ctx(n_ctx: int, trained: int, model_name: str) -> None:
    """A context longer than the model was trained on only grows the KV cache (and can exhaust
    memory): refuse it, naming the setting and the most it may be."""
    if trained > 0 and n_ctx > trained:
        where = "TOKENSTEER_N_CTX" if os.environ.get("TOKENSTEER_N_CTX") else "the context length"
        raise UserError(f"{where}={n_ctx} is longer than the {trained} tokens {model_name} was trained on; set it to at most {trained}")


class Context:
    """One llama.cpp context (KV cache, control vector, batch) that one session uses at a time."""

    def __init__(self, model, n_ctx: int, n_seq: int, n_threads: int, capture: bool = False, splice: int | None = None) -> None:
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, N_BATCH, N_BATCH, n_seq
        p.n_threads = p.n_threads_batch = n_threads
        p.kv_unified = True  # rows share cells: a fork costs nothing and any row may grow long
        p.swa_full = True  # keep every cell of sliding-window layers, so backtracking stays exact
        p.no_perf = True
        # stops the graph before the output layer on demand (room for a full batch of final norms),
        # and hands the blocks' matrix products to our kernels (``matmul``) when ``splice`` is set
        self.captures = capture
        self.capture = Capture(N_BATCH * int(llama_cpp.llama_model_n_embd(model)), splice) if capture or splice else None
        if self.capture is not None:
            p.cb_eval, p.cb_eval_user_data = self.capture.cfunc, self.capture.user_data
        self.ptr = llama_cpp.llama_init_from_model(model, p)
        if not self.ptr:
            raise UserError(f"llama.cpp could not create a context of {n_ctx} tokens (out of memory?)")
        self.mem = llama_cpp.llama_get_memory(self.ptr)
        self.n_seq, self.n_ctx = n_seq, int(llama_cpp.llama_n_ctx(self.ptr))
        self.n_batch = int(llama_cpp.llama_n_batch(self.ptr))  # llama.cpp caps it at n_ctx
        self.batch = Batch(self.n_batch)
        self.cvec_on = False

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self.mem, False)
        if self.cvec_on:
            llama_cpp.llama_set_adapter_cvec(self.ptr, None, 0, 0, -1, -1)
            self.cvec_on = False

    def free(self) -> None:
        if self.ptr:
            llama_cpp.llama_free(self.ptr)
            self.ptr = None


