"""The runtime of a formula's ``R(k=…, tau=…)`` terms (REPLUG): P(y | x) = Σ_d w_d · P(y | d ⊕ x)
with w = softmax(sim(d, x) / τ) over the k passages most similar to the prompt.

Each passage is one more row of the loop's batched forward (hook 1: the passage, a blank line, the
prompt), so k passages cost one forward of 1 + k rows per token. R terms share these rows: every
search returns the best passages first, so a term reads the first k rows of the largest k (``R(k=4)
- 0.7*R(k=4, tau=10)`` runs 4 passage rows, not 8). With ``every=N`` the passages are
re-retrieved on prompt + generated text every N tokens; a row's prefix cannot change inside the
loop's session, so such a term keeps a side session of its own (like a term on another model):
rows of passages still retrieved keep their cache, and only a new passage's row is prefilled with
passage + prompt + generated text; the weights follow the latest similarities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import math

import numpy as np
import torch

from tokensteer.errors import UserError
from tokensteer.formula.ast import Node, Retrieve, Sum, Op
from tokensteer.retrieval.docstore import DocStore, Hit, open_store

if TYPE_CHECKING:
    from tokensteer.backends.base import Backend, Session
    from tokensteer.loop import LoopState

SEPARATOR = "\n\n"
FLOOR = -80.0  # the mixture's floor for a passage row's log-probabilities (see ``mixture``)


def with_passage(passage: str, prompt: str) -> str:
    """The text of a passage's row: the passage, a blank line, then the prompt."""
    return passage.strip() + SEPARATOR + prompt


def weights(hits: list[Hit], tau: float) -> torch.Tensor:
    """softmax(similarity / τ) over the retrieved passages, [k]."""
    return torch.softmax(torch.tensor([h.score for h in hits], dtype=torch.float64) / tau, 0).float()


