"""The fast CPU backend: a GGUF model in llama.cpp (through llama-cpp-python's C API) behind the loop.

Every row of a session is one llama.cpp sequence id in a shared (unified) KV cache, so all rows
advance in one ``llama_decode`` call per step; logits come back as a zero-copy view of llama.cpp's
output buffer. Forking a row copies its sequence (cells are shared, nothing is recomputed) and
backtracking removes the tail of each sequence. Additive steering uses llama.cpp's control
vectors, which add one vector per layer to every row at every position.

Where the output matrix is Q8_0 and the CPU has AVX-512 VNNI or AVX2 (the bundled model here),
every session stops llama.cpp's graph after the final norm and runs the output layer in our own
kernel (``q8head``), which is faster than llama.cpp's and reads the matrix once per 4 rows. Else a
session with a row mix (a formula's weighted sum) does so through a head-only copy of the model
(``llamacpp_head``), so the 262k-row output layer runs once per mix instead of once per row, and
plain sessions keep llama.cpp's own output layer.

What this backend cannot do, and the torch backend can: read hidden states, run non-additive or
per-row residual edits, and edit the output of layer 0 (llama.cpp has no control vector there).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Callable, Sequence

import llama_cpp
import numpy as np
import torch

from tokensteer.backends import LLAMACPP_CAPABILITIES
from tokensteer.backends.base import Backend, Session
from tokensteer.backends.llamacpp_batch import Batch
from tokensteer.backends.llamacpp_head import Capture, Head, build_head, head_path
from tokensteer.backends.llamacpp_vocab import LlamaTokenizer
from tokensteer.backends.matmul import PREFILL_ROWS, splice_function
from tokensteer.backends.q8head import Q8Head
from tokensteer.errors import UserError
from tokensteer.hooks import ResidualEdit

DEFAULT_CTX = 4096  # KV cells shared by all rows of a session
N_BATCH = 512  # most tokens per llama_decode call (prefill chunks)
MIN_SEQS = 16  # sequence ids per context; more are made when a batch needs them
MAX_SEQS = 256  # llama.cpp's LLAMA_MAX_SEQ
TORCH_HINT = "use --backend torch (Python: backend='torch')"

_init_lock = threading.Lock()
_initialised = False


def _init_llama() -> None:
    """Initialise llama.cpp once per process and keep its log quiet unless asked."""
    global _initialised
    with _init_lock:
        if _initialised:
            return
        log = logging.getLogger("llama-cpp-python")
        if log.level == logging.NOTSET and not os.environ.get("TOKENSTEER_LLAMA_VERBOSE"):
            log.setLevel(logging.CRITICAL)
        llama_cpp.llama_backend_init()
        _initialised = True


def default_threads() -> int:
    """Threads for llama.cpp: ``$TOKENSTEER_THREADS`` or the CPUs this process may use (≤ 8)."""
    env = os.environ.get("TOKENSTEER_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise UserError(f"TOKENSTEER_THREADS must be a whole number, got {env!r}") from None
    return max(1, min(8, len(os.sched_getaffinity(0))))


class _Context:
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


def _free_all(model, contexts: list[_Context], heads: list[Head]) -> None:
    for c in contexts:
        c.free()
    for h in heads:
        h.free()
    if model:
        llama_cpp.llama_model_free(model)


class LlamaCppBackend(Backend):
    """A GGUF model in llama.cpp: fast batched decoding with additive steering."""

    name = "llamacpp"
    capabilities = LLAMACPP_CAPABILITIES

    def __init__(self, model, model_name: str, n_threads: int, n_ctx: int, path: Path | None = None) -> None:
        self.model = model
        self.model_name = model_name
        self.path = path
        self._head: Head | Q8Head | None | bool = None  # the mixing head: None untried, False unusable
        self._q8: Q8Head | None | bool = None  # our output kernel: None untried, False unusable
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.tokenizer = LlamaTokenizer(self.vocab, owner=self)
        self.n_layers = int(llama_cpp.llama_model_n_layer(model))
        self.hidden_size = int(llama_cpp.llama_model_n_embd(model))
        self.n_vocab = self.tokenizer.vocab_size
        self.n_threads, self.n_ctx = n_threads, n_ctx
        self._lock = threading.Lock()
        self._all: list[_Context] = []
        self._idle: list[_Context] = []
        self._heads: list[Head | Q8Head] = []
        self._finalizer = weakref.finalize(self, _free_all, model, self._all, self._heads)
        self._splice: int | None = None  # our kernels for the blocks' matrix products (``matmul``)
        fn = splice_function()
        if fn is not None and self._splice_reproduces_logits(fn):
            self._splice = fn
        first = self._acquire(1)  # make the first context now, not on the first request
        self.context_length = first.n_ctx  # rows of one session share these cells
        self.context_hint = " or set TOKENSTEER_N_CTX higher"
        self._release(first)

    @classmethod
    def load(cls, path: Path, model_name: str | None = None, n_threads: int | None = None, n_ctx: int | None = None) -> "LlamaCppBackend":
        """Load a GGUF file; ``n_ctx`` (default ``$TOKENSTEER_N_CTX`` or 4096) KV cells per session."""
        _init_llama()
        if n_ctx is None:
            env = os.environ.get("TOKENSTEER_N_CTX", str(DEFAULT_CTX))
            if not env.isdigit() or int(env) < 64:
                raise UserError(f"TOKENSTEER_N_CTX must be a whole number ≥ 64, got {env!r}")
            n_ctx = int(env)
        params = llama_cpp.llama_model_default_params()
        # Weights stay in the plain CPU buffer: no AMX (whose kernels crash on Q4_K, llama.cpp #20824)
        # and no repacking, whose 4-column kernels give a row different logits (by up to 1.2) when it
        # shares a decode call with 3 others. Without it, batched rows are bit-identical to one row
        # at a time; repacking would make a 4-row body only ~12 % cheaper on this CPU.
        params.use_extra_bufts = False
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise UserError(
                f"llama.cpp cannot load {path}: the file is corrupt or its architecture is not supported "
                f"by llama-cpp-python {llama_cpp.__version__}; try --backend torch"
            )
        return cls(model, model_name or Path(path).name, n_threads or default_threads(), n_ctx, Path(path))

    def close(self) -> None:
        """Free the model and its contexts now instead of at garbage collection."""
        self._finalizer()

    @property
    def is_open(self) -> bool:
        """False once ``close`` has freed the model."""
        return self._finalizer.alive

    def _acquire(self, n_rows: int, capture: bool = False) -> _Context:
        if not self.is_open:
            raise UserError("this llama.cpp model was closed; load it again")
        if n_rows > MAX_SEQS // 2:
            raise UserError(f"the llamacpp backend decodes at most {MAX_SEQS // 2} rows at once; this batch has {n_rows}")
        with self._lock:
            for i, c in enumerate(self._idle):
                if c.n_seq >= 2 * n_rows and c.captures == capture:  # spare ids for rows that select() duplicates
                    return self._idle.pop(i)
        c = _Context(self.model, self.n_ctx, min(MAX_SEQS, max(MIN_SEQS, 2 * n_rows)), self.n_threads, capture, self._splice)
        with self._lock:
            self._all.append(c)
        return c

    def _release(self, c: _Context) -> None:
        c.reset()
        with self._lock:
            self._idle.append(c)
            while len(self._idle) > 2:  # keep a couple of warm contexts, free the rest
                old = self._idle.pop(0)
                self._all.remove(old)
                old.free()

    def unsupported(self, edits: Sequence[ResidualEdit]) -> str | None:
        for e in edits:
            if e.fn is not None:
                return f"the llamacpp backend can only add a vector to the residual stream, not run a function on it; {TORCH_HINT}"
            if e.vector.dim() != 1:
                return f"the llamacpp backend adds the same vector to every row (llama.cpp control vectors are per context); per-row edits need the torch backend: {TORCH_HINT}"
            if e.vector.shape[0] != self.hidden_size:
                return f"a steering vector of size {e.vector.shape[0]} does not fit hidden size {self.hidden_size}"
            if not 1 <= e.layer < self.n_layers:
                if e.layer == 0:
                    return f"llama.cpp control vectors start at layer 1, so layer 0 cannot be steered on the llamacpp backend; {TORCH_HINT}"
                return f"layer {e.layer} is out of range: this model has layers 0–{self.n_layers - 1}"
        return None

    def session(
        self, edits: Sequence[ResidualEdit] = (), rollback: bool = False, mix: torch.Tensor | None = None
    ) -> "LlamaSession":
        why = self.unsupported(edits)
        if why:
            raise UserError(why)
        return LlamaSession(self, edits, mix)

    def head(self) -> Head | Q8Head | None:
        """The output layer that runs mixed rows: our kernel (``plain_head``), else the head-only
        model (built into the cache on first use); each checked against the model's own logits.
        None where neither reproduces them: sessions then mix the full logits."""
        q8 = self.plain_head()
        with self._lock:
            if self._head is None:
                self._head = q8 or self._open_head() or False
            return self._head or None

    def plain_head(self) -> Q8Head | None:
        """Our output kernel for this model, which every session uses in place of llama.cpp's
        output layer; None where it cannot run (see ``q8head``) or does not reproduce the logits."""
        with self._lock:
            if self._q8 is None:
                self._q8 = self._open_q8() or False
            return self._q8 or None

    def _open_q8(self) -> Q8Head | None:
        return self._checked(lambda: Q8Head(self.path, self.n_threads))

    def _open_head(self) -> Head | None:
        from tokensteer.models import home

        def make() -> Head:
            dst = head_path(self.path, home() / "heads")
            if not dst.exists():
                build_head(self.path, dst)
            return Head(dst, self.n_threads, self._rms_eps())

        return self._checked(make)

    def _checked(self, make: Callable[[], Head | Q8Head]) -> Head | Q8Head | None:
        """The output layer ``make()`` builds from this model's file, kept (and freed with the model)
        when it reproduces the model's own logits; None when it cannot be built or does not."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            head = make()
        except (ValueError, OSError, KeyError):
            return None
        if not self._head_reproduces_logits(head):
            head.free()
            return None
        self._heads.append(head)
        return head

    def _rms_eps(self) -> float:
        buf = ctypes.create_string_buffer(64)
        arch = buf.value.decode() if llama_cpp.llama_model_meta_val_str(self.model, b"general.architecture", buf, 64) > 0 else ""
        key = f"{arch}.attention.layer_norm_rms_epsilon".encode()
        return float(buf.value) if llama_cpp.llama_model_meta_val_str(self.model, key, buf, 64) > 0 else 1e-6

    @property
    def splices(self) -> bool:
        """True when our kernels run the blocks' matrix products (see ``matmul``)."""
        return self._splice is not None

    def _splice_reproduces_logits(self, fn: int) -> bool:
        """Run a probe text with llama.cpp's matrix kernels and with ours: the same next tokens at
        nearly every position, and logits within 10 % of their range (activations are rounded to
        8 bits in both, a little differently)."""
        ids = self.tokenizer.encode("The lighthouse keeper climbed the stairs one last time, and the sea")[:32]
        theirs, ours = self._all_logits(ids, None), self._all_logits(ids, fn)
        if theirs is None or ours is None:
            return False
        agree = float(np.mean(ours.argmax(1) == theirs.argmax(1)))
        return agree >= 0.8 and float(np.abs(ours - theirs).max()) <= 0.1 * max(1.0, float(np.ptp(theirs)))

    def _all_logits(self, ids: Sequence[int], splice: int | None) -> np.ndarray | None:
        """[n, V] logits of every position of ``ids`` (at most 256) decoded at once in a fresh
        context, with our block kernels spliced in when ``splice`` is set; None if llama.cpp fails."""
        c = _Context(self.model, 256, 1, self.n_threads, splice=splice)
        try:
            if c.capture is not None:
                c.capture.limit(len(ids))
            n, b = len(ids), c.batch
            b.token[:n], b.pos[:n], b.seq[:n], b.logits[:n] = ids, np.arange(n), 0, 1
            b.c.n_tokens = n
            if llama_cpp.llama_decode(c.ptr, b.c) != 0:
                return None
            addr = ctypes.cast(llama_cpp.llama_get_logits(c.ptr), ctypes.c_void_p).value
            return np.ctypeslib.as_array((ctypes.c_float * (n * self.n_vocab)).from_address(addr)).reshape(n, -1).copy()
        finally:
            c.free()

    def _head_reproduces_logits(self, head: Head | Q8Head) -> bool:
        """Run a probe text through the model twice, whole and stopped at the final norm + head."""
        c = _Context(self.model, 64, 1, self.n_threads, capture=True)
        try:
            ids = np.asarray(self.tokenizer.encode("The lighthouse keeper climbed the stairs and"), np.int32)[:32]
            n, b = len(ids), c.batch
            b.token[:n], b.pos[:n], b.seq[:n], b.logits[:n] = ids, np.arange(n), 0, 0
            b.logits[n - 1] = 1
            b.c.n_tokens = n
            if llama_cpp.llama_decode(c.ptr, b.c) != 0:
                return False
            addr = ctypes.cast(llama_cpp.llama_get_logits(c.ptr), ctypes.c_void_p).value
            full = np.ctypeslib.as_array((ctypes.c_float * self.n_vocab).from_address(addr)).copy()
            llama_cpp.llama_memory_clear(c.mem, False)
            c.capture.arm()
            rc = llama_cpp.llama_decode(c.ptr, b.c)
            c.capture.disarm()
            if rc != 0 or c.capture.h is None or c.capture.h.size != self.hidden_size or head.n_vocab != self.n_vocab:
                return False
            got = head.logits(c.capture.h.reshape(1, -1))[0]
        finally:
            c.free()
        return int(got.argmax()) == int(full.argmax()) and float(np.abs(got - full).max()) <= 0.02 * max(1.0, float(np.abs(full).max()))

    def hidden_states(self, texts: Sequence[str], layers: Sequence[int]) -> list[torch.Tensor]:
        raise UserError(f"the llamacpp backend cannot read hidden states (needed to train steering vectors and probes); {TORCH_HINT}")


