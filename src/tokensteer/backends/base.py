"""The narrow interface between the engine and a model runtime.

A backend loads a model and tokenizer; a session holds one batch of rows and their KV cache. The
engine calls ``add`` (prefill new rows beside the live ones), ``step``, ``select`` (rows leave)
and, on its special paths, ``extend`` (several tokens per row in one forward) and ``trim``;
steering training calls ``Backend.hidden_states``. Anything else a backend can do is announced
in ``capabilities``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from tokensteer.hooks import ResidualEdit

#: capability names a control may require
RESIDUAL_ADD = "residual_add"  # additive vector, same for every row, at every position
RESIDUAL_FN = "residual_fn"  # arbitrary edits, per row, per phase
RESIDUAL_FIRST = "residual_first_layer"  # edit the output of block 0 (llama.cpp control vectors start at 1)
HIDDEN_STATES = "hidden_states"  # read hidden states (steering training, probes)
LOAD_HF = "load_hf_folders"  # load a Hugging Face folder (e.g. a formula's other model)
HEAD_MIX = "head_mix"  # run the output layer on linear combinations of rows (``session(mix=...)``)
ROW_EDITS = "row_edits"  # additive edits given per row with ``Session.add``, so differently steered rows share a batch


#: ids before a candidate token that ``Tokenizer.continuations`` decodes with it
CONTINUATION_WINDOW = 4

#: user-defined tokens that mark media or turns rather than write text ("<start_of_image>", "[multimodal]")
MARKER = re.compile(r"^(\[[a-z_]+\]|<(start|end)_of_[a-z_]+>)$")


class Tokenizer(ABC):
    """The little the engine needs from a tokenizer."""

    vocab_size: int
    eos_ids: frozenset[int]
    bos_id: int | None
    #: tokens that write no text: control, unused and unknown tokens, and markers (``MARKER``)
    special_ids: frozenset[int] = frozenset()

    @abstractmethod
    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """The text of ``ids``; special tokens (``special_ids``) are left out unless ``skip_special`` is False."""

    def continuations(self, ids: Sequence[int], candidates: Sequence[int]) -> tuple[str, list[str]]:
        """The text of ``ids``, and of ``ids`` followed by each candidate token. A candidate decodes
        only the last few ids with it (decoding is local), or the whole text where that window's
        text is not a prefix of the extended window's (an unfinished character)."""
        ids = list(ids)
        text, window = self.decode(ids), ids[-CONTINUATION_WINDOW:]
        before = self.decode(window)
        out = []
        for c in candidates:
            after = self.decode([*window, c])
            out.append(text + after[len(before) :] if after.startswith(before) else self.decode([*ids, c]))
        return text, out

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (for top-n alternatives and traces)."""
        return self.decode([token_id], skip_special=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token adds to the text: b"" for control tokens, one byte for byte-fallback
        tokens. Constraints build their per-token tables from this; override it when single-id
        decoding cannot show a token's bytes (incomplete UTF-8 decodes as U+FFFD)."""
        if token_id in self.special_ids:
            return b""
        return self.decode([token_id]).encode("utf-8")


@dataclass
class Pending:
    """A forward pass whose output layer may not have run yet: its [N, V] ``logits``, or the rows
    (final hidden states, mixed where the session mixes) that ``Session.outputs`` turns into them."""

    logits: torch.Tensor | None = None
    rows: np.ndarray | None = None


