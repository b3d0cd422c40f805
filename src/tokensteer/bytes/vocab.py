"""A model's vocabulary as byte strings, sorted so the tokens that start with given bytes form one
contiguous range (found by bisection), with a padded byte matrix for vectorised sums by next byte.

Built once per tokenizer and cached. Tokens with no bytes (control tokens) can never be part of a
text; the end-of-text ids are kept apart. ``encode`` and ``prefix`` say how the tokenizer spells
text (``tokensteer.bytes.spelling``: a Llama 2-style dummy prefix space is taken off).
"""

from __future__ import annotations

import bisect
import json
import re
import weakref
import torch

from tokensteer.backends.base import Backend, Tokenizer
from tokensteer.bytes.spelling import spelling
from tokensteer.bytes.utf8 import tail_state
from tokensteer.errors import UserError

_CACHE: "weakref.WeakKeyDictionary[Tokenizer, ByteVocab]" = weakref.WeakKeyDictionary()


def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE (GPT-2): the printable character that stands for each byte, reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(extra))]
    return {chr(c): b for b, c in zip(printable + extra, chars)}


def _hf_table(tok: Tokenizer, n: int) -> list[bytes] | None:
    """Token bytes read straight from a Hugging Face vocabulary (fast), or None if it has none."""
    hf = getattr(tok, "hf", None)
    if hf is None:
        return None
    size = len(hf)
    pieces = hf.convert_ids_to_tokens(list(range(min(n, size))))
    special = set(hf.all_special_ids) | {i for i, a in hf.added_tokens_decoder.items() if a.special}
    added = {i: a.content for i, a in hf.added_tokens_decoder.items() if not a.special}
    table_bl = _gpt2_byte_decoder()
    plain = [p for i, p in enumerate(pieces) if i not in special and i not in added and p is not None]
    byte_level = all(c in table_bl for p in plain[:: max(1, len(plain) // 4000)] for c in p)
    out: list[bytes] = []
    for i in range(n):
        p = pieces[i] if i < len(pieces) else None
        if p is None or i in special:
            out.append(b"")
        elif i in added:
            out.append(added[i].encode("utf-8"))
        elif byte_level and all(c in table_bl for c in p):
            out.append(bytes(table_bl[c] for c in p))
        else:
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", p)
            out.append(bytes([int(m.group(1), 16)]) if m else p.replace("\u2581", " ").encode("utf-8"))
    return out


def token_table(tok: Tokenizer, n: int) -> list[bytes]:
    """The bytes of every token id below ``n``: from the vocabulary when that agrees with
    ``token_bytes`` on a sample of ids, else from ``token_bytes`` for each id (slower)."""
    table = _hf_table(tok, n)
    if table is not None:
        sample = list(range(min(n, 600))) + list(range(600, n, max(1, n // 3000)))
        if all(_agrees(table[i], tok.token_bytes(i)) for i in sample):
            return table
    return [tok.token_bytes(i) for i in range(n)]


def _agrees(piece: bytes, decoded: bytes) -> bool:
    """Whether a vocabulary piece's bytes match a token's decoded bytes: a decoder that strips the
    dummy prefix space (Llama 2's) may drop the first space of a lone "▁…" token."""
    return piece == decoded or (piece[:1] == b" " and piece[1:] == decoded)


class ByteVocab:
    """The byte view of one tokenizer (see the module docstring)."""

    def __init__(self, tok: Tokenizer, width: int) -> None:
        self.tok = tok
        self.width = width  # logits per row (may exceed the tokenizer's vocabulary)
        self.table = token_table(tok, min(width, tok.vocab_size))
        self.table += [b""] * (width - len(self.table))
        spell = spelling(tok, self.table)
        self.encode, self.prefix, self.problem = spell.encode, spell.prefix, spell.problem
        self.eos = sorted(i for i in tok.eos_ids if i < width)
        eos = set(self.eos)
        ids = [i for i, b in enumerate(self.table) if b and i not in eos]
        ids.sort(key=lambda i: self.table[i])
        self.order = torch.tensor(ids, dtype=torch.long)
        self.sorted = [self.table[i] for i in ids]
        self.lens = torch.tensor([len(b) for b in self.sorted], dtype=torch.long)
        self.maxlen = int(self.lens.max())
        mat = bytearray(len(ids) * self.maxlen)
        for k, b in enumerate(self.sorted):
            mat[k * self.maxlen : k * self.maxlen + len(b)] = b
        # byte at each offset, one row per offset: a range of tokens that share their first d bytes
        # is sorted by its byte at offset d, so sums by next byte are differences of a cumulative sum
        self.cols = torch.frombuffer(mat, dtype=torch.uint8).view(len(ids), self.maxlen).t().to(torch.int16).contiguous()
        self.allowed = torch.zeros(width, dtype=torch.bool)
        self.allowed[self.order] = True
        self.banned = torch.nonzero(~self.allowed).flatten()  # control tokens and end of text
        self.banned_all = self.banned  # inside a character: end of text too
        eos_at = torch.zeros(width, dtype=torch.bool)
        eos_at[self.eos] = True
        self.banned = torch.nonzero(~self.allowed & ~eos_at).flatten()  # on a character boundary
        self.first_of_id = torch.full((width,), 256, dtype=torch.long)  # 256: no byte (control tokens, end of text)
        self.first_of_id[self.order] = self.cols[0].long()
        # a dummy prefix: the first token of a text starts with it (the empty text is no tokens)
        unprefixed = self.allowed & (self.first_of_id != self.prefix[0]) if self.prefix else torch.zeros(width, dtype=torch.bool)
        self.banned_first = torch.nonzero((~self.allowed & ~eos_at) | unprefixed).flatten()
        self.start = self._start_tokens()
        self.pure = pure_bpe(tok)
        self._self_ok: dict[int, bool] = {}
        self._follow: dict[bytes, frozenset[int]] = {}
        self.pairs: dict[tuple[int, int], bool] = {}  # canonical token pairs (pure BPE), filled by canon.Checker

    def self_canonical(self, t: int) -> bool:
        """Whether token ``t`` alone is how the tokenizer writes its bytes (cached)."""
        ok = self._self_ok.get(t)
        if ok is None:
            b = self.table[t]
            ok = self._self_ok[t] = tail_state(b) == 0 and self.encode([b.decode("utf-8")])[0] == [t]
        return ok

    def follow_bytes(self, window: bytes) -> set[int]:
        """The bytes that some token has right after a suffix of ``window``: only tokens starting with
        one of them can merge with the window's end."""
        out: set[int] = set()
        for i in range(max(0, len(window) - self.maxlen + 1), len(window)):
            suffix = window[i:]
            got = self._follow.get(suffix)
            if got is None:
                d, (a, b) = len(suffix), self.span(suffix)
                col = self.cols[d, a:b] if a < b and d < self.maxlen else self.cols[0, :0]
                got = self._follow[suffix] = frozenset(col[self.lens[a:b] > d].unique().tolist()) if len(col) else frozenset()
            out |= got
        return out

    def _start_tokens(self) -> list[int]:
        """What every row starts with: the tokenizer's own start (BOS), else an end-of-text token
        (GPT-2's convention), since a row needs at least one token before the text."""
        start = self.tok.encode("", add_bos=True)
        if start:
            return start
        if self.tok.bos_id is not None:
            return [self.tok.bos_id]
        if self.eos:
            return [self.eos[0]]
        raise UserError("byte-level probabilities need a start token (BOS or EOS); this tokenizer has neither")

    def span(self, prefix: bytes, lo: int = 0, hi: int | None = None) -> tuple[int, int]:
        """The range of sorted tokens (within [lo, hi)) whose bytes start with ``prefix``."""
        hi = len(self.sorted) if hi is None else hi
        if not prefix:
            return lo, hi
        a = bisect.bisect_left(self.sorted, prefix, lo, hi)
        end = prefix.rstrip(b"\xff")
        if not end:
            return a, hi
        succ = end[:-1] + bytes([end[-1] + 1])
        return a, bisect.bisect_left(self.sorted, succ, a, hi)

    def spans_boundary(self, text: bytes, p: int) -> bool:
        """Whether some token could cover bytes on both sides of position ``p`` of ``text`` (it
        would start before p and hold byte p): then p is no safe place to fix the tokens before it."""
        for i in range(max(0, p - self.maxlen + 1), p):
            a, b = self.span(text[i : p + 1])
            if a < b:
                return True
        return False


def pure_bpe(tok: Tokenizer) -> bool:
    """Whether the tokenizer is BPE over the whole text (no pre-tokenizer that splits it; Gemma's
    split on " " never matches once spaces are "▁", and Llama 2's Metaspace does not split). Then a
    merge can only cross the end of a text where some token spans it, which lets most
    canonicality checks be skipped."""
    fast = getattr(getattr(tok, "hf", None), "backend_tokenizer", None)
    if fast is not None:
        if type(fast.model).__name__ != "BPE":
            return False
        pre, norm = fast.pre_tokenizer, fast.normalizer
        if pre is None:
            return True
        spec = json.loads(pre.__getstate__())
        if spec.get("type") == "Metaspace":
            return spec.get("split") is False
        replaces = norm is not None and json.loads(norm.__getstate__()) == {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
        return replaces and spec.get("pattern") == {"String": " "}
    # llama.cpp: SentencePiece-style merges, no pre-tokenizer
    return getattr(tok, "vocab_type", None) == "spm"


def byte_vocab(lm: Backend, width: int | None = None) -> ByteVocab:
    """The cached ByteVocab of ``lm``'s tokenizer; refuses tokenizers whose encoding does not spell
    the text back (normalisation), which byte-level covers assume."""
    tok = lm.tokenizer
    v = _CACHE.get(tok)
    if v is None or (width is not None and v.width != width):
        v = ByteVocab(tok, width or tok.vocab_size)
        if v.problem:
            raise UserError(f"byte-level probabilities need a tokenizer that spells text back byte for byte; {lm.model_name}'s {v.problem}")
        _CACHE[tok] = v
    return v
