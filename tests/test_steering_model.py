"""Steering on the real bundled model (slow): a sentiment vector must make continuations more positive."""

from __future__ import annotations

import statistics

import pytest

import tokensteer as ts
from tokensteer.steering import load_pairs, steer, train_vector


@pytest.mark.model
def test_sentiment_vector_moves_sentiment_on_the_bundled_model(bundled):
    from tokensteer.eval.scorers import sentiment

    full = load_pairs("sentiment")
    ps = type(full)(full.name, full.pairs[:16], full.source)
    vec = train_vector(bundled, ps, "diffmean")
    # the contrast is linearly readable in the middle of the network
    assert max(vec.meta["stats"][str(i)]["heldout_pair_acc"] for i in range(4, 14)) == 1.0
    prompts = ["The restaurant down the street", "The hotel we stayed in was", "The film I watched last night"]
    kw = dict(max_tokens=12, ignore_eos=True)
    base = ts.generate(bundled, prompts, **kw)
    pos = ts.generate(bundled, prompts, controls=[steer(vec, 0.1, layers=[6])], **kw)
    neg = ts.generate(bundled, prompts, controls=[steer(vec, -0.1, layers=[6])], **kw)
    mean = lambda gs: statistics.mean(sentiment([g.text for g in gs]))
    assert mean(pos) > mean(base) > mean(neg) or mean(pos) > mean(neg) + 0.3, ([g.text for g in pos], [g.text for g in neg])
