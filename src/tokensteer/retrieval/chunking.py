"""Split documents into overlapping passages of words, the units that are embedded and retrieved.

A passage holds at most ``size`` words; consecutive passages of a document share ``overlap``
words, so a fact cut by a boundary is whole in one of them. Whitespace inside a passage is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokensteer.errors import UserError
from tokensteer.retrieval.store import Document

SIZE, OVERLAP = 120, 30  # words: a paragraph or two, well inside the model's context beside a prompt
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Chunk:
    """A passage: its document's id and title, its position in that document and its text."""

    doc: str
    title: str
    index: int
    text: str


def windows(text: str, size: int = SIZE, overlap: int = OVERLAP) -> list[str]:
    """The passages of one text: word windows of ``size`` starting every ``size - overlap`` words."""
    if size < 1 or not 0 <= overlap < size:
        raise UserError(f"chunks need size ≥ 1 and 0 ≤ overlap < size, got size={size}, overlap={overlap}")
    spans = [m.span() for m in _WORD.finditer(text)]
    out, start = [], 0
    while start < len(spans):
        end = min(start + size, len(spans))
        out.append(text[spans[start][0] : spans[end - 1][1]])
        if end == len(spans):
            break
        start = end - overlap
    return out


def chunk_documents(docs: list[Document], size: int = SIZE, overlap: int = OVERLAP) -> list[Chunk]:
    """Every document's passages, in document order."""
    return [Chunk(d.id, d.title, i, w) for d in docs for i, w in enumerate(windows(d.text, size, overlap))]