def _control_vector(b: LlamaCppBackend, edits: list[ResidualEdit]) -> tuple[np.ndarray, int, int] | None:
    """Sum additive edits into llama.cpp's control-vector layout: layers 1..L-1, one row each."""
    if not edits:
        return None
    H = b.hidden_size
    buf = np.zeros((b.n_layers - 1) * H, np.float32)
    for e in edits:
        buf[(e.layer - 1) * H : e.layer * H] += e.vector.detach().float().cpu().numpy()
    layers = [e.layer for e in edits]
    return buf, min(layers), max(layers)


class LlamaSession(Session):
    """The rows of one generate call: one sequence id each in a context taken from the backend's pool."""

    def __init__(self, backend: LlamaCppBackend, edits: Sequence[ResidualEdit], mix: torch.Tensor | None = None) -> None:
        self.b = backend
        self.c: _Context | None = None
        self.mix = None if mix is None else mix.detach().float().numpy()  # [R', R] (see Session)
        # the output layer run after a captured final norm; None: llama.cpp's own (mixing full logits)
        self.head = backend.head() if mix is not None else backend.plain_head()
        self._out: np.ndarray | None = None  # plain sessions' logits buffer, reused every step
        self.seqs = np.zeros(0, np.int32)  # sequence id of each row
        self.pos = np.zeros(0, np.int32)  # next position of each row
        self.cvecs = {
            "prefill": _control_vector(backend, [e for e in edits if e.positions in ("all", "prompt")]),
            "decode": _control_vector(backend, [e for e in edits if e.positions in ("all", "generated")]),
        }
        self._phase: str | None = None
        self._view: tuple[int, int, torch.Tensor] | None = None  # (address, rows, tensor)

    def _set_phase(self, phase: str) -> None:
        if phase == self._phase:
            return
        if self._phase is None or self.cvecs[phase] is not self.cvecs[self._phase]:
            cv, c = self.cvecs[phase], self.c
            if cv is None:
                if c.cvec_on:
                    llama_cpp.llama_set_adapter_cvec(c.ptr, None, 0, 0, -1, -1)
            else:
                buf, lo, hi = cv
                data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                if llama_cpp.llama_set_adapter_cvec(c.ptr, data, buf.size, self.b.hidden_size, lo, hi) != 0:
                    raise RuntimeError("llama.cpp rejected the control vector")
            c.cvec_on = cv is not None
        self._phase = phase

    def _full(self) -> UserError:
        return UserError(
            f"the llama.cpp context is full ({self.c.n_ctx} tokens shared by all rows); "
            "set TOKENSTEER_N_CTX higher, or shorten the prompt or --max-tokens"
        )

    def _decode(self, n: int, capture: bool = False, prefill: bool = False) -> None:
        """Decode the batch's first n tokens; with ``capture``, stop after the final norm (``_hidden``).
        Our matrix kernels (``matmul``) run every step and short prefills: at every row count, so
        a row's step is the same in any batch, but past ``PREFILL_ROWS`` tokens of one prompt
        llama.cpp's own kernels are faster (a prompt is prefilled alone, so it is still the same
        prompt in any batch)."""
        batch = self.c.batch
        batch.c.n_tokens = n
        if self.c.capture is not None:
            self.c.capture.limit(PREFILL_ROWS if prefill else n)
        if capture:
            self.c.capture.arm()
        try:
            rc = llama_cpp.llama_decode(self.c.ptr, batch.c)
        finally:
            if capture:
                self.c.capture.disarm()
        if rc == 1:
            raise self._full()
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def _hidden(self, n: int) -> np.ndarray:
        """The [n, H] final normalised hidden states of the last (captured) decode, in batch order."""
        h = self.c.capture.h
        if h is None or h.size != n * self.b.hidden_size:
            raise RuntimeError("llama.cpp did not stop at the final norm of this model")
        return h.reshape(n, -1)

    def _mix_rows(self, x: np.ndarray) -> np.ndarray:
        """[G * R, ...] rows -> [G * R', ...]: each group of R rows replaced by the mix's combinations."""
        if self.mix is None:
            return x
        R = self.mix.shape[1]
        return np.einsum("or,gr...->go...", self.mix, x.reshape(-1, R, *x.shape[1:])).reshape(-1, *x.shape[1:])

    def _mixed(self, h: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Logits of the mixed rows of final hidden states ``h`` [N, H], through the head model."""
        u = self._mix_rows(np.asarray(h, np.float32))
        return torch.from_numpy(self.head.logits(np.ascontiguousarray(u, np.float32)))

    def _mix_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Without the head model: mix the full logits (the same result, no saving)."""
        if self.mix is None:
            return logits
        return torch.from_numpy(self._mix_rows(logits.numpy()).astype(np.float32))

    def _logits(self, n: int) -> np.ndarray:
        """The [n, V] logits of the last decode, in batch order, viewed in place (no copy)."""
        addr = ctypes.cast(llama_cpp.llama_get_logits(self.c.ptr), ctypes.c_void_p).value
        if not addr:
            raise RuntimeError("llama.cpp returned no logits")
        return np.ctypeslib.as_array((ctypes.c_float * (n * self.b.n_vocab)).from_address(addr)).reshape(n, -1)

    def prefill(self, rows: list[list[int]]) -> torch.Tensor:
        if not rows or any(len(r) == 0 for r in rows):
            raise UserError("every prompt needs at least one token")
        if self.c is None:
            self.c = self.b._acquire(len(rows), capture=self.head is not None)
        else:
            self.c.reset()
            self._phase = None
        self._set_phase("prefill")
        if sum(len(r) for r in {tuple(r) for r in rows}) > self.c.n_ctx:
            raise self._full()
        if len(rows) > self.c.n_batch:
            raise UserError(f"{len(rows)} rows do not fit one llama.cpp batch of {self.c.n_batch}; set TOKENSTEER_N_CTX higher")
        n = len(rows)
        self.seqs = np.arange(n, dtype=np.int32)
        capture = self.head is not None
        out = torch.empty(n, self.b.hidden_size if capture else self.b.n_vocab)
        batch, batch_size = self.c.batch, self.c.n_batch
        # One row per call: llama.cpp's matmul kernels change with the number of tokens in a call,
        # so a row prefilled alone gets exactly the cache (and logits) it gets in any batch.
        first: dict[tuple[int, ...], int] = {}
        for i, r in enumerate(rows):
            j = first.setdefault(tuple(r), i)
            if j != i:  # the same tokens as an earlier row: share its cache cells
                llama_cpp.llama_memory_seq_cp(self.c.mem, j, i, -1, -1)
                out[i] = out[j]
                continue
            tokens = np.asarray(r, np.int32)
            for start in range(0, len(tokens), batch_size):
                k = len(tokens[start : start + batch_size])
                batch.token[:k] = tokens[start : start + k]
                batch.pos[:k] = np.arange(start, start + k, dtype=np.int32)
                batch.seq[:k] = i
                batch.logits[:k] = 0
                batch.logits[k - 1] = start + k == len(tokens)
                self._decode(k, capture and start + k == len(tokens), prefill=True)
            out[i] = torch.from_numpy(self._hidden(1)[0] if capture else self._logits(1)[0])
        self.pos = np.array([len(r) for r in rows], np.int32)
        return self._mixed(out) if capture else self._mix_logits(out)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        n = len(self.seqs)
        if tokens.shape[0] != n:
            raise ValueError(f"step got {tokens.shape[0]} tokens for {n} rows")
        self._set_phase("decode")
        batch = self.c.batch
        batch.token[:n] = tokens.numpy()
        batch.pos[:n] = self.pos
        batch.seq[:n] = self.seqs
        batch.logits[:n] = 1
        self._decode(n, self.head is not None)
        self.pos += 1
        if self.head is not None and self.mix is None:  # our output kernel into a reused buffer
            if self._out is None or self._out.shape[0] != n:
                self._out = np.empty((n, self.b.n_vocab), np.float32)
            return torch.from_numpy(self.head.logits(self._hidden(n), self._out))
        if self.head is not None:
            return self._mixed(self._hidden(n))
        if self.mix is not None:
            return self._mix_logits(torch.from_numpy(self._logits(n)))
        addr = ctypes.cast(llama_cpp.llama_get_logits(self.c.ptr), ctypes.c_void_p).value
        if self._view is None or self._view[:2] != (addr, n):  # llama.cpp reuses its buffer: keep the view
            self._view = (addr, n, torch.from_numpy(self._logits(n)))
        return self._view[2]

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """k tokens per row in one llama_decode call: [N, k] -> [N, k, V] logits (a copy)."""
        n, k = tokens.shape
        if n != len(self.seqs):
            raise ValueError(f"extend got {n} rows of tokens for {len(self.seqs)} rows")
        if n * k > self.c.n_batch:  # more than one batch holds: step instead
            return super().extend(tokens)
        self._set_phase("decode")
        # Position by position, every row each time: the cells land in the order k steps would put
        # them, so a later trim frees the newest cells of every row (with row-major batches a row's
        # next token went to a cell before its older ones; its logits then drifted by up to 0.8).
        # llama.cpp's kernels depend on the tokens per call, so logits match k steps closely
        # (KL ~0.005 on Gemma 3 270M Q4_K_M), not bit for bit.
        batch, m = self.c.batch, n * k
        batch.token[:m] = tokens.numpy().astype(np.int32).T.reshape(-1)
        batch.pos[:m] = (self.pos[None, :] + np.arange(k, dtype=np.int32)[:, None]).reshape(-1)
        batch.seq[:m] = np.tile(self.seqs, k)
        batch.logits[:m] = 1
        capture = self.head is not None
        self._decode(m, capture)
        self.pos += k
        if capture:  # position-major [k * n, H] -> k mixed blocks through the head at once
            out = self._mixed(self._hidden(m))
        else:
            out = self._mix_logits(torch.from_numpy(self._logits(m).copy()))
        return out.view(k, out.shape[0] // k, -1).transpose(0, 1).contiguous()

    def trim(self, n: int) -> None:
        if n <= 0:
            return
        if n > int(self.pos.min()):
            raise ValueError(f"cannot trim {n} tokens from a row of {int(self.pos.min())}")
        self.pos -= n
        for s, p in zip(self.seqs.tolist(), self.pos.tolist()):
            llama_cpp.llama_memory_seq_rm(self.c.mem, s, p, -1)

    def select(self, rows: Sequence[int]) -> None:
        rows = [int(r) for r in rows]
        old = self.seqs.tolist()
        kept = set()
        new: list[int] = []
        for r in rows:
            s = old[r]
            if s in kept:  # a duplicate: fork the sequence into a free id (cells are shared)
                s = next(i for i in range(self.c.n_seq) if i not in kept and i not in old)
                llama_cpp.llama_memory_seq_cp(self.c.mem, old[r], s, -1, -1)
            kept.add(s)
            new.append(s)
        for s in set(old) - kept:
            llama_cpp.llama_memory_seq_rm(self.c.mem, s, -1, -1)
        self.seqs = np.array(new, np.int32)
        self.pos = self.pos[rows]

    def close(self) -> None:
        if self.c is not None:
            self._view = None
            self.b._release(self.c)
            self.c = None
