"""Exact byte-level probabilities from tokenized models (Phan et al., ICLR 2025).

    from tokensteer.bytes import ByteState, generate_bytes
    st = ByteState(lm, "The capital of France is Par")
    st.logprobs()[ord("i")]            # log P(next byte = "i"), summed over every tokenization
    generate_bytes(lm, "Thank you very mu", max_tokens=20).text

A prompt may end inside a word, or inside a character; models with different tokenizers combine
byte by byte with a formula (``ByteFormula``). See docs/bytes.md.
"""

from __future__ import annotations

from tokensteer.bytes.ensemble import ByteFormula, check_bytes_formula
from tokensteer.bytes.generate import ByteGeneration, generate_bytes, stream_bytes
from tokensteer.bytes.state import ByteOptions, ByteState, score
from tokensteer.bytes.utf8 import END

__all__ = [
    "END",
    "ByteFormula",
    "ByteGeneration",
    "ByteOptions",
    "ByteState",
    "check_bytes_formula",
    "generate_bytes",
    "score",
    "stream_bytes",
]
