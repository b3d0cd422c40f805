"""Float32 linear layers as MKL pre-packed matrices: batches of 4-8 rows at little more than the
cost of one, and a faster single row through the output layer.

PyTorch's float32 ``linear`` re-packs the weight matrix on every call once a batch has 4 or more
rows, so 4 rows cost far more than one (formula terms and eval batches are rows). MKL can pack a
matrix once per batch height; we keep a height-8 packing (4-8 rows, padded) of the decoder's linear
layers and of the output layer, plus a height-1 packing of the output layer (Gemma 3's 262k-token
vocabulary: ~25 % faster than ``linear`` for one row). Other heights use ``linear``. Each packing
is another copy of its matrix (output layer 2 × 670 MB, decoder layers ~400 MB for Gemma 3 270M),
so only big float32 layers are packed, only while the copies take at most half of the free memory,
and ``TOKENSTEER_PACK=0`` turns it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ROWS = 8  # the tallest packing: 4-8 rows cost about the same
HEAD_HEIGHTS = (1, ROWS)  # one row alone (plain decoding) gets its own output-layer packing
BODY_HEIGHTS = (ROWS,)  # one row through the decoder's small matrices: linear is as fast
MIN_SIZE = 1 << 24  # only worth the extra memory for big weights (elements: one head, or all decoder linears)


def mkl_packing_available() -> bool:
    """Whether this PyTorch build has MKL's packed-GEMM ops (CPU builds with MKL do)."""
    try:
        return hasattr(torch.ops.mkl, "_mkl_linear") and torch.backends.mkl.is_available()
    except (AttributeError, RuntimeError):
        return False


def packing_enabled() -> bool:
    """Off with ``TOKENSTEER_PACK=0`` (or the older ``TOKENSTEER_PACK_HEAD=0``), or without MKL."""
    off = "0" in (os.environ.get("TOKENSTEER_PACK", "1"), os.environ.get("TOKENSTEER_PACK_HEAD", "1"))
    return not off and mkl_packing_available()


class PackedLinear(torch.nn.Linear):
    """A float32 ``nn.Linear`` that also holds MKL packings of its weight (shared, not copied: same
    parameters, same state-dict keys). Rows without a packing go through plain ``linear``."""

    def __init__(self, linear: torch.nn.Linear, heights: tuple[int, ...] = HEAD_HEIGHTS) -> None:
        if not set(heights) <= {1, ROWS}:
            raise ValueError(f"packings are for 1 or {ROWS} rows, not {heights}")
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        w = linear.weight.detach()
        self.packed = {h: torch.ops.mkl._mkl_reorder_linear_weight(w, h) for h in heights}
        self.single = 1 in self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel() // x.shape[-1]
        # One row without its own packing, 2-3 rows (MKL does them well unpacked), more than ROWS.
        if (n == 1 and not self.single) or 1 < n < 4 or n > ROWS or x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        h = 1 if n == 1 else ROWS
        flat = x.reshape(n, x.shape[-1])
        if n < h:
            flat = torch.cat([flat, flat.new_zeros(h - n, flat.shape[1])])
        out = torch.ops.mkl._mkl_linear(flat.contiguous(), self.packed[h], self.weight, self.bias, h)
        return out[:n].view(*x.shape[:-1], -1)


def free_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _fits_in_memory(elements: int) -> bool:
    """Whether float32 copies of ``elements`` weights take at most half of the available memory."""
    free = free_memory()
    return free is None or 4 * elements <= free // 2


def _packable(m: torch.nn.Module) -> bool:
    return type(m) is torch.nn.Linear and m.weight.dtype == torch.float32


def pack_output_layer(model) -> bool:
    """Swap ``model``'s output layer for a PackedLinear when that helps; True if it did."""
    head = model.get_output_embeddings()
    if not packing_enabled() or not _packable(head) or head.weight.numel() < MIN_SIZE:
        return False
    if not _fits_in_memory(len(HEAD_HEIGHTS) * head.weight.numel()):
        return False
    try:
        packed = PackedLinear(head, HEAD_HEIGHTS)
    except RuntimeError:  # an MKL without packed GEMM: keep the plain layer
        return False
    model.set_output_embeddings(packed)
    return True


def pack_decoder_layers(layers: torch.nn.ModuleList) -> int:
    """Swap every float32 ``nn.Linear`` inside the decoder layers for a PackedLinear, when they are
    big enough in all to be worth a copy; returns how many were swapped."""
    if not packing_enabled():
        return 0
    found = [(parent, name, child) for layer in layers for parent in layer.modules()
             for name, child in parent.named_children() if _packable(child)]
    size = sum(c.weight.numel() for _, _, c in found)
    if size < MIN_SIZE or not _fits_in_memory(len(BODY_HEIGHTS) * size):
        return 0
    try:
        swaps = [(parent, name, PackedLinear(child, BODY_HEIGHTS)) for parent, name, child in found]
    except RuntimeError:
        return 0
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    return len(swaps)
