"""Per-token byte tables of a tokenizer, computed once (through the Tokenizer interface) and cached.

Every constraint works on the raw bytes each token adds to the text, so it sees every tokenization
of a word, byte-fallback tokens included. Building the table decodes each id once (slow on a large
vocabulary); it is kept in memory per tokenizer and on disk under ``$TOKENSTEER_HOME/vocab``.
"""

from __future__ import annotations

import bisect
import hashlib
import weakref
import zipfile
from typing import Iterable

import numpy as np
import torch

from tokensteer.backends.base import Tokenizer
from tokensteer.files import atomic_write
from tokensteer.models import home

FORMAT = 1
#: bytes that make up ASCII words (``\w`` restricted to ASCII); every other byte ends a word
WORD_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
SPACE_BYTES = frozenset(b" \t\n\r\x0b\x0c")
#: the cost of a spelling no tokens can write
NEVER = 1 << 20

_tables: "weakref.WeakKeyDictionary[Tokenizer, TokenTable]" = weakref.WeakKeyDictionary()


def lower_bytes(b: bytes) -> bytes:
    """Lower-case a token's bytes: full Unicode lowering when they are valid UTF-8, ASCII otherwise."""
    try:
        return b.decode("utf-8").lower().encode("utf-8")
    except UnicodeDecodeError:
        return b.lower()


class TokenTable:
    """The bytes of every token and derived tables, shared by all constraints on one tokenizer."""

    def __init__(self, tokens: list[bytes], eos_ids: Iterable[int]) -> None:
        self.tokens = tokens
        self.size = len(tokens)
        self.eos_ids = sorted(i for i in eos_ids if 0 <= i < self.size)
        self.eos = torch.zeros(self.size, dtype=torch.bool)
        self.eos[self.eos_ids] = True
        #: tokens that add no text (control tokens, unused slots) and are not EOS
        self.empty = torch.tensor([not t for t in tokens], dtype=torch.bool) & ~self.eos
        self.lowered = [lower_bytes(t) for t in tokens]
        self._sorted: list[bytes] | None = None
        self._sorted_ids: list[int] = []
        self._by_lower: dict[bytes, list[int]] | None = None
        self._memo: dict = {}

    def memo(self, key, build):
        """Cache a derived table under ``key`` (tables are reused by every constraint and request)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def flags(self, pred) -> torch.Tensor:
        """A bool [V] tensor of ``pred(token_bytes)``."""
        return torch.tensor([bool(pred(t)) for t in self.tokens], dtype=torch.bool)

    def prefix_index(self) -> None:
        """Build (once) the sorted index ``starting_with`` searches and the byte table ``byte_at``
        reads; it takes a moment on a large vocabulary, so constraints that need them build them before decoding."""
        self.memo("lowered-head", self._head)
        if self._sorted is None:
            order = sorted(range(self.size), key=self.lowered.__getitem__)
            self._sorted = [self.lowered[i] for i in order]
            self._sorted_ids = order

    def byte_at(self, ids: np.ndarray, offset: int) -> np.ndarray:
        """The lowered byte at ``offset`` of each token in ``ids`` (-1 past its end), vectorized."""
        lens, head = self.memo("lowered-head", self._head)
        if offset < head.shape[1]:
            out = head[ids, offset].astype(np.int16)
        else:
            out = np.array([self.lowered[i][offset] if len(self.lowered[i]) > offset else 0 for i in ids], np.int16)
        out[lens[ids] <= offset] = -1
        return out

    def _head(self, width: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """Lengths [V] and the first ``width`` lowered bytes [V, width] of every token."""
        lens = np.fromiter(map(len, self.lowered), np.int64, self.size)
        flat = np.frombuffer(b"".join(self.lowered), np.uint8)
        starts = np.cumsum(lens) - lens
        head = np.zeros((self.size, width), np.uint8)
        for j in range(width):
            ok = lens > j
            head[ok, j] = flat[starts[ok] + j]
        return lens, head

    def starting_with(self, prefix: bytes) -> list[int]:
        """Ids of tokens whose lowered bytes start with ``prefix`` (non-empty)."""
        self.prefix_index()
        lo = bisect.bisect_left(self._sorted, prefix)
        hi = bisect.bisect_left(self._sorted, prefix + b"\xff\xff\xff\xff")
        return self._sorted_ids[lo:hi]

    def exactly(self, lowered: bytes) -> list[int]:
        """Ids of tokens whose lowered bytes equal ``lowered``."""
        if self._by_lower is None:
            d: dict[bytes, list[int]] = {}
            for i, t in enumerate(self.lowered):
                if t:
                    d.setdefault(t, []).append(i)
            self._by_lower = d
        return self._by_lower.get(lowered, [])

    def exactly_raw(self, data: bytes) -> list[int]:
        """Ids of tokens whose bytes (not lowered) equal ``data``."""
        if "raw" not in self._memo:
            d: dict[bytes, list[int]] = {}
            for i, t in enumerate(self.tokens):
                if t:
                    d.setdefault(t, []).append(i)
            self._memo["raw"] = d
        return self._memo["raw"].get(data, [])

    def prefixes_of(self, target: bytes) -> list[int]:
        """Ids of tokens whose lowered bytes are a non-empty prefix of ``target``."""
        return [i for k in range(1, len(target) + 1) for i in self.exactly(target[:k])]

    def spell_costs(self, target: bytes, raw: bool = False) -> list[int]:
        """For each offset i, the fewest tokens whose bytes (lowered unless ``raw``) spell exactly
        ``target[i:]`` (``NEVER`` if none do), so constraints can keep a word's spelling in budget."""

        def build() -> list[int]:
            find = self.exactly_raw if raw else self.exactly
            n = len(target)
            cost = [NEVER] * n + [0]
            for i in range(n - 1, -1, -1):
                for k in range(1, n - i + 1):
                    if cost[i + k] < NEVER and find(target[i : i + k]):
                        cost[i] = min(cost[i], cost[i + k] + 1)
            return cost

        return self.memo(("spell-costs", target, raw), build)

    def ids_mask(self, ids: Iterable[int]) -> torch.Tensor:
        m = torch.zeros(self.size, dtype=torch.bool)
        ids = list(ids)
        if ids:
            m[torch.tensor(ids, dtype=torch.long)] = True
        return m


