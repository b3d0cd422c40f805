"""The per-token trace of a formula: each top-level term's log-probability of the chosen token,
its effective weight, the normaliser, the combined log-probability and KL(combined ‖ base).

It adds up: combined = Σ weightᵢ·termᵢ − normaliser (guides enter as weight·Δlog C).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table


@dataclass
class TermValue:
    term: str
    weight: float
    logprob: float


@dataclass
class TokenTrace:
    """One chosen token of one prompt."""

    step: int
    token: int
    text: str
    terms: list[TermValue]
    normalizer: float
    combined: float
    base: float  # log-probability of the token under the uncontrolled model
    kl: float  # KL(combined ‖ base) over the whole vocabulary, in nats

    def as_dict(self) -> dict:
        d = asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        for t in d["terms"]:
            if not math.isfinite(t["logprob"]):
                t["logprob"] = None
        return d


def _f(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "-inf"


def render(trace: list[TokenTrace], console: Console) -> None:
    """Print a trace as a table: one row per token, one column per term."""
    if not trace:
        return
    names = [f"{escape(t.term)}\n×{t.weight:.3g}" for t in trace[0].terms]  # texts and tokens are not markup
    table = Table(title="formula trace (log-probabilities of the chosen token)", title_style="bold")
    table.add_column("#", justify="right")
    table.add_column("token")
    for n in names:
        table.add_column(n, justify="right", overflow="fold", max_width=28)
    for n in ("−log Z", "combined", "base", "KL"):
        table.add_column(n, justify="right")
    for r in trace:
        table.add_row(
            str(r.step),
            escape(repr(r.text)),
            *[_f(t.logprob) for t in r.terms],
            _f(-r.normalizer),
            _f(r.combined),
            _f(r.base),
            f"{r.kl:.3f}",
        )
    console.print(table)
    kl = [r.kl for r in trace]
    console.print(f"[dim]mean KL from the base model {sum(kl) / len(kl):.3f} nats over {len(kl)} tokens[/]", highlight=False)


def render_controls(controls: list, console: Console) -> None:
    """Print the trace of every formula control among ``controls`` (first prompt), and the passages
    its R terms retrieved."""
    for c in controls:
        traces, report = getattr(c, "traces", None), getattr(c, "report", None)
        if report is not None:
            weights = escape(", ".join(f"{w.term} ×{w.effective:.4g}" for w in report.weights))
            console.print(f"[dim]formula ({report.formula.mode}): effective weights {weights}[/]", highlight=False)
            for note in report.notes:
                console.print(f"[dim]note: {escape(note)}[/]", highlight=False)
        if traces:
            render(traces[0], console)
        retrieval = getattr(c, "retrieval", None)
        if retrieval is not None:  # which passages R terms used (tokensteer.retrieval)
            from tokensteer.retrieval.trace import render_retrieval

            render_retrieval(retrieval.events, console)
