"""UTF-8 bookkeeping for byte-level text: where a character is still incomplete, which bytes may
come next, and the characters that can complete a partial one."""

from __future__ import annotations

import functools

import torch

#: symbols of a next-byte distribution: bytes 0–255, then END (end of text)
END = 256
N_SYMBOLS = 257


def tail_state(data: bytes) -> int | None:
    """How many bytes of an unfinished last character ``data`` ends with (0: it ends on a character
    boundary), or None when ``data`` is not the start of any valid UTF-8 text."""
    try:
        data.decode("utf-8")
        return 0
    except UnicodeDecodeError as e:
        if e.reason == "unexpected end of data" and e.end == len(data):
            return len(data) - e.start
        return None


def char_length(lead: int) -> int:
    """Bytes in a character that starts with ``lead`` (0 if no character starts with it)."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _continuation_range(partial: bytes) -> tuple[int, int]:
    """The allowed range of the byte after ``partial`` (a lead byte and 0–2 continuation bytes)."""
    if len(partial) == 1:  # the second byte's range depends on the lead (no overlongs, surrogates, > U+10FFFF)
        return {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(partial[0], (0x80, 0xBF))
    return 0x80, 0xBF


@functools.lru_cache(maxsize=64)
def next_byte_mask(partial: bytes) -> torch.Tensor:
    """Bool [257]: the symbols that keep the text valid UTF-8 after ``partial``, the bytes of its
    unfinished last character (b"" at a character boundary, where END is allowed too)."""
    mask = torch.zeros(N_SYMBOLS, dtype=torch.bool)
    if not partial:
        mask[:0x80] = True
        mask[0xC2:0xF5] = True
        mask[END] = True
    else:
        lo, hi = _continuation_range(partial)
        mask[lo : hi + 1] = True
    return mask


@functools.lru_cache(maxsize=256)
def completions(partial: bytes, limit: int) -> list[str]:
    """Up to ``limit`` characters whose UTF-8 starts with ``partial`` (an unfinished character), in
    code-point order (cached: callers must not change the list)."""
    need = char_length(partial[0]) - len(partial) if partial else 0
    out: list[str] = []

    def walk(prefix: bytes, left: int) -> None:
        if len(out) >= limit:
            return
        if left == 0:
            out.append(prefix.decode("utf-8"))
            return
        lo, hi = _continuation_range(prefix)
        for b in range(lo, hi + 1):
            walk(prefix + bytes([b]), left - 1)
            if len(out) >= limit:
                return

    if need > 0 and tail_state(partial) == len(partial):
        walk(partial, need)
    return out
