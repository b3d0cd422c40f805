"""The positive recipe on the real bundled model: it must move sentiment, and the trace must show it."""

from __future__ import annotations

import pytest

import tokensteer as ts
from tokensteer.formula import FormulaControl

PROMPTS = ["The meeting was moved to Thursday because", "When I opened the box, I saw", "The weather report said that", "My neighbor told me that the new library"]


@pytest.mark.model
def test_positive_recipe_raises_sentiment_on_the_bundled_model(bundled):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    cfg = ts.SamplingConfig(max_tokens=16, temperature=0)
    plain = ts.generate(bundled, PROMPTS, cfg)
    ctrl = FormulaControl(bundled, "positive", trace=True)
    pos = ts.generate(bundled, PROMPTS, cfg, [ctrl])
    score = lambda gs: sum(vader.polarity_scores(g.text)["compound"] for g in gs) / len(gs)
    assert score(pos) > score(plain) + 0.2, ([g.text for g in plain], [g.text for g in pos])
    kl = [r.kl for r in ctrl.traces[0]]
    assert kl and all(k >= 0 for k in kl) and max(kl) > 0.01
