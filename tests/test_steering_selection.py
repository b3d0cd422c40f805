"""The strength search's coherence measure under a guard, on the tiny random model."""

from __future__ import annotations

import math

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


def fake_doses(monkeypatch, curves):
    """Replace generation by closed-form dose curves: ``curves[layer] = (score(s), ratio(s))``; records each call."""
    from tokensteer.steering import search as S

    calls = []

    def dose(lm, vec, layers, strength, prompts, *a, **k):
        score, ratio = curves[layers[0]]
        calls.append((layers[0], strength, len(prompts)))
        r = ratio(strength)
        return S.Point(layers[0], strength, min(score(strength), 1.0), 10.0 * r, r, 0.0, True, r, list(layers), 1.0)

    monkeypatch.setattr(S, "evaluate_dose", dose)
    monkeypatch.setattr(S, "default_band", lambda n: [0, 1])
    return calls


def search_two_layers(tiny, monkeypatch, curves, **kw):
    from tokensteer.sampling import SamplingConfig
    from tokensteer.steering import SteeringVector
    from tokensteer.steering import search as S

    calls = fake_doses(monkeypatch, curves)
    # layer 0 is the better separated one, so it is tried first and wins ties
    vec = SteeringVector({0: torch.ones(tiny.hidden_size), 1: torch.ones(tiny.hidden_size)},
                         {"units": "raw", "stats": {"0": {"heldout_d_prime": 2.0}, "1": {"heldout_d_prime": 1.0}}})
    cfg = SamplingConfig(max_tokens=2, temperature=1.0, seed=3, ignore_eos=True)
    res = S.search(tiny, vec, lambda t: [0.0] * len(t), prompts=["the cat", "the dog", "hello", "a bird"], layer_prompts=2,
                   factor=1.5, kl_max=1e9, min_distinct=0.0, max_strength=2.0, bisect_steps=3, cfg=cfg, **{"n_layer_trials": 2, **kw})
    return res, calls


# At the first dose layer 0 moves the attribute more for the same perplexity (so attribute per nat
# there would pick it), but its perplexity then climbs fast; layer 1 goes further within the budget.
STEEP = (lambda s: 0.5 + 2 * s, lambda s: math.exp(32 * s ** 3))
CHEAP = (lambda s: 0.5 + s, lambda s: math.exp(0.5 * s))


def test_the_layer_with_the_best_dose_within_the_budget_wins(tiny, monkeypatch):
    res, calls = search_two_layers(tiny, monkeypatch, {0: STEEP, 1: CHEAP}, aim=1.3, confidence=0.5)
    assert res.layers == [1]
    assert {li for li, _, n in calls if n == 2} == {0, 1} and all(li == 1 for li, _, n in calls if n == 4)
    # the layer trials ran on the first layer_prompts prompts, the final search on all of them
    first = {p.layer: p for p in res.layer_trials if p.strength == 0.125}
    assert first[0].score > first[1].score and first[0].ppl_ratio == pytest.approx(first[1].ppl_ratio, rel=0.01)
    best = 2 * math.log(1.3)  # where layer 1's ratio reaches the aim
    measured = max(p.strength for p in res.curve if p.feasible)
    assert measured < best - 0.01 and res.strength == pytest.approx(best, abs=1e-3)  # interpolated past the bisection's bracket
    assert all(p.feasible == (p.ppl_ratio <= 1.3) for p in res.curve if p.strength > 0)


def test_aim_leaves_a_margin_below_the_budget(tiny, monkeypatch):
    with_aim, _ = search_two_layers(tiny, monkeypatch, {0: STEEP, 1: CHEAP}, aim=1.3, confidence=0.5)
    without, _ = search_two_layers(tiny, monkeypatch, {0: STEEP, 1: CHEAP}, confidence=0.5)
    assert without.layers == [1] and math.exp(0.5 * without.strength) <= 1.5
    assert without.strength > with_aim.strength and without.baseline["aim"] is None and with_aim.baseline["aim"] == 1.3
    # an aim above the budget is the budget
    above, _ = search_two_layers(tiny, monkeypatch, {0: STEEP, 1: CHEAP}, aim=3.0, confidence=0.5)
    assert above.strength == without.strength and above.baseline["aim"] == 1.5


def test_a_tie_goes_to_the_better_separated_layer(tiny, monkeypatch):
    res, _ = search_two_layers(tiny, monkeypatch, {0: CHEAP, 1: CHEAP}, aim=1.3, confidence=0.5)
    assert res.layers == [0]


def test_failed_names_the_aim_apart_from_the_bound():
    from tokensteer.steering.search import Point, failed

    p = Point(11, 0.3, 0.9, 14.0, 1.4, 1.0, True, 1.45, [11], distinct2=0.8)
    assert failed(p, 0.9, 1.5, 2.0, 0.6) == []
    assert failed(p, 0.9, 1.5, 2.0, 0.6, aim=1.3) == ["perplexity ×1.40 > aim ×1.3"]
    assert failed(p, 0.9, 1.4, 2.0, 0.6, aim=1.4) == ["perplexity bound ×1.45 > ×1.4"]


def test_toward_aim_interpolates_the_log_ratio_only_across_the_aim():
    from tokensteer.steering.search import Point, toward_aim

    pt = lambda s, r: Point(11, s, 0.8, 10.0 * r, r, 0.5, True, r, [11], 0.8)
    assert toward_aim(pt(0.25, 1.0), pt(0.3, 1.69), 1.3) == pytest.approx(0.275, abs=1e-4)  # ln 1.3 is half of ln 1.69
    assert toward_aim(pt(0.25, 1.35), pt(0.3, 1.69), 1.3) == 0.25  # the weaker end is already over the aim
    assert toward_aim(pt(0.25, 1.0), pt(0.3, 1.2), 1.3) == 0.25  # the stronger one did not fail on the aim
    assert toward_aim(pt(0.25, 1.0), pt(0.3, float("inf")), 1.3) == 0.25


def test_no_interpolation_past_a_dose_that_failed_on_another_criterion(tiny, monkeypatch):
    from tokensteer.steering import search as S

    real = S.failed
    # doses above 0.5 also repeat themselves, so the bracket's end failed on more than the aim
    monkeypatch.setattr(S, "failed", lambda p, *a, **k: real(p, *a, **k) + (["repetitive"] if p.strength > 0.5 else []))
    res, _ = search_two_layers(tiny, monkeypatch, {0: STEEP, 1: CHEAP}, aim=1.3, confidence=0.5)
    assert res.layers == [1] and res.strength == max(p.strength for p in res.curve if p.feasible) == 0.5


def test_by_default_the_best_separated_layer_is_searched_without_trials(tiny, monkeypatch):
    res, calls = search_two_layers(tiny, monkeypatch, {0: STEEP, 1: CHEAP}, aim=1.3, confidence=0.5, n_layer_trials=1)
    assert res.layers == [0] and res.layer_trials == [] and all(n == 4 for _, _, n in calls)
    assert math.exp(32 * res.strength ** 3) == pytest.approx(1.3, rel=0.01)  # layer 0's own crossing of the aim
