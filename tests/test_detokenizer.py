"""The engine's incremental detokeniser: pushing ids one at a time gives exactly what decoding the
whole sequence at every push gives (the text, where stop strings cut it, what is held back)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokensteer as ts
from tokensteer.engine.events import Detokenizer


class WholeDecoding(Detokenizer):
    """The reference: the same hold-back rules over the whole sequence decoded at every push."""

    def text_of(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special=self.skip_special)


def pushes(d: Detokenizer, ids: list[int], finals: list[bool]) -> list[tuple[str, bool]]:
    out = []
    for n, final in zip(range(1, len(ids) + 1), finals):
        out.append(d.push(ids[:n], final))
        if out[-1][1]:
            break
    return out


@pytest.fixture(scope="module")
def tokenizers(tiny):
    """The tiny model's Hugging Face tokenizer and the bundled model's llama.cpp vocabulary."""
    return {"hf": tiny.tokenizer, "llamacpp": ts.load(None, backend="llamacpp").tokenizer}


# ids that stress the window: byte-fallback pieces (multi-byte characters split over tokens),
# special tokens, spaces, common words; plus any id at all
TRICKY = [0, 1, 2, 3, 106, 107, 255968, 236743, 236764, 236761, 107, 108] + list(range(238, 260)) + list(range(1000, 1010))
ids_st = st.lists(st.one_of(st.sampled_from(TRICKY), st.integers(0, 262143)), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=ids_st, data=st.data(), skip=st.booleans(), which=st.sampled_from(["hf", "llamacpp"]))
def test_incremental_text_equals_full_decode(tokenizers, ids, data, skip, which):
    tok = tokenizers[which]
    whole = tok.decode(ids, skip_special=skip)
    # stop strings: pieces of the text itself (so they are hit), or unrelated ones
    stops = data.draw(st.lists(st.one_of(
        st.builds(lambda a, n: whole[a : a + n], st.integers(0, max(0, len(whole) - 1)), st.integers(1, 4)),
        st.sampled_from(["\n", "the", "zzz", "é"])), max_size=2))
    stops = [s for s in stops if s]
    finals = [False] * (len(ids) - 1) + [True]
    assert pushes(Detokenizer(tok, stops, skip), ids, finals) == pushes(WholeDecoding(tok, stops, skip), ids, finals)


def test_no_stops_concatenates_to_the_whole_text(tokenizers):
    tok = tokenizers["llamacpp"]
    ids = tok.encode("Grüße aus Köln — 東京 🙂 and a long tail of ordinary words " * 20, add_bos=False)
    d = Detokenizer(tok, [])
    text = "".join(d.push(ids[:n], n == len(ids))[0] for n in range(1, len(ids) + 1))
    assert text == tok.decode(ids)
    assert d.start > len(ids) - 5  # the window moved along: later pushes decode a few ids only


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=ids_st, cands=st.lists(st.one_of(st.sampled_from(TRICKY), st.integers(0, 262143)), min_size=1, max_size=8),
       which=st.sampled_from(["hf", "llamacpp"]))
def test_continuations_equal_decoding_each_extended_sequence(tokenizers, ids, cands, which):
    """A guide's candidate texts decode only a window of the newest ids; each equals decoding the
    whole sequence with the candidate (byte-fallback pieces and special tokens included)."""
    tok = tokenizers[which]
    cands = [c % tok.vocab_size for c in cands]
    ids = [i % tok.vocab_size for i in ids]
    text, extended = tok.continuations(ids, cands)
    assert text == tok.decode(ids)
    assert extended == [tok.decode([*ids, c]) for c in cands]
