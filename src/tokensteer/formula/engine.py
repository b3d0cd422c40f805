"""The formula as a Control: same-model terms are extra rows of the loop's one batched forward
(hook 1), other local models are sessions driven from ``start``/``on_token``, and the combination
rewrites the next-token log-probabilities (hook 3). No second decode loop.

With ``speculative=k`` the control drafts: the loop samples up to k tokens from the formula with
other models replaced by the loaded one, then ``verify`` (hook 6) runs each other model once over
all of them and keeps what the speculative-sampling rule accepts (see ``speculative.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from tokensteer.backends.base import Backend, Session
from tokensteer.errors import UserError
from tokensteer.formula.ast import Const, Formula, Guide, Model, Node, Op, Retrieve, Sum, to_string
from tokensteer.formula.check import Report, check, check_speculative, kind, peel, top_terms
from tokensteer.formula.combine import NEG_INF, combine, may_exclude, set_op
from tokensteer.formula.fusion import fusion, is_same_model
from tokensteer.formula.guides import get_guide
from tokensteer.formula.others import load_other
from tokensteer.formula.parser import parse
from tokensteer.formula.speculative import SpecStats, accept, draft_of
from tokensteer.formula.trace import TermValue, TokenTrace
from tokensteer.hooks import Control, Verdict
from tokensteer.engine.state import LoopState
from tokensteer.sampling import nucleus_mask, top_k

TAIL = 160  # characters of context a guide scores: enough for a sentence, cheap for 20 candidates


class FormulaControl(Control):
    """Generate from a formula over next-token distributions (see ``tokensteer.formula``)."""

    stages = frozenset({"variants", "rewrite", "accept", "verify"})

    def __init__(
        self, lm: Backend, formula: Formula | Node | str, trace: bool = False, speculative: int = 0, fuse: bool = True,
        docs: object = None,
    ) -> None:
        """``fuse=False`` sends every term's row through the output layer even when the formula
        only needs their weighted sum (what ``--trace`` needs; benchmarks compare the two).
        ``docs``: the documents R terms retrieve from (a path or a ``tokensteer.retrieval.DocStore``)."""
        if isinstance(formula, str):
            formula = parse(formula)
        elif isinstance(formula, Node):
            formula = Formula(formula)
        self.lm, self.formula, self.trace_on = lm, formula, trace
        self.report: Report = check(formula)
        check_speculative(formula, speculative)
        if speculative and trace:
            raise UserError("--trace follows the formula token by token; it cannot be combined with --speculate")
        self.speculative = int(speculative)  # most tokens drafted per verification (0 = off)
        if not self.speculative:
            self.stages = self.stages - {"verify"}
        self.prefixes: list[str] = []  # same-model conditioning texts, one row each
        self.others: list[tuple[str, str]] = []  # (model path, prefix) on other backends
        self._collect(formula.root)
        self.draft_root = draft_of(formula.root) if self.drafts else None
        if self.draft_root is not None:
            self._collect(self.draft_root)  # the draft's stand-ins for other models may need rows
        from tokensteer.retrieval.term import retrieval_terms

        self.retrieval = retrieval_terms(lm, formula.root, docs)  # R terms: one row per passage, after the prefixes'
        self._fuse = fuse and not (self.drafts or trace)
        self.fused = fusion(formula, self.prefixes) if self._fuse and self.retrieval is None else None
        self.stats = SpecStats()
        self.guides = {g.name: get_guide(g.name) for g in self._guides(formula.root)}
        self._other_lms = {path: load_other(lm, path) for path, _ in self.others}
        self._sessions: list[Session] = []
        self._other_lp: list[torch.Tensor] = []
        self.traces: list[list[TokenTrace]] = []
        self._pending: list | None = None
        self._mixed: torch.Tensor | None = None  # this step's fused same-model row, when the loop mixed rows

    # the formula's terms ------------------------------------------------------------------
    def _collect(self, n: Node) -> None:
        if isinstance(n, Model):
            if n.model is None:
                if n.prefix and n.prefix not in self.prefixes:
                    self.prefixes.append(n.prefix)
            elif (n.model, n.prefix) not in self.others:
                self.others.append((n.model, n.prefix))
        elif isinstance(n, Sum):
            for _, t in n.terms:
                self._collect(t)
        elif isinstance(n, Op):
            for a in n.args:
                self._collect(a)

    def _guides(self, n: Node) -> list[Guide]:
        if isinstance(n, Guide):
            return [n]
        if isinstance(n, Sum):
            return [g for _, t in n.terms for g in self._guides(t)]
        if isinstance(n, Op):
            return [g for a in n.args for g in self._guides(a)]
        return []

    # hooks --------------------------------------------------------------------------------
    def variants(self, prompt: str) -> Sequence[str]:
        rows = [p + prompt for p in self.prefixes]
        return rows + self.retrieval.variants(prompt) if self.retrieval is not None else rows

    def row_mix(self) -> torch.Tensor | None:
        """Ask for Σ wᵢ·logitsᵢ of the same-model terms as one row (see ``fusion``), plus the
        prompt's own row when a nucleus filter needs the base distribution."""
        if self.retrieval is not None:  # only R terms' rows, when nothing else reads the model's
            return self.retrieval.row_mix(self.formula.root) if self._fuse else None
        if self.fused is None:
            return None
        weights, needs_base = self.fused
        rows = [weights] + ([[1.0] + [0.0] * (len(weights) - 1)] if needs_base else [])
        return torch.tensor(rows, dtype=torch.float32)

    def start(self, state: LoopState) -> None:
        self.finish()
        self._other_lp = []
        self._drafted, self._held, self._q = [], [], []  # speculative: tokens, sources, draft log-probs
        self._unfed: torch.Tensor | None = None  # the last verdict's token, not yet fed to other models
        self.stats = SpecStats()
        self.traces = [[] for _ in range(state.batch_size)]
        tok = state.tokenizer
        self._prompt_text = [tok.decode(p) for p in state.prompt_tokens]
        for path, prefix in self.others:
            other = self._other_lms[path]
            rows = [p if not prefix else other.tokenizer.encode(prefix + t) for p, t in zip(state.prompt_tokens, self._prompt_text)]
            sess = other.session(rollback=self.drafts)
            self._sessions.append(sess)
            self._other_lp.append(self._fit(torch.log_softmax(sess.prefill(rows).float(), -1)))
        if self.retrieval is not None:
            self.retrieval.start(state)

    def finish(self) -> None:
        """Close the other models' sessions (their KV caches) as soon as the generation ends."""
        for s in self._sessions:
            s.close()
        self._sessions = []
        if self.retrieval is not None:
            self.retrieval.finish()

    def _fit(self, lp: torch.Tensor) -> torch.Tensor:
        """Match another model's logit width to ours (padded embedding rows differ)."""
        V = self.lm.tokenizer.vocab_size
        if lp.shape[-1] > V:
            return torch.log_softmax(lp[:, :V], -1)
        if lp.shape[-1] < V:
            return torch.cat([lp, lp.new_full((lp.shape[0], V - lp.shape[-1]), NEG_INF)], -1)
        return lp

    def logprobs(self, state: LoopState, logprobs: torch.Tensor) -> torch.Tensor:
        self._state = state
        if state.mix is not None and self.retrieval is not None:  # the R terms' rows alone (retrieval.row_mix),
            # read as logits: the mixture normalises each row itself
            self._mixed, self._rows = None, None
            self._docs = state.logits.view(state.batch_size, state.rows_per_prompt, -1)
            self._base_in = self._base_rows = logprobs
            return self._combine(self.formula.root)
        if state.mix is not None:  # row 0 is the same-model terms' weighted sum, row 1 the base if asked
            self._mixed = self._base_in = state.rows[:, 0]
            self._base_rows = state.rows[:, 1] if state.rows_per_prompt > 1 else self._mixed
            self._rows = None
            return self._combine(self.formula.root)
        self._mixed = None
        self._base_in = logprobs
        self._rows = state.variant_rows(self) if self.prefixes or self.retrieval is not None else None
        self._docs = self._rows[:, len(self.prefixes) :] if self.retrieval is not None else None
        self._base_rows = state.rows[:, 0]
        if self.drafts:  # speculative: sample from the draft, keep what verify() will need
            q = self._combine(self.draft_root)
            self._held.append((self._base_in, self._rows, self._base_rows))
            self._q.append(q)
            return q
        return self._combine(self.formula.root)

    def _combine(self, root: Node) -> torch.Tensor:
        """Log-probabilities of the formula ``root`` from the sources set by ``logprobs``/``verify``."""
        state = self._state
        filters, body = peel(root)
        terms = top_terms(body)
        normalized = self.formula.mode == "normalized"
        total = sum(w for w, t in terms if kind(t) in ("model", "operator"))
        div = total if normalized else 1.0
        mixed = self._mixed
        if len(terms) == 1 and isinstance(terms[0][1], Retrieve) and terms[0][0] / div == 1.0 and not filters and not self.trace_on:
            return self.eval(terms[0][1])  # a lone R term is already a normalised mixture
        if mixed is None:
            values = [(w / div, self.eval(t)) for w, t in terms if kind(t) != "guide"]
        else:  # the backend already summed the same-model terms; their log-softmax constants, and
            # constant terms, only shift every token alike and vanish in the normalisation below
            values = [(1.0, mixed)] + [(w / div, self.eval(t)) for w, t in terms if kind(t) not in ("guide", "constant") and not is_same_model(t)]
            if len(values) == 1 and not filters and all(kind(t) != "guide" for _, t in terms):
                return mixed  # the mixed row's log-probabilities are the formula's
        s = combine(values, any(may_exclude(t) for _, t in terms))
        guide_vals = []
        for w, t in terms:
            if isinstance(t, Guide):
                delta = self.guide_delta(state, t, s)
                guide_vals.append((w, delta))
                s = s + w * delta
        x = s
        scale = 1.0
        for f in reversed(filters):
            x = self.filter(f, x)
            if f.name == "temp":
                scale /= f.param
        out = self._no_dead_rows(torch.log_softmax(x, -1))
        if self.trace_on:
            pairs, vi, gi = [], iter(values), iter(guide_vals)
            for w, t in terms:
                wv, v = next(gi) if isinstance(t, Guide) else next(vi)
                pairs.append((to_string(t), wv * scale, v))
            kept = torch.where(torch.isneginf(out), torch.full_like(s, NEG_INF), s * scale)
            self._pending = [pairs, torch.logsumexp(kept, -1), out, state.rows[:, 0]]
        return out

    def _no_dead_rows(self, out: torch.Tensor) -> torch.Tensor:
        """Refuse a step where the formula excludes every token (filters or an intersection with
        nothing in common normalise to NaN); a finished prompt's row just takes the base model's."""
        dead = torch.isnan(out[:, 0])  # a row with nothing left normalises to NaN everywhere
        if not bool(dead.any()):
            return out
        state = self._state
        finished = torch.tensor(state.finished).repeat(out.shape[0] // state.batch_size)  # rows are position-major
        if bool((dead & ~finished).any()):
            raise UserError(
                f"the formula leaves no possible next token at step {state.step + 1}: its filters "
                "(topk/topp/nucleus) or intersection exclude every token; loosen them, or use union"
            )
        return torch.where(dead[:, None], self._base_rows, out)

    def on_token(self, state: LoopState, tokens: torch.Tensor) -> None:
        if self.drafts:  # a tentative token: the other models see it in verify()
            self._drafted.append(tokens.clone())
            self.stats.draft_steps += 1
            return
        self.stats.other_calls += len(self._sessions)
        if self.trace_on and self._pending is not None:
            self._record(state, tokens)
        for i, sess in enumerate(self._sessions):
            lp = torch.log_softmax(sess.step(tokens).float(), -1)
            self._other_lp[i] = self._fit(lp)
        if self.retrieval is not None:
            self.retrieval.on_token(state, tokens)

    def verify(self, state: LoopState) -> Verdict | None:
        """Hook 6: once enough tokens are drafted, score them with one forward of each other model
        and keep what the speculative-sampling rule accepts."""
        if not self.drafts:
            return None
        n = len(self._drafted)
        if n < min(self.speculative, state.max_tokens - state.confirmed - 1):
            return None  # keep drafting (never past the token budget)
        B, V = state.batch_size, self.lm.tokenizer.vocab_size
        self._state = state
        feed = ([self._unfed] if self._unfed is not None else []) + self._drafted
        for i, sess in enumerate(self._sessions):  # position-major [(n + 1) * B, V] per other model
            lps = [] if self._unfed is not None else [self._other_lp[i]]
            if feed:
                logits = sess.extend(torch.stack(feed, 1)).float()  # one forward over every fed token
                self.stats.other_calls += 1
                lp = self._fit(torch.log_softmax(logits, -1).flatten(0, 1)).view(B, len(feed), V)
                lps += list(lp.unbind(1))
            self._other_lp[i] = torch.cat(lps)
        held = self._held + [(state.rows[:, 0], state.variant_rows(self) if self.prefixes else None, state.rows[:, 0])]
        self._base_in = torch.cat([h[0] for h in held])
        self._rows = torch.cat([h[1] for h in held]) if self.prefixes else None
        self._base_rows = torch.cat([h[2] for h in held])
        p = self._combine(self.formula.root).view(n + 1, B, V)
        q = torch.stack(self._q) if n else None
        drafted = torch.stack(self._drafted) if n else None
        keep, tokens, accepted = accept(state.cfg, state.generators, p, q, drafted, state.finished)
        for sess in self._sessions:  # forget the dropped drafts; the verdict's token is fed next round
            sess.trim(n - keep)
        live = [b for b in range(B) if not state.finished[b]]
        self.stats.rounds += 1
        self.stats.drafted += n * len(live)
        self.stats.accepted += int(accepted[live].sum()) if live else 0
        self._unfed = tokens.clone()
        self._drafted, self._held, self._q = [], [], []
        return Verdict(keep, tokens, p[: keep + 1])

    # evaluation ---------------------------------------------------------------------------
    def source(self, n: Model) -> torch.Tensor:
        if n.model is not None:
            return self._other_lp[self.others.index((n.model, n.prefix))]
        if not n.prefix:
            return self._base_in
        return self._rows[:, self.prefixes.index(n.prefix)]

    def eval(self, n: Node) -> torch.Tensor:
        """[B, V] scores of a node (log-probabilities for terms, unnormalised for sums)."""
        if isinstance(n, Model):
            lp = self.source(n)
            return lp if n.temperature == 1.0 else torch.log_softmax(lp / n.temperature, -1)
        if isinstance(n, Retrieve):
            return self.retrieval.value(n, self._docs)
        if isinstance(n, Const):
            return torch.full_like(self._base_in, n.value)
        if isinstance(n, Sum):  # a nested sum (e.g. a recipe inside a formula) may hold guides too
            total = sum(w for w, t in n.terms if kind(t) in ("model", "operator"))
            div = total if self.formula.mode == "normalized" else 1.0
            s = combine([(w / div, self.eval(t)) for w, t in n.terms if not isinstance(t, Guide)], may_exclude(n))
            for w, t in n.terms:
                if isinstance(t, Guide):
                    s = s + w * self.guide_delta(self._state, t, s)
            return s
        if isinstance(n, Op):
            if n.param is not None:
                return self.filter(n, self.eval(n.args[0]))
            return set_op(n.name, [self.eval(a) if isinstance(a, Const) else torch.log_softmax(self.eval(a), -1) for a in n.args])
        raise UserError(f"{to_string(n)} cannot be evaluated here")

    def filter(self, f: Op, x: torch.Tensor) -> torch.Tensor:
        if f.name == "nucleus":  # the base's nucleus: x's own scale does not matter (normalised later)
            return x.masked_fill(~nucleus_mask(self._base_rows, f.param), NEG_INF)
        lp = torch.log_softmax(x, -1)
        if f.name == "topk":
            return top_k(lp, int(f.param))
        if f.name == "topp":
            return lp.masked_fill(~nucleus_mask(lp, f.param), NEG_INF)
        return torch.log_softmax(lp / f.param, -1)  # temp

    def guide_delta(self, state: LoopState, g: Guide, scores: torch.Tensor) -> torch.Tensor:
        """λ-free guide term: log C(text + candidate) − log C(text) on the k candidates the [B, V]
        ``scores`` rank highest (log-probabilities up to a constant per row), else 0."""
        guide = self.guides[g.name]
        tok = state.tokenizer
        k = min(g.k, scores.shape[-1])
        cand = torch.topk(scores, k, dim=-1).indices
        out = torch.zeros_like(scores)
        texts = []
        for b in range(state.batch_size):
            if state.finished[b]:  # its row is not read: no texts to decode and score
                texts += [""] * (k + 1)
                continue
            head = self._prompt_text[b] if hasattr(self, "_prompt_text") else tok.decode(state.prompt_tokens[b])
            text, extended = tok.continuations(state.generated[b], cand[b].tolist())
            texts += [(head + t)[-TAIL:] for t in (text, *extended)]
        scores = guide.logprob(texts).view(state.batch_size, k + 1)
        out.scatter_(-1, cand, (scores[:, 1:] - scores[:, :1]).to(out.dtype))
        return out

    def _record(self, state: LoopState, tokens: torch.Tensor) -> None:
        pairs, logz, out, base = self._pending
        p = out.exp()
        kl = torch.where(p > 0, p * (out - base), torch.zeros_like(p)).sum(-1)
        for b in range(state.batch_size):
            if state.finished[b]:
                continue
            t = int(tokens[b])
            self.traces[b].append(
                TokenTrace(
                    step=state.step,
                    token=t,
                    text=state.tokenizer.token_text(t),
                    terms=[TermValue(name, w, float(v[b, t])) for name, w, v in pairs],
                    normalizer=float(logz[b]),
                    combined=float(out[b, t]),
                    base=float(base[b, t]),
                    kl=float(kl[b]),
                )
            )
        self._pending = None