class Session(ABC):
    """One batch of rows and their KV caches: a running group of the engine, or a control's own."""

    @abstractmethod
    def prefill(self, rows: list[list[int]]) -> torch.Tensor:
        """Start over with these rows (aligned by the backend as it needs); return [N, V] float logits."""

    def add(self, rows: list[list[int]], edits: Sequence[ResidualEdit] = (), mix: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill new rows after the live ones and return their logits; the next ``step`` takes one
        token for every row. ``edits`` are additive edits of these rows alone (vectors [H] or
        [n, H]), for backends with ``ROW_EDITS``; ``mix`` [R', R] makes each group of R of these
        rows come out as R' combinations (``HEAD_MIX``). On failure no new row is left behind."""
        if edits or mix is not None:
            raise NotImplementedError(f"{type(self).__name__} takes edits only when it is opened")
        if self.n_rows:
            raise NotImplementedError(f"{type(self).__name__} cannot add rows beside live ones")
        return self.prefill(rows)

    @property
    def n_rows(self) -> int:
        """Rows in the session now."""
        return 0

    @abstractmethod
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row ([N] long) and return the next [N, V] float logits."""

    def step_pending(self, tokens: torch.Tensor) -> Pending:
        """``step`` with its output layer left for ``outputs``, which may run the output layers of
        several passes (a step's and the prefills of the rows joining it) in one call."""
        return Pending(logits=self.step(tokens))

    def add_pending(self, rows: list[list[int]], edits: Sequence[ResidualEdit] = (), mix: torch.Tensor | None = None) -> Pending:
        """``add`` with its output layer left for ``outputs``."""
        return Pending(logits=self.add(rows, edits, mix))

    def outputs(self, pending: Sequence[Pending]) -> list[torch.Tensor]:
        """The [N, V] logits of each pending pass, in as few output-layer calls as the backend can;
        valid until the next step."""
        return [p.logits for p in pending]

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append k tokens per row ([N, k] long) and return the [N, k, V] logits after each of them.

        Backends override this with one forward over all k positions (speculative verification);
        this default steps k times, so every backend has it."""
        return torch.stack([self.step(tokens[:, j]).float().clone() for j in range(tokens.shape[1])], dim=1)

    def trim(self, n: int) -> None:
        """Forget the last n tokens of every row (backtracking)."""
        raise NotImplementedError(f"{type(self).__name__} cannot trim its cache")

    def select(self, rows: Sequence[int]) -> None:
        """Keep, reorder or duplicate rows of the cache (fork a prefix, drop finished rows)."""
        raise NotImplementedError(f"{type(self).__name__} cannot select rows")

    def close(self) -> None:
        """Release the cache (and any per-session state such as steering vectors)."""


class Backend(ABC):
    """A loaded model behind the loop."""

    name: str
    model_name: str
    tokenizer: Tokenizer
    capabilities: frozenset[str]
    n_layers: int
    hidden_size: int
    context_length: int | None = None  # most positions one row may hold (prompt + generated), if known
    context_hint: str = ""  # how to get a longer context, for the error message
    shared_cells: int | None = None  # KV cells all rows of one session share, where they share one cache
    # a row's log-probabilities while generating equal scoring its text (``continuation_nll``) up to
    # float rounding, so a sample's perplexity can be read off its generation
    generation_scores: bool = True

    @abstractmethod
    def session(
        self, edits: Sequence[ResidualEdit] = (), rollback: bool = False, mix: torch.Tensor | None = None,
        capacity: int | None = None, isolated: bool = False,
    ) -> Session:
        """Start a session whose forward passes apply ``edits``; ``rollback`` asks for a cache that
        ``trim`` can roll back any distance (backends may keep more history for it); ``capacity``
        is the most rows it will hold at once (the engine's batch), where a backend must plan for it.
        ``isolated`` (with ``capacity``) asks that each row's logits not depend on the other rows
        however they join and leave, each row then holding at most ``row_cells(capacity)`` cells.

        ``mix`` [R', R] (backends with ``HEAD_MIX`` only): every group of R consecutive rows returns
        R' logit rows, the output layer applied to those combinations of the group's final hidden
        states. The output layer is linear, so that equals the same combinations of the rows'
        logits, at the cost of R' rows instead of R through the (often biggest) last matrix."""

    @torch.no_grad()
    def continuation_nll(self, ctx: Sequence[Sequence[int]], cont: Sequence[Sequence[int]]) -> list[float]:
        """Summed negative log-likelihood of each continuation after its context, no controls:
        here by stepping a session through the continuations (backends override it with one pass)."""
        session = self.session()
        try:
            logits = session.prefill([list(x) for x in ctx])
            nll = [0.0] * len(ctx)
            for t in range(max((len(y) for y in cont), default=0)):
                lp = torch.log_softmax(logits.float(), dim=-1)
                nxt = []
                for i, y in enumerate(cont):
                    if t < len(y):
                        nll[i] -= float(lp[i, y[t]])
                    nxt.append(y[t] if t < len(y) else (y[-1] if y else ctx[i][-1]))
                logits = session.step(torch.tensor(nxt, dtype=torch.long))
            return nll
        finally:
            session.close()

    def row_cells(self, capacity: int) -> int | None:
        """Cells (prompt + generated tokens) one row of an ``isolated`` session of ``capacity`` rows
        may hold, where isolation limits them; None where rows never depend on each other."""
        return None

    def hidden_states(self, texts: Sequence[str], layers: Sequence[int]) -> list[torch.Tensor]:
        """Residual stream after each requested layer: per text a [len(layers), T, H] tensor."""
        raise NotImplementedError(f"the {self.name} backend cannot read hidden states")

    def unsupported(self, edits: Sequence[ResidualEdit]) -> str | None:
        """Why this backend cannot run ``edits``, or None if it can."""
        for e in edits:
            if e.additive_uniform and RESIDUAL_ADD in self.capabilities:
                continue
            if RESIDUAL_FN not in self.capabilities:
                return (
                    f"the {self.name} backend only adds one vector to every row at every position; "
                    "use --backend torch for per-row, per-position or non-additive edits"
                )
        return None
