"""A llama.cpp session: the rows of one batch, one sequence id each, in a context from the backend's pool."""

from __future__ import annotations

import ctypes
import itertools
from typing import TYPE_CHECKING, Sequence

import llama_cpp
import numpy as np
import torch

from tokensteer.backends.base import Pending, Session
from tokensteer.backends.llamacpp.context import logits_address
from tokensteer.backends.rowmix import RowMix
from tokensteer.errors import UserError
from tokensteer.hooks import ResidualEdit

if TYPE_CHECKING:
    from tokensteer.backends.llamacpp.backend import LlamaCppBackend
    from tokensteer.backends.llamacpp.context import Context


def control_vector(b: LlamaCppBackend, edits: list[ResidualEdit]) -> tuple[np.ndarray, int, int] | None:
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
    """Rows of one batch, one sequence id each, in a context taken from the backend's pool."""

    def __init__(
        self, backend: LlamaCppBackend, edits: Sequence[ResidualEdit], mix: torch.Tensor | None = None,
        capacity: int | None = None, isolated: bool = False,
    ) -> None:
        self.b, self.capacity, self.isolated = backend, capacity, isolated
        self.c: Context | None = None
        self.first_mix = mix  # the mix of rows added without one of their own (``prefill``)
        self.mix = RowMix()  # which rows reach the output layer mixed (see ``rowmix``)
        # the output layer run after a captured final norm; None: llama.cpp's own (mixing full logits)
        self.head = backend.head() if mix is not None else backend.plain_head()
        self._out: np.ndarray | None = None  # a step's logits buffer (output kernel), reused every step
        self.seqs = np.zeros(0, np.int32)  # sequence id of each row (isolated: the ids 0..n-1)
        self._perm: np.ndarray | None = None  # isolated: each row's place in a batch ordered by id
        self.pos = np.zeros(0, np.int32)  # next position of each row
        self.cvecs = {
            "prefill": control_vector(backend, [e for e in edits if e.positions in ("all", "prompt")]),
            "decode": control_vector(backend, [e for e in edits if e.positions in ("all", "generated")]),
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
        if self.c.isolated:
            return UserError(
                f"a row outgrew its {self.c.row_cells} cells of the llama.cpp cache; "
                "lower --max-tokens, or set TOKENSTEER_N_CTX higher"
            )
        return UserError(
            f"the llama.cpp context is full ({self.c.n_ctx} tokens shared by all rows); "
            "set TOKENSTEER_N_CTX higher, or shorten the prompt or --max-tokens"
        )

    def _decode(self, n: int, capture: bool = False) -> None:
        """Decode the batch's first n tokens; with ``capture``, stop after the final norm (``_hidden``).
        Our matrix kernels (``matmul``) run every product at every row count, steps and prefills
        alike, so a row's step is the same in any batch."""
        batch = self.c.batch
        batch.c.n_tokens = n
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

    def _mixed(self, h: torch.Tensor | np.ndarray, mix: RowMix) -> torch.Tensor:
        """Logits of the mixed rows of final hidden states ``h`` [N, H], through the head model, in
        a new array (a step's go into its reused buffer: ``outputs``)."""
        return torch.from_numpy(self.head.logits(self._head_rows(h, mix)))

    def _head_rows(self, h: torch.Tensor | np.ndarray, mix: RowMix) -> np.ndarray:
        """The rows final hidden states ``h`` [N, H] give the output layer (mixed where ``mix``
        mixes), as a new array: the next captured decode overwrites ``h``."""
        return np.array(mix.apply(np.asarray(h, np.float32)), np.float32)

    def _buffer(self, n: int) -> np.ndarray:
        """The reused [n, V] buffer a step's logits are written into."""
        if self._out is None or self._out.shape[0] != n:
            self._out = np.empty((n, self.b.n_vocab), np.float32)
        return self._out

    def _mix_logits(self, logits: torch.Tensor, mix: RowMix) -> torch.Tensor:
        """Without the head model: mix the full logits (the same result, no saving)."""
        if not mix.mixes:
            return logits
        return torch.from_numpy(mix.apply(logits.numpy()).astype(np.float32))

    def _logits(self, n: int) -> np.ndarray:
        """The [n, V] logits of the last decode, in batch order, viewed in place (no copy)."""
        return self.c.logits(n, self.b.n_vocab)

    @property
    def n_rows(self) -> int:
        return len(self.seqs)

    def prefill(self, rows: list[list[int]]) -> torch.Tensor:
        if self.c is not None:
            self.c.reset()
            self._phase = None
        self.seqs, self.pos, self.mix, self._perm = np.zeros(0, np.int32), np.zeros(0, np.int32), RowMix(), None
        return self.add(rows, mix=self.first_mix)

    def add(self, rows: list[list[int]], edits: Sequence[ResidualEdit] = (), mix: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill new rows, one sequence id each, beside the live ones (edits are the session's:
        llama.cpp's control vector applies to every row)."""
        out, new = self._add(rows, mix)
        return self._mixed(out, new) if self.head is not None else self._mix_logits(out, new)

    def add_pending(self, rows: list[list[int]], edits: Sequence[ResidualEdit] = (), mix: torch.Tensor | None = None) -> Pending:
        if self.head is None:
            return Pending(logits=self.add(rows, edits, mix))
        out, new = self._add(rows, mix)
        return Pending(rows=self._head_rows(out, new))

    def _add(self, rows: list[list[int]], mix: torch.Tensor | None) -> tuple[torch.Tensor, RowMix]:
        """Prefill the rows; their [n, H] final hidden states (capturing) or [n, V] logits, and their mix."""
        if not rows or any(len(r) == 0 for r in rows):
            raise UserError("every prompt needs at least one token")
        if self.c is None:
            self.c = self.b.acquire(max(self.capacity or 0, len(rows)), capture=self.head is not None, isolated=self.isolated)
        self._set_phase("prefill")
        if self.c.isolated and max(len(r) for r in rows) > self.c.row_cells:
            raise self._full()
        if int(self.pos.sum()) + sum(len(r) for r in {tuple(r) for r in rows}) > self.c.n_ctx:
            raise self._full()
        used = set(self.seqs.tolist())
        free = [i for i in range(self.c.n_seq) if i not in used][: len(rows)]
        if len(free) < len(rows) or len(rows) > self.c.n_batch:
            raise UserError(f"{len(rows)} more rows do not fit this llama.cpp context ({self.c.n_seq} sequences, {len(used)} in use)")
        try:
            out = self._prefill_rows(rows, free)
        except BaseException:
            for s in free:
                llama_cpp.llama_memory_seq_rm(self.c.mem, s, -1, -1)
            raise
        self.seqs = np.concatenate([self.seqs, np.asarray(free, np.int32)])
        self.pos = np.concatenate([self.pos, np.array([len(r) for r in rows], np.int32)])
        self._set_perm()
        self.mix.add(mix, len(rows))
        return out, RowMix.of(mix, len(rows))

    def _prefill_rows(self, rows: list[list[int]], seqs: list[int]) -> torch.Tensor:
        """Decode each row into its sequence id; [n, H] final hidden states (capturing) or [n, V] logits."""
        capture = self.head is not None
        out = torch.empty(len(rows), self.b.hidden_size if capture else self.b.n_vocab)
        batch, batch_size = self.c.batch, self.c.n_batch
        # One row per call: llama.cpp's matmul kernels change with the number of tokens in a call,
        # so a row prefilled alone gets exactly the cache (and logits) it gets in any batch.
        first: dict[tuple[int, ...], int] = {}
        for i, (r, seq) in enumerate(zip(rows, seqs)):
            j = first.setdefault(tuple(r), i)
            if j != i:  # the same tokens as an earlier row: share its cache cells
                llama_cpp.llama_memory_seq_cp(self.c.mem, seqs[j], seq, -1, -1)
                out[i] = out[j]
                continue
            tokens = np.asarray(r, np.int32)
            for start in range(0, len(tokens), batch_size):
                k = len(tokens[start : start + batch_size])
                batch.token[:k] = tokens[start : start + k]
                batch.pos[:k] = np.arange(start, start + k, dtype=np.int32)
                batch.seq[:k] = seq
                batch.logits[:k] = 0
                batch.logits[k - 1] = start + k == len(tokens)
                self._decode(k, capture and start + k == len(tokens))
                if self.b.progress is not None:
                    self.b.progress(start + k, len(tokens))
            out[i] = torch.from_numpy(self._hidden(1)[0] if capture else self._logits(1)[0].copy())
        return out

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            return self.outputs([self.step_pending(tokens)])[0]
        n, perm = self._feed(tokens), self._perm
        self._decode(n)
        self.pos += 1
        if perm is not None:
            return self._mix_logits(torch.from_numpy(self._logits(n)[perm]), self.mix)
        if self.mix.mixes:
            return self._mix_logits(torch.from_numpy(self._logits(n)), self.mix)
        addr = logits_address(self.c.ptr)
        if self._view is None or self._view[:2] != (addr, n):  # llama.cpp reuses its buffer: keep the view
            self._view = (addr, n, torch.from_numpy(self._logits(n)))
        return self._view[2]

    def step_pending(self, tokens: torch.Tensor) -> Pending:
        if self.head is None:
            return Pending(logits=self.step(tokens))
        n = self._feed(tokens)
        self._decode(n, True)
        self.pos += 1
        h = self._hidden(n) if self._perm is None else self._hidden(n)[self._perm]
        return Pending(rows=self._head_rows(h, self.mix))

    def outputs(self, pending: Sequence[Pending]) -> list[torch.Tensor]:
        """One call of our output kernel for every pending pass's rows, into the step's buffer."""
        if self.head is None or not pending:
            return [p.logits for p in pending]
        rows = [p.rows for p in pending]
        u = rows[0] if len(rows) == 1 else np.concatenate(rows)
        out = torch.from_numpy(self.head.logits(u, self._buffer(len(u))))
        if len(rows) == 1:
            return [out]
        bounds = list(itertools.accumulate((len(r) for r in rows), initial=0))
        return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def _feed(self, tokens: torch.Tensor) -> int:
        """Put one token per row into the batch (isolated: in sequence-id order); the row count."""
        n = len(self.seqs)
        if tokens.shape[0] != n:
            raise ValueError(f"step got {tokens.shape[0]} tokens for {n} rows")
        self._set_phase("decode")
        batch, perm = self.c.batch, self._perm
        at = slice(0, n) if perm is None else perm  # isolated: one micro-batch needs ids in order
        batch.token[at] = tokens.numpy()
        batch.pos[at] = self.pos
        batch.seq[at] = self.seqs
        batch.logits[:n] = 1
        return n

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """k tokens per row in one llama_decode call: [N, k] -> [N, k, V] logits (a copy)."""
        n, k = tokens.shape
        if n != len(self.seqs):
            raise ValueError(f"extend got {n} rows of tokens for {len(self.seqs)} rows")
        if n * k > self.c.n_batch or self.c.isolated:  # more than one batch holds, or ids must be in order: step
            return super().extend(tokens)
        self._set_phase("decode")
        # Position by position, every row each time: the cells land in the order k steps would put
        # them, so a later trim frees the newest cells of every row. llama.cpp's kernels depend on
        # the tokens per call, so logits match k steps closely, not bit for bit.
        batch, m = self.c.batch, n * k
        batch.token[:m] = tokens.numpy().astype(np.int32).T.reshape(-1)
        batch.pos[:m] = (self.pos[None, :] + np.arange(k, dtype=np.int32)[:, None]).reshape(-1)
        batch.seq[:m] = np.tile(self.seqs, k)
        batch.logits[:m] = 1
        capture = self.head is not None
        self._decode(m, capture)
        self.pos += k
        blocks = RowMix()  # position-major: k blocks of this session's rows
        for _ in range(k):
            blocks.segments += [list(seg) for seg in self.mix.segments]
        if capture:  # k mixed blocks through the head at once
            out = self._mixed(self._hidden(m), blocks)
        else:
            out = self._mix_logits(torch.from_numpy(self._logits(m).copy()), blocks)
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
        wanted = {old[r] for r in rows}
        for s in set(old) - wanted:
            llama_cpp.llama_memory_seq_rm(self.c.mem, s, -1, -1)
        used: set[int] = set()
        new: list[int] = []
        for r in rows:
            s = old[r]
            if s in used:  # a duplicate: fork the sequence into a free id
                s = self._fork(old[r], wanted | used)
            used.add(s)
            new.append(s)
        if self.c.isolated:  # keep the ids 0..n-1: move the highest into the gaps
            gaps = sorted(set(range(len(new))) - used)
            for i, s in enumerate(new):
                if s >= len(new):
                    new[i] = self._fork(s, used, gaps.pop(0))
                    llama_cpp.llama_memory_seq_rm(self.c.mem, s, -1, -1)
        self.seqs = np.array(new, np.int32)
        self.pos = self.pos[rows]
        self.mix.select(rows)
        self._set_perm()

    def _fork(self, src: int, taken: set[int], dst: int | None = None) -> int:
        """Copy sequence ``src`` into ``dst`` (default: the lowest id not in ``taken``); shared
        cells cost nothing, an isolated cache is copied whole."""
        if dst is None:
            dst = next(i for i in range(self.c.n_seq) if i not in taken)
        llama_cpp.llama_memory_seq_cp(self.c.mem, src, dst, -1, -1)
        return dst

    def _set_perm(self) -> None:
        n = len(self.seqs)
        ordered = self.c is None or not self.c.isolated or np.array_equal(self.seqs, np.arange(n))
        self._perm = None if ordered else self.seqs.astype(np.intp)

    def close(self) -> None:
        if self.c is not None:
            self._view = None
            self.b.release(self.c)
            self.c = None
