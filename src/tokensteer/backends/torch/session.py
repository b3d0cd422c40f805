"""A torch session: the rows of one batch in a transformers DynamicCache, left-padded when ragged."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from tokensteer.backends.base import Session
from tokensteer.errors import UserError
from tokensteer.hooks import EditContext, ResidualEdit

if TYPE_CHECKING:
    from tokensteer.backends.torch.backend import TorchBackend


class TorchSession(Session):
    """Rows of one generate call with a transformers DynamicCache; left padding for ragged prompts."""

    def __init__(
        self, backend: TorchBackend, edits: Sequence[ResidualEdit], rollback: bool = False, mix: torch.Tensor | None = None
    ) -> None:
        from transformers import DynamicCache

        self.b = backend
        self.mix = None if mix is None else mix.detach().float()
        self.edits: dict[int, list[ResidualEdit]] = {}
        for e in edits:
            self.edits.setdefault(e.layer, []).append(e)
        # With rollback, no config: every layer keeps its whole history (sliding-window layers are
        # masked instead of dropping old cells), so trim() can roll back any number of tokens.
        # Otherwise the model's own cache layout (sliding layers keep only their window): faster.
        self.cache = DynamicCache() if rollback else DynamicCache(config=backend.model.config)
        self.rollback = rollback
        self.window = getattr(backend.model.config.get_text_config(), "sliding_window", None) or 1 << 62
        self.mask: torch.Tensor | None = None  # [N, L] only when rows are padded
        self.pos: torch.Tensor | None = None  # [N] next position of each row
        self.n_rows = 0

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, phase: str) -> torch.Tensor:
        """Run ``ids`` [N, T] through the model; return the [N, T', V] float logits of the last
        T' = 1 (prefill) or T (decode) positions."""
        b = self.b
        with b._lock:
            b._edits, b._ctx, b._mix = self.edits, EditContext(phase, self.n_rows), self.mix
            try:
                out = b.model(
                    input_ids=ids,
                    attention_mask=self.mask,
                    position_ids=positions,
                    past_key_values=self.cache,
                    use_cache=True,
                    logits_to_keep=1 if phase == "prefill" else ids.shape[1],
                )
            finally:
                b._edits, b._mix = {}, None
        return out.logits.float()

    def prefill(self, rows: list[list[int]]) -> torch.Tensor:
        if not rows or any(len(r) == 0 for r in rows):
            raise UserError("every prompt needs at least one token")
        self.n_rows = len(rows)
        width = max(len(r) for r in rows)
        pad = self.b.tokenizer.pad_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        self.mask = mask if bool((mask == 0).any()) else None
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.pos = positions[:, -1] + 1
        return self._forward(ids, positions, "prefill")[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.n_rows, 1)], dim=1)
        positions = self.pos[:, None]
        self.pos = self.pos + 1
        return self._forward(tokens.view(-1, 1), positions, "decode")[:, -1]

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """k tokens per row in one forward pass: [N, k] -> [N, k, V] logits."""
        k = tokens.shape[1]
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.n_rows, k)], dim=1)
        positions = self.pos[:, None] + torch.arange(k)
        self.pos = self.pos + k
        return self._forward(tokens, positions, "decode")

    def trim(self, n: int) -> None:
        if n <= 0:
            return
        if n > int(self.pos.min()):
            raise ValueError(f"cannot trim {n} tokens from a row of {int(self.pos.min())}")
        if not self.rollback and int(self.pos.max()) > self.window:
            raise ValueError("this session's sliding-window layers have dropped old cells; open it with rollback=True")
        self.cache.crop(-n)  # transformers 5: a negative count removes that many tokens
        self.pos = self.pos - n
        if self.mask is not None:
            self.mask = self.mask[:, :-n]

    def select(self, rows: Sequence[int]) -> None:
        idx = torch.tensor(list(rows), dtype=torch.long)
        self.cache.reorder_cache(idx)
        self.pos = self.pos[idx]
        if self.mask is not None:
            self.mask = self.mask[idx]
        self.n_rows = len(idx)
