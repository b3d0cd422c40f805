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
(``llamacpp.head``), so the 262k-row output layer runs once per mix instead of once per row, and
plain sessions keep llama.cpp's own output layer.

What this backend cannot do, and the torch backend can: read hidden states, run non-additive or
per-row residual edits, and edit the output of layer 0 (llama.cpp has no control vector there).
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from pathlib import Path
from typing import Callable, Sequence

import llama_cpp
import numpy as np
import torch

from tokensteer.backends import LLAMACPP_CAPABILITIES, env_n_ctx
from tokensteer.backends.base import Backend
from tokensteer.backends.llamacpp.context import (
    DEFAULT_CTX, MAX_SEQS, MIN_SEQS, TORCH_HINT, CannotLoad, Context, check_n_ctx, default_cells, default_threads, init_llama,
    isolated_seqs,
)
from tokensteer.backends.llamacpp.gguf import build_head, head_path
from tokensteer.backends.llamacpp.head import Head
from tokensteer.backends.llamacpp.kernels import splice_function, weights_moved
from tokensteer.backends.llamacpp.q8head import Q8Head
from tokensteer.backends.llamacpp.scoring import continuation_nll
from tokensteer.backends.llamacpp.session import LlamaSession
from tokensteer.backends.llamacpp.vocab import LlamaTokenizer
from tokensteer.errors import UserError
from tokensteer.hooks import ResidualEdit


