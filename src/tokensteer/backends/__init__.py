"""Backends behind the decode loop, and the choice between them."""

from __future__ import annotations

from typing import Callable

from tokensteer.backends.base import Backend, Session, Tokenizer
from tokensteer.errors import UserError
from tokensteer.models import ModelSource, ensure_bundled

BACKENDS = ("auto", "torch")

Progress = Callable[[str], None]


def load_backend(
    source: ModelSource,
    name: str = "auto",
    dtype: str = "float32",
    progress: Progress | None = None,
    needs: frozenset[str] = frozenset(),
) -> Backend:
    """Load ``source`` on the named backend (``auto``: the fastest one installed that can load it)."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    from tokensteer.backends.torch import TorchBackend

    if source.bundled:
        source = ModelSource("hf", ensure_bundled(progress), source.name, bundled=True)
    return TorchBackend.load(source, dtype)


__all__ = ["BACKENDS", "Backend", "Session", "Tokenizer", "load_backend"]
