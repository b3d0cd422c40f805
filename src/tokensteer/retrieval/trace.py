"""What ``--trace`` shows of retrieval: which passages each R term used, from which token on, with
their similarity to the query and their weight in the mixture."""

from __future__ import annotations

from dataclasses import asdict

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tokensteer.retrieval.term import Retrieval

EXCERPT = 70  # characters of each passage shown in the table


def as_dicts(events: list[Retrieval], prompt: int = 0) -> list[dict]:
    """The retrievals of one prompt, for ``--json``."""
    return [asdict(e) for e in events if e.prompt == prompt]


def render_retrieval(events: list[Retrieval], console: Console, prompt: int = 0) -> None:
    """One table per retrieval of ``prompt``: passages best first, with similarity and weight."""
    for e in events:
        if e.prompt != prompt:
            continue
        table = Table(title=f"{escape(e.term)}: passages from token {e.step} on", title_style="bold")
        for name, justify in (("#", "right"), ("document", "left"), ("similarity", "right"), ("weight", "right"), ("passage", "left")):
            table.add_column(name, justify=justify, overflow="fold")
        for i, p in enumerate(e.passages, 1):
            text = " ".join(p["text"].split())
            text = text if len(text) <= EXCERPT else text[: EXCERPT - 1] + "…"
            where = p["doc"] + (f" #{p['chunk']}" if p["chunk"] else "")
            table.add_row(str(i), escape(f"{p['title']} ({where})" if p["title"] != p["doc"] else where),
                          f"{p['similarity']:.3f}", f"{p['weight']:.3f}", escape(text))
        console.print(table)
