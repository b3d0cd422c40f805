"""How a tokenizer spells text: the encoder byte-level covers run on, and the dummy prefix space.

Covers need an encoder whose tokens spell the text back byte for byte. Byte-level BPE and Gemma's
SentencePiece do. Llama 2-style SentencePiece writes a dummy "▁" before every text, so its tokens
spell " " + text. Byte-level states then run on " " + text with an encoder that adds no prefix
(``prefix`` = b" ", a byte that is given and never predicted). That encoder encodes a separator
character first and drops its tokens. No token holds the separator with other bytes, so no merge
crosses it. Text that starts with a space is encoded as SentencePiece does ("▁▁…"), even where a
Hugging Face Metaspace pre-tokenizer would not add the prefix.

Tokenizers that change the text in any other way (lowercasing, Unicode or whitespace normalisation)
cannot be inverted byte by byte and are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokensteer.backends.base import Tokenizer

Encoder = Callable[[Sequence[str]], list[list[int]]]

#: texts whose encoding must spell them back byte for byte (after the dummy prefix, if any)
PROBES = ("a", " a  b\n\tc", "Hello, world! Café naïve — 東京 😀 x1234", "  x", "\n", "x ")
#: single-byte control characters tried as the separator that takes the dummy prefix off
SEPARATORS = tuple(chr(c) for c in (*range(1, 9), *range(14, 32), 127))
#: the dummy prefix SentencePiece writes before a text ("▁")
DUMMY = b" "


@dataclass(frozen=True)
class Spelling:
    """``encode`` texts without special tokens or a dummy prefix; ``prefix``: the bytes the
    tokenizer writes before every text (b"" or b" "); ``problem``: why byte-level covers cannot use
    this tokenizer (None when they can)."""

    encode: Encoder
    prefix: bytes = b""
    problem: str | None = None


def make_encoder(tok: Tokenizer) -> Encoder:
    """Encode texts without special tokens, through the Rust tokenizer when there is one."""
    hf = getattr(tok, "hf", None)
    fast = getattr(hf, "backend_tokenizer", None)
    if fast is not None:
        return lambda texts: [fast.encode(t, add_special_tokens=False).ids for t in texts]
    return lambda texts: [tok.encode(t, add_bos=False) for t in texts]


def spelling(tok: Tokenizer, table: Sequence[bytes]) -> Spelling:
    """How ``tok`` spells text, given the bytes of each token (see the module docstring)."""
    raw = make_encoder(tok)
    spell = lambda ids: b"".join(table[i] for i in ids)
    first = spell(raw(["a"])[0])
    if first == b"a":
        return _checked(Spelling(raw), spell)
    if first != DUMMY + b"a":
        return Spelling(raw, problem=f"turns 'a' into {first.decode('utf-8', 'replace')!r} (it normalises text)")
    plain = _without_prefix(raw, table)
    if plain is None:
        return Spelling(raw, DUMMY, "adds a dummy prefix space that cannot be taken off (no control character stands alone in its vocabulary)")
    for s in PROBES:  # the prefix is the only difference from the plain encoder
        if not s.startswith(" ") and raw([s])[0] != plain([" " + s])[0]:
            return Spelling(raw, DUMMY, f"encodes {s!r} other than a dummy prefix space and the text (it normalises text)")
    return _checked(Spelling(plain, DUMMY), spell)


def _checked(sp: Spelling, spell: Callable[[list[int]], bytes]) -> Spelling:
    """``sp`` as it is if its encoder spells every probe back, else with the problem named."""
    for s in PROBES:
        got = spell(sp.encode([s])[0])
        if got != s.encode("utf-8"):
            bad = f"turns {(sp.prefix.decode() + s)!r} into {(sp.prefix + got).decode('utf-8', 'replace')!r}"
            return Spelling(sp.encode, sp.prefix, f"{bad} (it normalises text)")
    return sp


def _without_prefix(raw: Encoder, table: Sequence[bytes]) -> Encoder | None:
    """An encoder that adds no dummy prefix: each text is encoded after a separator that is a token
    of its own and part of no other token, and the tokens up to the separator are dropped."""
    for c in SEPARATORS:
        sep = c.encode()
        if any(sep in b and b != sep for b in table):
            continue
        head = raw([c])[0]
        if not head or b"".join(table[i] for i in head) != DUMMY + sep:
            continue
        k = len(head)
        return lambda texts, c=c, k=k: [ids[k:] for ids in raw([c + t for t in texts])]
    return None
