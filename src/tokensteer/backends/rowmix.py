"""Which rows of a session reach the output layer as linear combinations of their group's rows.

A formula that reads its rows only as weighted sums asks for them (``Control.row_mix``): every
group of R consecutive rows of its request becomes R' combinations before the output layer (the
layer is linear, so that equals combining their logits, at the cost of R' rows instead of R).
Requests with different mixes, or none, share one session: the mix is kept per segment of rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class RowMix:
    """Segments of a session's rows in order, each ``[mix [R', R] or None, n_rows]``."""

    def __init__(self) -> None:
        self.segments: list[list] = []

    @classmethod
    def of(cls, mix: torch.Tensor | None, n_rows: int) -> "RowMix":
        m = cls()
        m.add(mix, n_rows)
        return m

    def add(self, mix: torch.Tensor | None, n_rows: int) -> None:
        if mix is not None and n_rows % mix.shape[1]:
            raise ValueError(f"{n_rows} rows do not split into groups of {mix.shape[1]}")
        self.segments.append([None if mix is None else mix.detach().float(), n_rows])

    @property
    def mixes(self) -> bool:
        """Whether any row is mixed."""
        return any(m is not None for m, _ in self.segments)

    def rows_out(self) -> int:
        return sum(n if m is None else n // m.shape[1] * m.shape[0] for m, n in self.segments)

    def select(self, rows: Sequence[int]) -> None:
        """Keep these rows (whole groups, in order), as ``Session.select`` does."""
        owner = [i for i, (_, n) in enumerate(self.segments) for _ in range(n)]
        out: list[list] = []
        last = None
        for r in rows:
            s = owner[r]
            if s == last:
                out[-1][1] += 1
            else:
                out.append([self.segments[s][0], 1])
                last = s
        self.segments = out

    def apply(self, x):
        """[N, ...] rows (torch or numpy) -> [N', ...]: each mixed group replaced by its combinations."""
        if not self.mixes:
            return x
        parts, i = [], 0
        for m, n in self.segments:
            part = x[i : i + n]
            i += n
            if m is None:
                parts.append(part)
                continue
            R = m.shape[1]
            if isinstance(part, np.ndarray):
                mixed = np.einsum("or,gr...->go...", m.numpy(), part.reshape(-1, R, *part.shape[1:]))
            else:
                mixed = torch.einsum("or,gr...->go...", m.to(part.dtype), part.reshape(-1, R, *part.shape[1:]))
            parts.append(mixed.reshape(-1, *part.shape[1:]))
        return np.concatenate(parts) if isinstance(x, np.ndarray) else torch.cat(parts)
