"""Rotary position offsets on cached keys and queries (keys are cached already rotated).

RoPE rotates each pair of dimensions by an angle proportional to the position, so a vector
rotated at position p moves to p + d by one more rotation of d: un-rotating a query for the
selection cache, and re-indexing selected keys onto a compact position range for extrapolation.
"""

from __future__ import annotations

import torch


class Rotary:
    """Relative rotations with one layer type's RoPE frequencies (``rotate_half`` layout)."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq.detach().float().cpu()

    def rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x`` [..., T, D] rotated by ``delta`` positions ([T], or [B, T] for x [B, H, T, D])."""
        freqs = delta.to(torch.float32)[..., None] * self.inv_freq.to(x.device)  # [..., T, D/2]
        if delta.dim() == 2 and x.dim() == 4:
            freqs = freqs[:, None]  # one rotation per row, shared by its heads
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        half = x.shape[-1] // 2
        rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated_half * sin

    @classmethod
    def of(cls, model: torch.nn.Module, layer_type: str | None) -> "Rotary | None":
        """The rotary frequencies ``model`` uses for ``layer_type`` (Gemma 3 keeps one set per
        layer type), or None when the model has no standard rotary module."""
        for m in model.modules():
            freq = getattr(m, f"{layer_type}_inv_freq", None) if layer_type else None
            if freq is None:
                freq = getattr(m, "inv_freq", None)
            if isinstance(freq, torch.Tensor):
                return cls(freq)
        return None