def mixture(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, V] log Σ_d w_d · softmax(rows_d) of ``rows`` [B, k, V] (logits or log-probabilities,
    alike: softmax ignores a row's shift) with weights ``w`` [B, k]."""
    return mix(w, probabilities(rows))


def probabilities(rows: torch.Tensor) -> torch.Tensor:
    """softmax(rows) (its exponentials are cheaper than ``exp`` of log-probabilities), with
    probabilities below e^FLOOR counted as e^FLOOR: no token some passage allows is dropped and no
    product leaves the normal floats; no sampled token changes."""
    return torch.softmax(rows.float(), -1).clamp_(min=math.exp(FLOOR))


def mix(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """[B, V] log Σ_d w_d · p_d of probabilities ``p`` [B, k, V], as one batched product."""
    out = torch.bmm(w[:, None, :].to(p.dtype), p)[:, 0]
    if out.is_cpu:  # numpy's vectorised log is several times faster than torch's on CPU
        np.log(out.numpy(), out=out.numpy())
        return out
    return out.log_()


def retrieve_nodes(n: Node) -> list[Retrieve]:
    """The distinct R terms of a formula tree, in order of appearance."""
    if isinstance(n, Retrieve):
        return [n]
    parts = [t for _, t in n.terms] if isinstance(n, Sum) else list(n.args) if isinstance(n, Op) else []
    return list(dict.fromkeys(r for a in parts for r in retrieve_nodes(a)))


@dataclass
class Retrieval:
    """One retrieval, for ``--trace``: which passages prompt ``prompt`` was conditioned on from
    token ``step`` on, with their similarities and mixture weights."""

    prompt: int
    step: int
    term: str
    passages: list[dict] = field(default_factory=list)


@dataclass
class _Term:
    node: Retrieve
    hits: list[list[Hit]] = field(default_factory=list)  # per prompt
    w: torch.Tensor | None = None  # [B, k] mixture weights
    session: Session | None = None  # side session (every > 0)
    side: torch.Tensor | None = None  # [B, k, V] the side session's latest logits


class RetrievalTerms:
    """Every R term of one formula, over one document store."""

    def __init__(self, lm: Backend, nodes: list[Retrieve], docs: DocStore | str | Path) -> None:
        self.lm = lm
        self.store = docs if isinstance(docs, DocStore) else open_store(docs)
        for n in nodes:
            self.store.check_k(n.k)
        self.terms = [_Term(n) for n in nodes]
        self.n_rows = max((n.k for n in nodes if not n.every), default=0)  # the row terms' shared passage rows
        self.events: list[Retrieval] = []
        self._pending: list[tuple[str, list[list[Hit]]]] = []  # (prompt, hits per term) from variants()
        self._prompts: list[str] = []
        self._seen = 0  # tokens seen since start (re-retrieval counts them)
        self._probs: tuple[torch.Tensor, torch.Tensor] | None = None  # (this step's rows, their probabilities)

    # hook 1 --------------------------------------------------------------------------------
    def variants(self, prompt: str) -> list[str]:
        """Rows for ``prompt``: each row term's passages before it. The loop asks with "" only to
        count rows, which costs no search."""
        if not prompt:
            return [""] * self.n_rows
        found = self.search([prompt])
        self._pending.append((prompt, [h[0] for h in found]))
        rows = max((hits[0] for t, hits in zip(self.terms, found) if not t.node.every), key=len, default=[])
        return [with_passage(h.chunk.text, prompt) for h in rows]

    def search(self, queries: list[str]) -> list[list[list[Hit]]]:
        """Per term, per query: its k passages (one search at the largest k, cut per term)."""
        kmax = max(t.node.k for t in self.terms)
        found = self.store.search(queries, kmax)
        return [[q[: t.node.k] for q in found] for t in self.terms]

    def row_mix(self, root: Node) -> torch.Tensor | None:
        """When the formula reads the loaded model only through R terms' rows: a mix that keeps just
        those rows, so the output layer skips the prompt's own row (k rows instead of 1 + k)."""
        from tokensteer.formula.check import any_node
        from tokensteer.formula.ast import Model

        if not self.n_rows or len(self.terms) != sum(1 for t in self.terms if not t.node.every):
            return None
        if any_node(root, lambda x: isinstance(x, Model) and x.model is None or isinstance(x, Op) and x.name == "nucleus"):
            return None
        return torch.cat([torch.zeros(self.n_rows, 1), torch.eye(self.n_rows)], 1)

    # the loop's life cycle ---------------------------------------------------------------------
    def start(self, state: LoopState) -> None:
        B = state.batch_size
        pending, self._pending = self._pending[-B:], []
        if len(pending) != B:
            raise RuntimeError("R terms: variants() was not called once per prompt before start()")
        self._prompts = [p for p, _ in pending]
        self.events, self._seen = [], 0
        for i, t in enumerate(self.terms):
            t.hits = [hits[i] for _, hits in pending]
            self._settle(t)
            if t.node.every:
                tok = state.tokenizer
                rows = [tok.encode(with_passage(h.chunk.text, p)) for p, hits in zip(self._prompts, t.hits) for h in hits]
                t.session = state.backend.session()
                t.side = self._rows(t.session.prefill(rows), B)

    def _settle(self, t: _Term) -> None:
        """Weights for the passages in ``t.hits``; record them for the trace."""
        w = torch.stack([weights(h, t.node.tau) for h in t.hits])
        t.w = w
        for b, hits in enumerate(t.hits):
            self.events.append(Retrieval(b, self._seen, str(t.node), [
                {"doc": h.chunk.doc, "title": h.chunk.title, "chunk": h.chunk.index, "similarity": round(h.score, 4),
                 "weight": round(float(w[b, j]), 4), "text": h.chunk.text} for j, h in enumerate(hits)]))

    def _move(self, t: _Term, state: LoopState, found: list[list[Hit]], generated: list[list[int]], tokens: torch.Tensor) -> torch.Tensor:
        """Re-seat a side term's rows on the passages ``found``: rows of passages still retrieved
        keep their cache and take this step's token; only new passages are prefilled (passage +
        prompt + ``generated``). Returns the rows' logits, prompt-major in ``found``'s order."""
        k, tok = t.node.k, state.tokenizer
        keep: list[int] = []  # session rows kept, in the order they stay
        fresh: list[list[int]] = []  # token rows of new passages
        where: list[int] = []  # for each row of the new layout: its index in keep + fresh
        for b, (old, new) in enumerate(zip(t.hits, found)):
            before = [h.chunk for h in old]
            for h in new:
                if h.chunk in before:
                    where.append(len(keep))
                    keep.append(b * k + before.index(h.chunk))
                else:
                    where.append(-1 - len(fresh))
                    fresh.append(tok.encode(with_passage(h.chunk.text, self._prompts[b])) + generated[b])
        t.session.select(keep)
        parts = []
        if keep:
            parts.append(t.session.step(tokens[[r // k for r in keep]]))
        if fresh:
            parts.append(t.session.add(fresh))
        order = [i if i >= 0 else len(keep) - 1 - i for i in where]
        t.session.select(order)
        return torch.cat(parts)[order]

    def _rows(self, logits: torch.Tensor, B: int) -> torch.Tensor:
        return logits.view(B, -1, logits.shape[-1])

    def on_token(self, state: LoopState, tokens: torch.Tensor) -> None:
        """Advance side sessions; every N tokens re-retrieve on prompt + generated text."""
        self._seen += 1
        self._probs = None
        generated = None
        for t in self.terms:
            if not t.node.every:
                continue
            if self._seen % t.node.every == 0:
                if generated is None:  # hook 5 runs before the loop appends this token
                    generated = [g + [int(x)] for g, x in zip(state.generated, tokens.tolist())]
                    tok = state.tokenizer
                    queries = [p + tok.decode(g) for p, g in zip(self._prompts, generated)]
                found = self.store.search(queries, t.node.k)
                if [[(h.chunk, h.score) for h in q] for q in found] != [[(h.chunk, h.score) for h in q] for q in t.hits]:
                    logits = self._move(t, state, found, generated, tokens)
                    t.hits = found
                    self._settle(t)
                    t.side = self._rows(logits, state.batch_size)
                    continue
            t.side = self._rows(t.session.step(tokens.repeat_interleave(t.node.k)), state.batch_size).clone()

    def finish(self) -> None:
        self._probs = None
        for t in self.terms:
            if t.session is not None:
                t.session.close()
                t.session = None

    # hook 3 --------------------------------------------------------------------------------
    def value(self, node: Retrieve, doc_rows: torch.Tensor | None) -> torch.Tensor:
        """[B, V] log Σ_d w_d · P(y | d ⊕ x) of one R term, a normalised distribution; ``doc_rows``
        [B, n_rows, V] are the R terms' shared passage rows, as logits or log-probabilities."""
        t = next(t for t in self.terms if t.node == node)
        if node.every:
            return mixture(t.w, t.side)
        if self._probs is None or self._probs[0] is not doc_rows:  # once per step for all row terms
            self._probs = (doc_rows, probabilities(doc_rows))
        return mix(t.w, self._probs[1][:, : node.k])


def retrieval_terms(lm: Backend, root: Node, docs: DocStore | str | Path | None) -> RetrievalTerms | None:
    """The R terms of a formula over ``docs``; None when it has none. R terms without documents
    are a user mistake."""
    nodes = retrieve_nodes(root)
    if not nodes:
        return None
    if docs is None:
        raise UserError(f"the formula term {nodes[0]} retrieves passages but no documents were given: "
                        "add --docs PATH (a folder of .txt/.md files or a .jsonl file), or docs= in Python")
    return RetrievalTerms(lm, nodes, docs)
