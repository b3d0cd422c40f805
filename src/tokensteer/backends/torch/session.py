"""A torch session: rows in one transformers DynamicCache, left-padded where their lengths differ.

Rows join a running session by being prefilled in a cache of their own, which is then merged in:
both caches are padded on the left to the same length (pad cells are masked) and stacked. When
rows leave, columns that only pad the remaining rows are cut, so the cache stays as long as its
longest live row. Additive edits may be given per row (``add``): differently steered rows share
the forward pass, each with its own vector, and rows without one add zeros (exactly nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from tokensteer.backends.base import Session
from tokensteer.backends.rowmix import RowMix
from tokensteer.errors import UserError
from tokensteer.hooks import ResidualEdit

if TYPE_CHECKING:
    from tokensteer.backends.torch.backend import TorchBackend

PHASES = ("prefill", "decode")


class TorchSession(Session):
    """Rows with a DynamicCache; see the module doc."""

    def __init__(
        self, backend: TorchBackend, edits: Sequence[ResidualEdit], rollback: bool = False, mix: torch.Tensor | None = None
    ) -> None:
        self.b = backend
        self.first_mix = mix  # the mix of rows added without one of their own (``prefill``)
        self.mix = RowMix()  # which rows reach the output layer mixed (see ``rowmix``)
        self.edits: dict[int, list[ResidualEdit]] = {}  # session-wide edits, by layer
        for e in edits:
            self.edits.setdefault(e.layer, []).append(e)
        self.row_vectors: dict[tuple[int, str], torch.Tensor] = {}  # (layer, phase) -> [N, H] per-row vectors
        # With rollback, no config: every layer keeps its whole history (sliding-window layers are
        # masked instead of dropping old cells), so trim() can roll back any number of tokens.
        # Otherwise the model's own cache layout (sliding layers keep only their window): faster.
        self.rollback = rollback
        self.window = getattr(backend.model.config.get_text_config(), "sliding_window", None) or 1 << 62
        self.cache = self._new_cache()
        self.mask: torch.Tensor | None = None  # [N, L] only when rows are padded
        self.pos = torch.zeros(0, dtype=torch.long)  # [N] next position of each row

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache() if self.rollback else DynamicCache(config=self.b.model.config)

    @property
    def n_rows(self) -> int:
        return int(self.pos.shape[0])

    def _layer_edits(self, phase: str, rows: slice | None = None) -> dict[int, list[ResidualEdit]]:
        """Session-wide edits plus this phase's per-row vectors (of ``rows`` only, when given)."""
        out = {k: list(v) for k, v in self.edits.items()}
        for (layer, ph), v in self.row_vectors.items():
            if ph == phase:
                out.setdefault(layer, []).append(ResidualEdit(layer, vector=v if rows is None else v[rows]))
        return out

    def _forward(self, ids, mask, positions, cache, phase: str, keep: int, rows: slice | None = None, mix: RowMix | None = None) -> torch.Tensor:
        return self.b.forward(ids, mask, positions, cache, self._layer_edits(phase, rows), phase, mix or self.mix, keep)

    # -- rows in ----------------------------------------------------------------------------
    def prefill(self, rows: list[list[int]]) -> torch.Tensor:
        self.cache, self.mask, self.pos, self.row_vectors = self._new_cache(), None, torch.zeros(0, dtype=torch.long), {}
        self.mix = RowMix()
        return self.add(rows, mix=self.first_mix)

    def add(self, rows: list[list[int]], edits: Sequence[ResidualEdit] = (), mix: torch.Tensor | None = None) -> torch.Tensor:
        if not rows or any(len(r) == 0 for r in rows):
            raise UserError("every prompt needs at least one token")
        n, old = len(rows), self.n_rows
        vectors = self._vectors(edits, n)
        width = max(len(r) for r in rows)
        pad = self.b.tokenizer.pad_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache() if old else self.cache
        for key, v in vectors.items():  # the new rows' vectors, at the end of each [N, H] table
            self.row_vectors[key] = torch.cat([self._table(key, old), v])
        for key in self.row_vectors.keys() - vectors.keys():
            self.row_vectors[key] = torch.cat([self.row_vectors[key], self.row_vectors[key].new_zeros(n, self.b.hidden_size)])
        try:
            logits = self._forward(ids, mask if bool((mask == 0).any()) else None, positions, cache, "prefill", 1, slice(old, old + n), RowMix.of(mix, n))[:, -1]
        except BaseException:
            for key in list(self.row_vectors):
                self.row_vectors[key] = self.row_vectors[key][:old]
            raise
        if old:
            self._merge(cache, mask)
        else:
            self.mask = mask if bool((mask == 0).any()) else None
        self.pos = torch.cat([self.pos, positions[:, -1] + 1])
        self.mix.add(mix, n)
        return logits

    def _table(self, key: tuple[int, str], n: int) -> torch.Tensor:
        return self.row_vectors.get(key, torch.zeros(n, self.b.hidden_size, dtype=self.b.dtype))

    def _vectors(self, edits: Sequence[ResidualEdit], n: int) -> dict[tuple[int, str], torch.Tensor]:
        """Per-row edits as [n, H] vectors by (layer, phase)."""
        out: dict[tuple[int, str], torch.Tensor] = {}
        for e in edits:
            if e.vector is None:
                raise UserError("only additive edits can be given per row")
            v = e.vector.detach().to(self.b.dtype)
            v = v.expand(n, -1) if v.dim() == 1 else v
            if v.shape != (n, self.b.hidden_size):
                raise UserError(f"per-row edits of shape {tuple(v.shape)} for {n} rows of hidden size {self.b.hidden_size}")
            phases = PHASES if e.positions == "all" else ("prefill",) if e.positions == "prompt" else ("decode",)
            for ph in phases:
                out[(e.layer, ph)] = out.get((e.layer, ph), 0) + v
        return out

    def _merge(self, new, new_mask: torch.Tensor) -> None:
        """Stack the new rows' cache under the live one, both left-padded to the same length."""
        old_len, new_len = self.cache.get_seq_length(), new.get_seq_length()
        length = max(old_len, new_len)
        for mine, theirs in zip(self.cache.layers, new.layers):
            if getattr(mine, "keys", None) is None or getattr(theirs, "keys", None) is None:
                continue
            stored = min(length, mine.sliding_window - 1) if getattr(mine, "is_sliding", False) else length
            mine.keys = torch.cat([_left_pad(mine.keys, stored), _left_pad(theirs.keys, stored)])
            mine.values = torch.cat([_left_pad(mine.values, stored), _left_pad(theirs.values, stored)])
            if hasattr(mine, "cumulative_length"):
                mine.cumulative_length = length
        old_mask = self.mask if self.mask is not None else torch.ones(self.n_rows, old_len, dtype=torch.long)
        mask = torch.cat([_left_pad(old_mask, length, dim=1), _left_pad(new_mask, length, dim=1)])
        self.mask = mask if bool((mask == 0).any()) else None

    # -- steps ------------------------------------------------------------------------------
    def _grow_mask(self, k: int) -> None:
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.n_rows, k)], dim=1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[0] != self.n_rows:
            raise ValueError(f"step got {tokens.shape[0]} tokens for {self.n_rows} rows")
        self._grow_mask(1)
        positions = self.pos[:, None]
        self.pos = self.pos + 1
        return self._forward(tokens.view(-1, 1), self.mask, positions, self.cache, "decode", 1)[:, -1]

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """k tokens per row in one forward pass: [N, k] -> [N, k, V] logits."""
        k = tokens.shape[1]
        self._grow_mask(k)
        positions = self.pos[:, None] + torch.arange(k)
        self.pos = self.pos + k
        return self._forward(tokens, self.mask, positions, self.cache, "decode", k)

    # -- rows out ---------------------------------------------------------------------------
    def trim(self, n: int) -> None:
        if n <= 0:
            return
        if n > int(self.pos.min()):
            raise ValueError(f"cannot trim {n} tokens from a row of {int(self.pos.min())}")
        if not self.rollback and self.cache.get_seq_length() > self.window:
            raise ValueError("this session's sliding-window layers have dropped old cells; open it with rollback=True")
        self.cache.crop(-n)  # transformers 5: a negative count removes that many tokens
        self.pos = self.pos - n
        if self.mask is not None:
            self.mask = self.mask[:, :-n]

    def select(self, rows: Sequence[int]) -> None:
        if not rows:  # every row leaves: start over empty
            self.cache, self.mask, self.pos, self.row_vectors, self.mix = self._new_cache(), None, torch.zeros(0, dtype=torch.long), {}, RowMix()
            return
        idx = torch.tensor(list(rows), dtype=torch.long)
        self.cache.reorder_cache(idx)
        self.pos = self.pos[idx]
        self.row_vectors = {k: v[idx] for k, v in self.row_vectors.items()}
        self.mix.select(list(rows))
        if self.mask is not None:
            self.mask = self.mask[idx]
            self._cut_padding()

    def _cut_padding(self) -> None:
        """Drop leading columns that pad every remaining row (none of them attends there)."""
        used = self.mask.any(dim=0).nonzero()
        cut = int(used[0]) if len(used) else 0
        if cut and not self.rollback:
            length = self.cache.get_seq_length()
            for layer in self.cache.layers:
                if getattr(layer, "keys", None) is None:
                    continue
                stored = layer.keys.shape[-2]
                drop = cut if not getattr(layer, "is_sliding", False) else max(0, stored - min(stored, length - cut))
                layer.keys, layer.values = layer.keys[..., drop:, :], layer.values[..., drop:, :]
                if hasattr(layer, "cumulative_length"):
                    layer.cumulative_length = length - cut
            self.mask = self.mask[:, cut:]
        if bool(self.mask.all()):
            self.mask = None

    def close(self) -> None:
        self.cache, self.row_vectors = None, {}


def _left_pad(x: torch.Tensor, length: int, dim: int = -2) -> torch.Tensor:
    """``x`` padded with zeros on the left of ``dim`` to ``length``."""
    have = x.shape[dim]
    if have >= length:
        return x.narrow(dim, have - length, length) if have > length else x
    shape = list(x.shape)
    shape[dim] = length - have
    return torch.cat([x.new_zeros(shape), x], dim=dim)