def _free_all(model, contexts: list[Context], heads: list[Head]) -> None:
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

    def __init__(self, model, model_name: str, n_threads: int, n_ctx: int | None, path: Path | None = None) -> None:
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
        # KV cells per context: as asked (TOKENSTEER_N_CTX), else the model's trained length, so a
        # long prompt needs no setting; such long contexts drop old sliding-window cells (see Context)
        self.n_threads, self.n_ctx = n_threads, n_ctx or default_cells(model)
        self.trained = int(llama_cpp.llama_model_n_ctx_train(model))
        self.progress: Callable[[int, int], None] | None = None  # (prompt tokens done, in all) during a prefill
        self._lock = threading.Lock()
        self._all: list[Context] = []
        self._idle: list[Context] = []
        self._heads: list[Head | Q8Head] = []
        self._finalizer = weakref.finalize(self, _free_all, model, self._all, self._heads)
        self._splice: int | None = None  # our kernels for the blocks' matrix products (``matmul``)
        fn = splice_function()
        if fn is not None and self._splice_reproduces_logits(fn):
            self._splice = fn
        first = self.acquire(1)  # make the first context now, not on the first request
        self.context_length = first.n_ctx  # rows of one session share these cells
        self.shared_cells = first.n_ctx
        if n_ctx is not None and n_ctx < self.trained:
            self.context_hint = f" or set TOKENSTEER_N_CTX higher (at most {self.trained}, the length {model_name} was trained to)"
        else:
            self.context_hint = (
                f", or shorten the prompt: {model_name} was trained to {self.trained} tokens "
                "(--backend torch --kv-select extrapolate=on reads past it)"
            )
        self.release(first)

    @classmethod
    def load(cls, path: Path, model_name: str | None = None, n_threads: int | None = None, n_ctx: int | None = None) -> "LlamaCppBackend":
        """Load a GGUF file; ``n_ctx`` (default ``$TOKENSTEER_N_CTX``, else the model's trained length) KV cells per session."""
        init_llama()
        asked = n_ctx if n_ctx is not None else env_n_ctx()  # bad settings fail before the model loads
        n_threads = n_threads or default_threads()
        params = llama_cpp.llama_model_default_params()
        # Weights stay in the plain CPU buffer: no AMX (whose kernels crash on Q4_K, llama.cpp #20824)
        # and no repacking, whose 4-column kernels give a row different logits when it shares a
        # decode call with 3 others. Without it, batched rows are bit-identical to one row at a
        # time, for a little speed that our block kernels win back.
        params.use_extra_bufts = False
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        weights_moved()
        if not model:
            raise CannotLoad(
                f"llama.cpp cannot load {path}: the file is corrupt or its architecture is not supported "
                f"by llama-cpp-python {llama_cpp.__version__}; try --backend torch"
            )
        if asked is not None:
            try:
                check_n_ctx(asked, int(llama_cpp.llama_model_n_ctx_train(model)), model_name or Path(path).name)
            except UserError:
                llama_cpp.llama_model_free(model)
                raise
        return cls(model, model_name or Path(path).name, n_threads, asked, Path(path))

    def close(self) -> None:
        """Free the model and its contexts now instead of at garbage collection (after its engine
        has stopped, so no running batch still holds a context)."""
        for engine in list(vars(self).get("engines", ())):
            engine.close()
        self._finalizer()

    @property
    def is_open(self) -> bool:
        """False once ``close`` has freed the model."""
        return self._finalizer.alive

    def acquire(self, n_rows: int, capture: bool = False, rollback: bool = False, isolated: bool = False) -> Context:
        """A context for ``n_rows`` rows: an idle one that fits, else a new one. Short contexts and
        ``rollback`` ones keep every sliding-window cell (exact ``trim`` at any depth); ``isolated``
        ones give each row a cache of its own (see ``Context``)."""
        swa_full = rollback or self.n_ctx <= DEFAULT_CTX
        if not self.is_open:
            raise UserError("this llama.cpp model was closed; load it again")
        if n_rows > MAX_SEQS // 2:
            raise UserError(f"the llamacpp backend decodes at most {MAX_SEQS // 2} rows at once; this batch has {n_rows}")
        # shared cells: spare ids for select()'s forks; isolated: compact ids, one per row
        n_seq = isolated_seqs(n_rows) if isolated else min(MAX_SEQS, max(MIN_SEQS, 2 * n_rows))
        with self._lock:
            for i, c in enumerate(self._idle):
                if c.isolated == isolated and c.captures == capture and c.swa_full == swa_full and (
                    c.n_seq == n_seq if isolated else c.n_seq >= n_seq
                ):
                    return self._idle.pop(i)
        c = Context(self.model, self.n_ctx, n_seq, self.n_threads, capture, self._splice, swa_full, isolated)
        with self._lock:
            self._all.append(c)
        return c

    def row_cells(self, capacity: int) -> int | None:
        """Cells each row may take in an isolated session of ``capacity`` rows; None where that
        would leave too few."""
        n_seq = isolated_seqs(capacity)
        cells = self.n_ctx // n_seq // 256 * 256
        return cells if n_seq <= MAX_SEQS and cells >= 256 else None

    def release(self, c: Context) -> None:
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
        self, edits: Sequence[ResidualEdit] = (), rollback: bool = False, mix: torch.Tensor | None = None,
        capacity: int | None = None, isolated: bool = False,
    ) -> "LlamaSession":
        why = self.unsupported(edits)
        if why:
            raise UserError(why)
        s = LlamaSession(self, edits, mix, capacity, isolated and not rollback and capacity is not None)
        if rollback and self.n_ctx > DEFAULT_CTX:  # a long context that trim() must roll back exactly
            s.c = self.acquire(max(capacity or 0, MIN_SEQS // 2), capture=s.head is not None, rollback=True)
        return s

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
    def generation_scores(self) -> bool:  # type: ignore[override]
        """Only with our kernels for the blocks and the output layer: llama.cpp's own products
        round differently with the rows per call (a step's one row against a prefill's many)."""
        return self.splices and self.plain_head() is not None

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
        c = Context(self.model, 256, 1, self.n_threads, splice=splice)
        try:
            n, b = len(ids), c.batch
            b.token[:n], b.pos[:n], b.seq[:n], b.logits[:n] = ids, np.arange(n), 0, 1
            b.c.n_tokens = n
            if llama_cpp.llama_decode(c.ptr, b.c) != 0:
                return None
            return c.logits(n, self.n_vocab).copy()
        finally:
            c.free()

    def _head_reproduces_logits(self, head: Head | Q8Head) -> bool:
        """Run a probe text through the model twice, whole and stopped at the final norm + head."""
        c = Context(self.model, 64, 1, self.n_threads, capture=True)
        try:
            ids = np.asarray(self.tokenizer.encode("The lighthouse keeper climbed the stairs and"), np.int32)[:32]
            n, b = len(ids), c.batch
            b.token[:n], b.pos[:n], b.seq[:n], b.logits[:n] = ids, np.arange(n), 0, 0
            b.logits[n - 1] = 1
            b.c.n_tokens = n
            if llama_cpp.llama_decode(c.ptr, b.c) != 0:
                return False
            full = c.logits(1, self.n_vocab)[0].copy()
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

    def continuation_nll(self, ctx: Sequence[Sequence[int]], cont: Sequence[Sequence[int]]) -> list[float]:
        """Packed prefills, several texts per call (``scoring``)."""
        return continuation_nll(self, ctx, cont)

    def hidden_states(self, texts: Sequence[str], layers: Sequence[int]) -> list[torch.Tensor]:
        raise UserError(f"the llamacpp backend cannot read hidden states (needed to train steering vectors and probes); {TORCH_HINT}")


