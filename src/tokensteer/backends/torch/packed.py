"""Float32 linear layers as MKL pre-packed matrices: batches of up to 8 rows at little more than the
cost of one, and a faster single row through the output layer.

PyTorch's float32 ``linear`` re-packs the weight matrix on every call once a batch has 4 or more
rows, so 4 rows cost far more than one (formula terms and eval batches are rows). MKL can pack a
matrix once per batch height, and a snug packing beats a padded one. We keep height-4 (3-4 rows)
and height-8 (5-8 rows) packings of the decoder's linear layers and of the output layer, plus a
height-1 packing of the output layer (one row through Gemma 3's 262k-token vocabulary is faster
than with ``linear``). Two rows through the output layer pad to height 4, which beats ``linear``;
through the decoder's small matrices they use ``linear``, as do more than eight rows. Each packing
is another copy of its matrix (the output layer three times, the decoder layers twice), so only
big float32 layers are packed, only while the
copies take at most half of the free memory (the most useful heights first), and
``TOKENSTEER_PACK=0`` turns it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ROWS = 8  # the tallest packing
HEIGHTS = (1, 4, ROWS)  # the packings a layer may hold
# Most useful first: when memory is short, a layer gets the packings that fit, in this order.
HEAD_HEIGHTS = (1, ROWS, 4)  # the output layer: plain decoding first, then batches
BODY_HEIGHTS = (ROWS, 4)  # the decoder's small matrices: linear is as fast for one or two rows
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

    def __init__(self, linear: torch.nn.Linear, heights: tuple[int, ...] = HEAD_HEIGHTS, pad_two: bool = False) -> None:
        if not set(heights) <= set(HEIGHTS):
            raise ValueError(f"packings are for {HEIGHTS} rows, not {heights}")
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.pad_two = pad_two  # two rows padded to a taller packing rather than plain ``linear``
        w = linear.weight.detach()
        self.packed = {h: torch.ops.mkl._mkl_reorder_linear_weight(w, h) for h in sorted(heights)}

    def height(self, n: int) -> int | None:
        """The packing ``n`` rows use, or None for plain ``linear``: one row only its own packing
        (padding it costs more than ``linear``), two rows none unless ``pad_two``, more rows the
        snuggest one."""
        if n == 1 or (n == 2 and not self.pad_two):
            return n if n in self.packed else None
        return next((h for h in self.packed if h >= n), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel() // x.shape[-1]
        h = None if x.requires_grad else self.height(n)
        if h is None:
            return F.linear(x, self.weight, self.bias)
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


def heights_that_fit(heights: tuple[int, ...], elements: int) -> tuple[int, ...]:
    """The first of ``heights`` whose float32 copies of ``elements`` weights each, all together,
    take at most half of the available memory."""
    free = free_memory()
    fit = len(heights) if free is None else (free // 2) // max(4 * elements, 1)
    return heights[:fit]


def _packable(m: torch.nn.Module) -> bool:
    return type(m) is torch.nn.Linear and m.weight.dtype == torch.float32


def pack_output_layer(model) -> bool:
    """Swap ``model``'s output layer for a PackedLinear when that helps; True if it did."""
    head = model.get_output_embeddings()
    if not packing_enabled() or not _packable(head) or head.weight.numel() < MIN_SIZE:
        return False
    heights = heights_that_fit(HEAD_HEIGHTS, head.weight.numel())
    if not heights:
        return False
    try:
        packed = PackedLinear(head, heights, pad_two=True)
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
    heights = heights_that_fit(BODY_HEIGHTS, size)
    if size < MIN_SIZE or not heights:
        return 0
    try:
        swaps = [(parent, name, PackedLinear(child, heights)) for parent, name, child in found]
    except RuntimeError:
        return 0
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    return len(swaps)
