"""llama.cpp set-up shared by the backend and its sessions: initialisation, threads, contexts."""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import llama_cpp
import numpy as np

from tokensteer.backends import env_threads
from tokensteer.backends.llamacpp.batch import Batch
from tokensteer.backends.llamacpp.capture import Capture
from tokensteer.errors import UserError

DEFAULT_CTX = 4096  # KV cells shared by all rows of a session when the model does not say its trained length
KV_BUDGET = 2 << 30  # bytes of KV cache a context may take by default (every layer holding every cell)
N_BATCH = 512  # most tokens per llama_decode call (prefill chunks)
MIN_SEQS = 16  # sequence ids per context; more are made when a batch needs them
MAX_SEQS = 256  # llama.cpp's LLAMA_MAX_SEQ
TORCH_HINT = "use --backend torch (Python: backend='torch')"

INIT_LOCK = threading.Lock()
_initialised = False


def logits_address(ctx) -> int:
    """Where llama.cpp context ``ctx`` keeps its logits (0: none yet); it moves when llama.cpp
    reallocates its output buffer, so a kept view is valid while this stays the same."""
    return ctypes.cast(llama_cpp.llama_get_logits(ctx), ctypes.c_void_p).value or 0


def logits_view(ctx, n: int, n_vocab: int) -> np.ndarray:
    """The [n, V] logits of the last decode in llama.cpp context ``ctx``, in batch order, viewed in
    place (no copy: the next decode overwrites them)."""
    addr = logits_address(ctx)
    if not addr:
        raise RuntimeError("llama.cpp returned no logits")
    return np.ctypeslib.as_array((ctypes.c_float * (n * n_vocab)).from_address(addr)).reshape(n, -1)


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


def isolated_seqs(n_rows: int) -> int:
    """Sequence ids of an isolated context for ``n_rows`` rows (each id a cache of its own)."""
    return max(MIN_SEQS, 1 << max(0, n_rows - 1).bit_length())


def default_cells(model) -> int:
    """KV cells per context when none is asked for: the model's trained length, so any prompt it
    can read fits, unless that much cache would pass ``KV_BUDGET`` (a 128k-token model)."""
    trained = int(llama_cpp.llama_model_n_ctx_train(model))
    if trained <= 0:
        return DEFAULT_CTX
    head_dim = _meta_int(model, "attention.key_length") or int(llama_cpp.llama_model_n_embd(model)) // max(1, int(llama_cpp.llama_model_n_head(model)))
    per_cell = 4 * int(llama_cpp.llama_model_n_layer(model)) * head_dim * max(1, int(llama_cpp.llama_model_n_head_kv(model)))  # K, V in f16
    return max(DEFAULT_CTX, min(trained, KV_BUDGET // per_cell // 256 * 256))


def _meta_int(model, key: str) -> int | None:
    """An integer from the GGUF's ``{architecture}.{key}`` metadata, or None."""
    buf = ctypes.create_string_buffer(64)
    if llama_cpp.llama_model_meta_val_str(model, b"general.architecture", buf, 64) <= 0:
        return None
    if llama_cpp.llama_model_meta_val_str(model, f"{buf.value.decode()}.{key}".encode(), buf, 64) <= 0:
        return None
    return int(buf.value) if buf.value.isdigit() else None


class Context:
    """One llama.cpp context (KV cache, control vector, batch) that one session uses at a time.

    ``swa_full`` keeps every cell of the sliding-window layers, so backtracking (``trim``) past a
    window stays exact; without it those layers keep only their window (and a batch), so a long
    prompt costs them a window's attention instead of the whole context's.

    ``isolated`` gives every sequence id a cache of its own (``n_ctx / n_seq`` cells): a row's
    attention then reads only its own cells, in position order, whoever joins or leaves, so its
    logits do not depend on its neighbours. Otherwise rows share all cells (a fork costs nothing and
    any row may grow long), and cells freed by a leaving row may later hold another row's newer
    positions before its older ones, which changes the order of its attention sums (rounding)."""

    def __init__(
        self, model, n_ctx: int, n_seq: int, n_threads: int, capture: bool = False, splice: int | None = None,
        swa_full: bool = True, isolated: bool = False,
    ) -> None:
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, N_BATCH, N_BATCH, n_seq
        p.n_threads = p.n_threads_batch = n_threads
        p.kv_unified = not isolated
        self.isolated = isolated
        p.swa_full = swa_full
        self.swa_full = swa_full
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
        self.row_cells = int(llama_cpp.llama_n_ctx_seq(self.ptr)) if isolated else self.n_ctx  # most cells of one row
        self.n_batch = int(llama_cpp.llama_n_batch(self.ptr))  # llama.cpp caps it at n_ctx
        self.batch = Batch(self.n_batch)
        self.cvec_on = False

    def logits(self, n: int, n_vocab: int) -> np.ndarray:
        """The [n, V] logits of the last decode, in batch order, viewed in place (no copy)."""
        return logits_view(self.ptr, n, n_vocab)

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self.mem, False)
        if self.cvec_on:
            llama_cpp.llama_set_adapter_cvec(self.ptr, None, 0, 0, -1, -1)
            self.cvec_on = False

    def free(self) -> None:
        if self.ptr:
            llama_cpp.llama_free(self.ptr)
            self.ptr = None


