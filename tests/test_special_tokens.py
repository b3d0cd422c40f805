"""Tokens that write no text (control tokens, <start_of_image>-style markers) stay out of the text
by default, keep their ids, and are never chosen under a constraint."""

from __future__ import annotations

import pytest
import torch

import tokensteer as ts
from tokensteer.backends.base import MARKER
from tokensteer.hooks import Control


class Force(Control):
    """Force token ``t`` at step 1, else leave the model alone."""

    stages = frozenset({"mask"})

    def __init__(self, t: int) -> None:
        self.t = t

    def mask(self, state):
        if state.step != 1:
            return None
        m = torch.zeros(state.batch_size, state.tokenizer.vocab_size, dtype=torch.bool)
        m[:, self.t] = True
        return m


def test_marker_pattern():
    for s in ("<start_of_image>", "<end_of_audio>", "[multimodal]"):
        assert MARKER.match(s)
    for s in ("<table>", "</b>", "<h1>", "[", "hello", "<start_of_image> x"):
        assert not MARKER.match(s)


def test_special_tokens_are_left_out_of_the_text_unless_kept(tiny):
    pad = tiny.tokenizer.pad_id
    assert pad in tiny.tokenizer.special_ids
    kw = dict(max_tokens=4, ignore_eos=True, controls=[Force(pad)])
    plain = ts.generate(tiny, "the cat", **kw)
    kept = ts.generate(tiny, "the cat", skip_special_tokens=False, **kw)
    assert plain.tokens[1] == pad and kept.tokens == plain.tokens
    assert "<pad>" not in plain.text and "<pad>" in kept.text
    assert tiny.tokenizer.token_bytes(pad) == b""


@pytest.mark.model
def test_bundled_markers_are_special_on_both_backends(bundled):
    lm = ts.load(None, backend="llamacpp")
    try:
        for tok in (lm.tokenizer, bundled.tokenizer):
            ids = tok.encode("<start_of_image>", add_bos=False)
            assert len(ids) == 1 and ids[0] in tok.special_ids
            table = tok.encode("<table>", add_bos=False)
            assert not set(table) & tok.special_ids
            assert tok.decode(ids) == "" and tok.decode(ids, skip_special=False) == "<start_of_image>"
        # the two read the same vocabulary; llama.cpp also marks "</s>" (an HTML tag in Gemma's) as control
        assert len(lm.tokenizer.special_ids ^ bundled.tokenizer.special_ids) <= 1
        from tokensteer.controls import RequestControls, build_controls

        controls = build_controls(lm, RequestControls(words=4, end_word="midnight"))
        g = ts.generate(lm, "The clock struck twelve and the people", max_tokens=16, controls=controls)
        assert not set(g.tokens) & lm.tokenizer.special_ids, g.tokens
        assert g.text.split()[-1].strip(".,!?").lower() == "midnight" and len(g.text.split()) == 4
    finally:
        lm.close()
