"""The vector index: unit-length passage embeddings searched by inner product (cosine).

Search runs in faiss (``IndexFlatIP``: exact, multi-threaded) when faiss-cpu is installed, else in
numpy, which scans every passage per query the same way and is meant for tiny stores. The saved
index is one JSON file (written atomically) holding the documents' fingerprint, the embedding
model's name and the vectors; it is reused only while both still match.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

FORMAT = 1


class VectorIndex:
    """Exact top-k inner-product search over [N, d] float32 vectors."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.engine = "numpy"
        self._faiss = None
        try:
            import faiss
        except ImportError:
            return
        self._faiss = faiss.IndexFlatIP(self.vectors.shape[1])
        self._faiss.add(self.vectors)
        self.engine = "faiss"

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """([M, k] similarities, [M, k] passage numbers), best first; k is capped at the store's size."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self))
        if self._faiss is not None:
            return self._faiss.search(q, k)
        sims = q @ self.vectors.T
        ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, ids, 1), ids


def save_vectors(path: Path, vectors: np.ndarray, fingerprint: str, model: str) -> None:
    """Write the index file atomically (a reader sees the old file or the new one, never half)."""
    from tokensteer.files import atomic_write

    v = np.ascontiguousarray(vectors, dtype="<f4")
    meta = {"format": FORMAT, "fingerprint": fingerprint, "model": model, "shape": list(v.shape),
            "vectors": base64.b64encode(v.tobytes()).decode("ascii")}
    atomic_write(path, json.dumps(meta))


def load_vectors(path: Path, fingerprint: str, model: str) -> np.ndarray | None:
    """The saved vectors when the file exists, is whole and matches ``fingerprint`` and ``model``."""
    try:
        meta = json.loads(path.read_text("utf-8"))
        if meta.get("format") != FORMAT or meta.get("fingerprint") != fingerprint or meta.get("model") != model:
            return None
        n, d = meta["shape"]
        v = np.frombuffer(base64.b64decode(meta["vectors"]), dtype="<f4")
        return v.reshape(n, d).astype(np.float32) if v.size == n * d else None
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or damaged: rebuild it
        return None
