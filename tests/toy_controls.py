"""Small controls and backend wrappers the tests share."""

from __future__ import annotations

from typing import Callable

import torch

from tokensteer.hooks import Control


class BanToken(Control):
    """Forbids one token id."""

    stages = frozenset({"mask"})

    def __init__(self, token: int) -> None:
        self.token = token

    def mask(self, state):
        m = torch.ones(state.batch_size, state.tokenizer.vocab_size, dtype=torch.bool)
        m[:, self.token] = False
        return m


class Watched:
    """A backend whose every new session is handed to ``watch(session)`` first (to wrap its methods)."""

    def __init__(self, inner, watch: Callable) -> None:
        self.inner, self.watch = inner, watch

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def session(self, *a, **kw):
        s = self.inner.session(*a, **kw)
        self.watch(s)
        return s
