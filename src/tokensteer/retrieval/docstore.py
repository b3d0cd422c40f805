"""A document store ready to search: documents, their passages and a vector index over them.

The index is built on first use, saved under ``$TOKENSTEER_HOME/indexes`` (one file per store
path), reused while the documents, the chunking and the embedding model are unchanged, and rebuilt
when any of them changed. ``open_store`` keeps one store per path in the process, so a server or an
eval run embeds each store once.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokensteer.errors import UserError, expand
from tokensteer.retrieval.chunking import OVERLAP, SIZE, Chunk, chunk_documents
from tokensteer.retrieval.embed import Embed, minilm, minilm_name
from tokensteer.retrieval.index import VectorIndex, load_vectors, save_vectors
from tokensteer.retrieval.store import fingerprint, load_documents


@dataclass(frozen=True)
class Hit:
    """A retrieved passage and its cosine similarity to the query."""

    chunk: Chunk
    score: float


class DocStore:
    """Documents under ``path``, split into passages, searchable by meaning."""

    def __init__(self, path: str | Path, embed: Embed = minilm, model: str | None = None, size: int = SIZE,
                 overlap: int = OVERLAP, index_path: Path | None = None) -> None:
        """``embed``/``model``: another embedding function and the name it is saved under (tests)."""
        if model is None and embed is not minilm:
            raise ValueError("a custom embed function needs a model name for the saved index")
        self.path = str(path)
        self.documents = load_documents(path)
        self.chunks = chunk_documents(self.documents, size, overlap)
        self.embed, self.model = embed, model or minilm_name()
        self.fingerprint = fingerprint(self.documents, size, overlap, self.model)
        self.index_path = index_path or default_index_path(path)
        self.rebuilt: bool | None = None  # once the index is ready: whether it had to be (re)built
        self.saved: bool | None = None  # whether a rebuilt index could be written
        self._index: VectorIndex | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def index(self) -> VectorIndex:
        """The vector index: loaded from its file when still valid, else built and saved."""
        with self._lock:
            if self._index is None:
                vectors = load_vectors(self.index_path, self.fingerprint, self.model)
                self.rebuilt = vectors is None or vectors.shape[0] != len(self.chunks)
                if self.rebuilt:
                    vectors = self.embed([c.text for c in self.chunks])
                    try:
                        save_vectors(self.index_path, vectors, self.fingerprint, self.model)
                        self.saved = True
                    except UserError:  # a read-only cache: search from memory, rebuild next time
                        self.saved = False
                self._index = VectorIndex(vectors)
            return self._index

    def check_k(self, k: int) -> None:
        """Refuse to retrieve more passages than the store holds."""
        if k > len(self.chunks):
            n = len(self.chunks)
            raise UserError(f"cannot retrieve {k} passages: the documents {self.path!r} hold only {n} passage{'s' * (n != 1)}; lower k")

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """The ``k`` passages most similar to each query, best first."""
        self.check_k(k)
        if not queries:
            return []
        scores, ids = self.index.search(self.embed(list(queries)), k)
        return [[Hit(self.chunks[int(i)], float(s)) for s, i in zip(srow, irow)] for srow, irow in zip(scores, ids)]


def default_index_path(path: str | Path) -> Path:
    """``$TOKENSTEER_HOME/indexes/<name>-<hash of the absolute path>.json``."""
    from tokensteer.models import home

    p = expand(path).resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", p.name)[:40] or "docs"
    return home() / "indexes" / f"{slug}-{hashlib.sha256(str(p).encode()).hexdigest()[:12]}.json"


_OPEN: dict[str, DocStore] = {}
_OPEN_LOCK = threading.Lock()


def open_store(path: str | Path) -> DocStore:
    """The store for ``path`` with the default embedding and chunking; the same object while its
    documents are unchanged (each call re-reads them to check)."""
    store = DocStore(path)
    key = str(expand(path).resolve())
    with _OPEN_LOCK:
        old = _OPEN.get(key)
        if old is not None and old.fingerprint == store.fingerprint:
            return old
        _OPEN[key] = store
    return store
