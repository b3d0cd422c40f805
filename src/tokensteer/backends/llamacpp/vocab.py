"""llama.cpp's own tokenizer behind the loop's Tokenizer interface.

Encoding adds BOS as the model asks (Gemma adds ``<bos>``, like the Hugging Face tokenizer) and
parses special tokens written in the text; decoding joins cached token bytes, drops control tokens
(like ``skip_special_tokens=True``) and shows incomplete UTF-8 as U+FFFD, so the loop can wait.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import llama_cpp

from tokensteer.backends.base import MARKER, Tokenizer
from tokensteer.errors import UserError

#: llama.cpp's ``enum llama_vocab_type``, by name
VOCAB_TYPES = {
    int(getattr(llama_cpp, f"LLAMA_VOCAB_TYPE_{n.upper()}")): n
    for n in ("none", "spm", "bpe", "wpm", "ugm", "rwkv", "plamo2")
    if hasattr(llama_cpp, f"LLAMA_VOCAB_TYPE_{n.upper()}")
}


class LlamaTokenizer(Tokenizer):
    """Tokenize and detokenize with the vocabulary stored in the GGUF file."""

    def __init__(self, vocab, owner=None) -> None:
        self._vocab = vocab
        self._owner = owner  # the backend that owns the model: kept alive while this tokenizer is
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(vocab))
        bos = int(llama_cpp.llama_vocab_bos(vocab))
        self.bos_id = bos if bos >= 0 else None
        self.eos_ids = frozenset(t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, t))
        self._pieces: dict[int, bytes] = {}
        self._special: frozenset[int] | None = None

    @property
    def vocab_type(self) -> str:
        """The tokenizer's algorithm as llama.cpp names it: "spm" (SentencePiece-style BPE with byte
        fallback), "bpe" (byte-level BPE), "wpm", "ugm", "rwkv", "plamo2", or "none"."""
        self._check_open()
        return VOCAB_TYPES.get(int(llama_cpp.llama_vocab_type(self._vocab)), "none")

    @property
    def special_ids(self) -> frozenset[int]:
        """Tokens that write no text (see ``Tokenizer.special_ids``), found on first use."""
        if self._special is None:
            self._special = frozenset(t for t in range(self.vocab_size) if self._writes_no_text(t))
        return self._special

    def _writes_no_text(self, t: int) -> bool:
        attr = int(llama_cpp.llama_vocab_get_attr(self._vocab, t))
        if attr & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNUSED | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN):
            return True
        return bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED) and bool(MARKER.match(self.piece(t).decode("utf-8", "replace")))

    def _check_open(self) -> None:
        """llama.cpp would read freed memory once the model is closed: refuse instead."""
        if self._owner is not None and not self._owner.is_open:
            raise UserError("this llama.cpp model was closed; load it again")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        self._check_open()
        data = text.encode("utf-8")
        n_max = len(data) + 8
        out = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), out, n_max, add_bos, True)
        if n < 0:  # the buffer was too small: -n is the size it needs
            n_max = -n
            out = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), out, n_max, add_bos, True)
        return list(out[:n])

    def piece(self, token_id: int) -> bytes:
        """The bytes of one token; empty for control tokens such as ``<bos>`` and ``<eos>``."""
        p = self._pieces.get(token_id)
        if p is None:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (0–{self.vocab_size - 1})")
            self._check_open()
            buf = ctypes.create_string_buffer(256)  # one per call: ctypes releases the GIL, threads may meet here
            n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, False)
            p = buf.raw[:n]
            self._pieces[token_id] = p
        return p

    def token_bytes(self, token_id: int) -> bytes:
        """llama.cpp knows each token's raw bytes (byte-fallback tokens included); special ones write none."""
        return b"" if token_id in self.special_ids else self.piece(token_id)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        if not skip_special:
            return b"".join(self._rendered(int(i)) for i in ids).decode("utf-8", errors="replace")
        return b"".join(self.piece(int(i)) for i in ids if i not in self.special_ids).decode("utf-8", errors="replace")

    def _rendered(self, t: int) -> bytes:
        """A token's text with control tokens shown (``<bos>``)."""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self._vocab, t, buf, len(buf), 0, True)
        return buf.raw[:n] if n >= 0 else self.piece(t)
