"""The output layer as MKL pre-packed matrices: faster single-row decoding, and 4-8 rows at
little more than the cost of one.

PyTorch's float32 ``linear`` re-packs the [V, H] output matrix on every call once a batch has 4
or more rows: for Gemma 3's 262k-token vocabulary 4 rows cost twice one row here, and the output
layer is about half of a decode step. MKL can pack the matrix once per batch height; we keep a
height-1 packing (plain decoding, ~25 % faster than ``linear`` here) and a height-8 one (4-8 rows,
padded). 2-3 rows and larger inputs (prompts whose every position is scored) use ``linear``.
Each packing is another copy of the matrix (2 × 670 MB for Gemma 3 270M), so only float32
output layers are packed, and ``TOKENSTEER_PACK_HEAD=0`` turns it off.
"""

from __future__ import annotations

import os

import torch

ROWS = 8  # the tallest packing: 4-8 rows cost about the same
HEIGHTS = (1, ROWS)  # one row alone (plain decoding) gets its own packing
MIN_SIZE = 1 << 24  # only worth the extra memory for big output layers (V × H elements)


def mkl_packing_available() -> bool:
    """Whether this PyTorch build has MKL's packed-GEMM ops (CPU builds with MKL do)."""
    try:
        return hasattr(torch.ops.mkl, "_mkl_linear") and torch.backends.mkl.is_available()
    except (AttributeError, RuntimeError):
        return False


class PackedHead(torch.nn.Module):
    """Drop-in replacement for a float32 ``nn.Linear`` output layer (weights stay shared)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        w = linear.weight.detach()
        self.packed = {h: torch.ops.mkl._mkl_reorder_linear_weight(w, h) for h in HEIGHTS}

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.linear.weight

    @property
    def bias(self) -> torch.nn.Parameter | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        if n > ROWS or 1 < n < 4 or x.requires_grad:  # MKL does 2-3 rows well unpacked
            return self.linear(x)
        h = min(k for k in HEIGHTS if k >= n)
        if n < h:
            flat = torch.cat([flat, flat.new_zeros(h - n, flat.shape[1])])
        out = torch.ops.mkl._mkl_linear(flat.contiguous(), self.packed[h], self.linear.weight, self.linear.bias, h)
        return out[:n].view(*x.shape[:-1], -1)


def pack_output_layer(model) -> bool:
    """Swap ``model``'s output layer for a PackedHead when that helps; True if it did."""
    if os.environ.get("TOKENSTEER_PACK_HEAD", "1") == "0":
        return False
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.weight.dtype != torch.float32:
        return False
    if head.weight.numel() < MIN_SIZE or not mkl_packing_available():
        return False
    try:
        packed = PackedHead(head)
    except RuntimeError:  # an MKL without packed GEMM: keep the plain layer
        return False
    model.set_output_embeddings(packed)
    return True