def _fingerprint(tok: Tokenizer) -> str:
    h = hashlib.sha256(f"{FORMAT}|{type(tok).__name__}|{tok.vocab_size}|{sorted(tok.eos_ids)}|{tok.bos_id}".encode())
    for i in range(0, tok.vocab_size, 97):
        h.update(tok.token_bytes(i) + b"\x00")
    return h.hexdigest()[:24]


def _read(path) -> list[bytes] | None:
    try:
        with np.load(path) as z:
            lengths, blob = z["lengths"], z["blob"].tobytes()
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # damaged: token_table rebuilds it
        return None
    if lengths.ndim != 1 or (lengths < 0).any() or int(lengths.sum()) != len(blob):
        return None
    ends = np.cumsum(lengths).tolist()
    starts = [0] + ends[:-1]
    return [blob[a:b] for a, b in zip(starts, ends)]


def write_cache(path, tokens: list[bytes]) -> None:
    """Save a token table's bytes where ``token_table`` reads them back (whole or not at all)."""
    lengths = np.array([len(t) for t in tokens], dtype=np.int32)
    blob = np.frombuffer(b"".join(tokens), dtype=np.uint8)
    atomic_write(path, lambda tmp: np.savez(tmp, lengths=lengths, blob=blob), suffix=".npz", user_error=False)


def forget(tok: Tokenizer) -> None:
    """Drop ``tok``'s table from memory: the next ``token_table`` reads the disk cache again."""
    _tables.pop(tok, None)


def token_table(tok: Tokenizer) -> TokenTable:
    """The TokenTable of ``tok``: from memory, else from the disk cache, else built and cached."""
    table = _tables.get(tok)
    if table is not None:
        return table
    path = home() / "vocab" / f"{_fingerprint(tok)}.npz"
    tokens = _read(path) if path.is_file() else None
    if tokens is None or len(tokens) != tok.vocab_size:
        tokens = []
        for i in range(tok.vocab_size):
            try:
                tokens.append(tok.token_bytes(i))
            except (ValueError, IndexError, KeyError):
                tokens.append(b"")
        try:
            write_cache(path, tokens)
        except OSError:
            pass  # a read-only cache only costs time
    # special tokens write no text, whatever a cache written by an older version says
    special = set(getattr(tok, "special_ids", ())) - set(tok.eos_ids)
    tokens = [b"" if i in special else t for i, t in enumerate(tokens)]
    table = TokenTable(tokens, tok.eos_ids)
    _tables[tok] = table
    return table
