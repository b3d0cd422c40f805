"""The word-level guides' options (margin, cap, repeats) on tiny labelled data, and the built-in
guides the recipes use: an insult costs its weight whatever polite text surrounds it."""

from __future__ import annotations

import math

import pytest

from tokensteer.formula.guides import GUIDES, WordGuide, get_guide

DATA = {
    "good": ["a fine happy day", "happy and fine", "what a lovely fine day"],
    "bad": ["a sad awful day", "awful and sad", "what a grim sad day"],
}
LISTS = {"good": ["lovely", "glad"], "bad": ["grim", "awful"]}


def logsig(z: float) -> float:
    return min(z, 0.0) - math.log1p(math.exp(-abs(z)))


def test_margin_shifts_the_log_odds_and_keeps_the_push_going():
    plain = WordGuide(DATA, "good", LISTS)
    wide = WordGuide(DATA, "good", LISTS, margin=3.0)
    for t in ("a day", "a happy day", "a sad day"):
        assert wide.logit(t) == pytest.approx(plain.logit(t) - 3.0)
    # a second attribute word is worth more once the guide asks for a margin
    one, two = "a happy day", "a happy fine day"
    gain = [float(g.logprob([two])[0] - g.logprob([one])[0]) for g in (plain, wide)]
    assert gain[1] > gain[0] > 0


def test_cap_bounds_the_credit_of_the_target_words_but_not_the_penalty():
    plain = WordGuide(DATA, "good", LISTS)
    capped = WordGuide(DATA, "good", LISTS, cap=0.5)
    text = "a happy fine lovely day"
    assert capped.logit(text) < plain.logit(text)
    assert capped.logit(text) <= capped.bias + 0.5 + 1e-9
    # the other class's word costs its full weight under the cap, less in probability without it
    w = capped.weights["awful"]
    assert w < 0
    assert capped.logit(text + " awful") - capped.logit(text) == pytest.approx(w)
    drop = [float(g.logprob([text])[0] - g.logprob([text + " awful"])[0]) for g in (plain, capped)]
    assert drop[1] > drop[0] > 0


def test_repeats_count_each_listed_word_of_the_other_class():
    once = WordGuide(DATA, "good", LISTS)
    again = WordGuide(DATA, "good", LISTS, repeats=True)
    w = again.weights["awful"]
    assert once.logit("awful awful day") == pytest.approx(once.logit("awful day"))
    assert again.logit("awful awful day") == pytest.approx(again.logit("awful day") + w)
    # the target's words and words outside the lists still count once
    assert again.logit("happy happy day") == pytest.approx(again.logit("happy day"))
    assert again.logit("sad sad day") == pytest.approx(again.logit("sad day"))


@pytest.mark.parametrize("insult", ["idiot", "stupid", "shut"])
def test_detox_guide_charges_an_insult_as_much_in_polite_text_as_in_plain_text(insult):
    """The saturation the recipe had: a polite text's credit hid the insult that followed it."""
    g = get_guide("nontoxic")
    polite = "Thank you so much for the kind and helpful words, I really appreciate the care and"
    plain = "and then he said that"
    drop = [float(g.logprob([t])[0] - g.logprob([t + " " + insult])[0]) for t in (polite, plain)]
    assert drop[0] > 0.5 and drop[0] >= 0.5 * drop[1]
    # and the insult already in the prompt is no free repeat
    rude = f"You {insult},"
    assert float(g.logprob([rude])[0] - g.logprob([rude + " " + insult])[0]) > 0.5


@pytest.mark.parametrize("name", ["positive", "negative"])
def test_sentiment_guides_still_prefer_their_own_class(name):
    g = GUIDES[name]()
    good, bad = "we had a wonderful happy day", "we had a terrible miserable day"
    lp = g.logprob([good, bad])
    assert (float(lp[0]) > float(lp[1])) == (name == "positive")


def test_word_weights_are_trained_once_and_kept_in_the_cache(tmp_path, monkeypatch):
    """A word guide's regression is trained on first use and read back afterwards (the same
    numbers); a damaged cache file is trained again, not fatal."""
    import json

    monkeypatch.setenv("TOKENSTEER_HOME", str(tmp_path))
    first = WordGuide(DATA, "good", LISTS)
    (saved,) = (tmp_path / "guides").iterdir()
    assert json.loads(saved.read_text()) == {"weights": first.weights, "bias": first.bias}

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr("sklearn.linear_model.LogisticRegression.fit", no_training)
    again = WordGuide(DATA, "good", LISTS)
    assert (again.weights, again.bias) == (first.weights, first.bias)
    monkeypatch.undo()
    monkeypatch.setenv("TOKENSTEER_HOME", str(tmp_path))
    saved.write_text('{"weights": [1, 2')
    assert WordGuide(DATA, "good", LISTS).weights == first.weights
    assert json.loads(saved.read_text())["bias"] == first.bias
    assert WordGuide(DATA, "bad", LISTS).weights != first.weights  # another target: another entry
    assert len(list((tmp_path / "guides").iterdir())) == 2
