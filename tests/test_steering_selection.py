"""The strength search's coherence measure under a guard, on the tiny random model."""

from __future__ import annotations

import pytest
import torch

from tokensteer.steering import Pair, PairSet, train_vector
from tokensteer.steering.apply import Steer, controls_for
from tokensteer.steering.scoring import coherence, guarded, kl_rows

PAIRS = PairSet("toy", tuple(Pair(p, n) for p, n in [
    ("good great happy kind", "bad awful sad rude"), ("the cat is happy", "the cat is sad"),
    ("a great day", "an awful day"), ("hello good world", "hello bad world")]), "test")
PROMPTS = ["the cat", "hello there", "a kind dog"]


@pytest.fixture(scope="module")
def edits(tiny):
    vec = train_vector(tiny, PAIRS, "diffmean", layers=[1])
    return controls_for([Steer(vec, 2.0, [1])])[0].residual_edits(len(PROMPTS), 1)


def first_logits(tiny, edits=()):
    s = tiny.session(edits)
    try:
        return s.prefill([tiny.tokenizer.encode(p) for p in PROMPTS]).float()
    finally:
        s.close()


def test_guarded_kl_is_the_kl_of_what_the_guard_samples(tiny, edits):
    base = torch.log_softmax(first_logits(tiny), -1)
    steered = first_logits(tiny, edits)
    conts = [[int(t)] for t in base.argmax(-1)]  # one teacher-forced token each
    plain = coherence(tiny, PROMPTS, conts, edits).kl
    want = kl_rows(torch.log_softmax(steered, -1), base)
    assert plain == pytest.approx(want.tolist(), rel=1e-4) and min(plain) > 0
    # a guard of 1 keeps every token: the unguarded KL
    assert coherence(tiny, PROMPTS, conts, edits, guard=1.0).kl == pytest.approx(plain, rel=1e-4)
    # the narrowest guard samples the base's top token only: KL = its surprisal under the base
    narrow = coherence(tiny, PROMPTS, conts, edits, guard=1e-9).kl
    assert narrow == pytest.approx((-base.max(-1).values).tolist(), rel=1e-4)
    # in between: the steered distribution renormalised within the base's nucleus
    mid = coherence(tiny, PROMPTS, conts, edits, guard=0.5).kl
    assert mid == pytest.approx(kl_rows(guarded(steered, base, 0.5), base).tolist(), rel=1e-4)
    assert narrow != pytest.approx(plain, rel=1e-2)


def test_kl_rows_ignores_tokens_the_guard_leaves_out():
    p = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0, -1.0]]), -1)
    q = torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    want = 0.5 * (torch.log(torch.tensor(0.5)) - p[0, 0]) + 0.5 * (torch.log(torch.tensor(0.5)) - p[0, 1])
    assert float(kl_rows(q, p)[0]) == pytest.approx(float(want))
    assert float(kl_rows(p, p)[0]) == pytest.approx(0.0, abs=1e-7)
