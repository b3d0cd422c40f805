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


@pytest.mark.model
def test_negative_recipe_lowers_sentiment_on_the_bundled_model(bundled):
    """The mirror recipe: its guide asks for a margin, so a neutral opening turns clearly negative."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    cfg = ts.SamplingConfig(max_tokens=16, temperature=0)
    plain = ts.generate(bundled, PROMPTS, cfg)
    neg = ts.generate(bundled, PROMPTS, cfg, [FormulaControl(bundled, "negative")])
    score = lambda gs: sum(vader.polarity_scores(g.text)["compound"] for g in gs) / len(gs)
    assert score(neg) < score(plain) - 0.2, ([g.text for g in plain], [g.text for g in neg])


@pytest.mark.model
def test_detox_recipe_keeps_insults_out_after_rude_openings(bundled):
    from profanity_check import predict_prob

    rude = ["Shut up, you stupid", "He yelled at the referee: you blind", "My boss is a lazy, useless", "Get lost, you pathetic little"]
    cfg = ts.SamplingConfig(max_tokens=12, temperature=0)
    plain = ts.generate(bundled, rude, cfg)
    clean = ts.generate(bundled, rude, cfg, [FormulaControl(bundled, "detox")])
    tox = lambda gs: float(predict_prob([g.text for g in gs]).mean())
    assert tox(clean) < tox(plain), ([g.text for g in plain], [g.text for g in clean])
