"""The word guides behind the sentiment and detox recipes: direction, saturation, the finished-text
penalty, and that scores are log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from tokensteer.formula import guide_data, guide_words
from tokensteer.formula.guides import GUIDES, WordGuide, get_guide
from tokensteer.formula.recipes import RECIPES


@pytest.mark.parametrize("name,good,bad", [
    ("positive", "We had a wonderful time and everyone smiled", "We had a miserable time and everyone cried"),
    ("negative", "The trip was a disaster and I regret it", "The trip was lovely and I enjoyed it"),
    ("nontoxic", "He thanked his colleague politely", "He called his colleague a stupid idiot"),
])
def test_word_guides_point_towards_their_attribute(name, good, bad):
    g = get_guide(name)
    lp = g.logprob([good, bad])
    assert lp[0] > lp[1]
    assert torch.all(lp < 0)  # log-probabilities of the attribute


def test_scores_are_log_sigmoids_of_the_logit_even_far_out():
    g = WordGuide({"a": ["yes yes"], "b": ["no no"]}, "a")
    g.weights = {"up": 500.0, "down": -500.0}
    lp = g.logprob(["up", "down", "x"])
    ref = torch.nn.functional.logsigmoid(torch.tensor([g.logit("up"), g.logit("down"), g.logit("x")]))
    assert torch.isfinite(lp).all() and torch.allclose(lp, ref)


def test_push_fades_once_the_text_has_the_attribute():
    """A positive word moves a neutral text's score more than an already glowing one's."""
    g = get_guide("positive")
    neutral, glowing = "The bus arrived at noon and", "What a wonderful, happy, lovely and delightful day and"
    d = [float(g.logprob([t + " great"])[0] - g.logprob([t])[0]) for t in (neutral, glowing)]
    assert d[0] > d[1] > 0


def test_finishing_a_neutral_text_costs_more_than_finishing_a_positive_one():
    g = WordGuide(guide_data.SENTIMENT, "positive", {"positive": guide_words.words(guide_words.POSITIVE)}, finish=3.0)
    cost = [float(g.logprob([t])[0] - g.logprob([t + "\n"])[0]) for t in ("The bus arrived.", "We loved it, a wonderful happy day.")]
    assert cost[0] > cost[1] > 0
    assert float(WordGuide(guide_data.SENTIMENT, "positive").logprob(["a.\n"])[0]) == pytest.approx(
        float(WordGuide(guide_data.SENTIMENT, "positive").logprob(["a."])[0]))  # finish=0: a line break is no penalty


def test_word_lists_hold_no_word_in_both_classes_of_a_guide():
    for a, b in ((guide_words.POSITIVE, guide_words.NEGATIVE), (guide_words.POLITE, guide_words.TOXIC)):
        assert not set(guide_words.words(a)) & set(guide_words.words(b))


@pytest.mark.parametrize("name", ["positive", "negative", "detox"])
def test_recipes_use_builtin_guides_and_a_nucleus(name):
    text = RECIPES[name].formula()
    # sentiment: the base model's nucleus; detox: the steered distribution's, to leave a sure insult
    assert text.startswith("topp(" if name == "detox" else "nucleus(") and "C(" in text
    guide = text.split('C("')[1].split('"')[0]
    assert guide in GUIDES
    assert math.isfinite(float(text.rsplit(",", 1)[1].rstrip(")")))


@pytest.mark.parametrize("name", ["positive", "negative", "detox"])
def test_default_recipes_run_one_row_and_alpha_adds_the_experts(name):
    from tokensteer.formula.fusion import prefixes_of
    from tokensteer.formula.parser import parse

    assert prefixes_of(parse(name).root) == []  # the guide alone: plain decoding's one row
    assert len(prefixes_of(parse(f"{name}(alpha=2)").root)) == 2  # DExperts: expert and anti-expert rows
    assert f"k={int(dict(RECIPES[name].params)['k'])}" in RECIPES[name].formula()  # the guide's candidates, as the recipe says


def test_recipe_guide_k_must_be_whole():
    from tokensteer.formula.parser import FormulaError, parse

    assert "k=12" in str(parse("positive(k=12)").root)
    with pytest.raises(FormulaError):
        parse("positive(k=20.5)")


def test_recipes_move_the_tiny_models_text_the_guides_way(tiny):
    """On a random tiny model the guide is the only signal: the recipe must raise the guide's score
    of what is generated over plain sampling, prompt for prompt, seed for seed."""
    import tokensteer as ts
    from tokensteer.formula import FormulaControl

    prompts = ["the cat sat", "one two three", "a b c", "the dog"] * 3
    g = get_guide("positive")
    plain = ts.generate(tiny, prompts, max_tokens=6, ignore_eos=True, seed=1)
    steered = ts.generate(tiny, prompts, max_tokens=6, ignore_eos=True, seed=1, controls=[FormulaControl(tiny, "positive(guide=64, p=1)")])
    score = lambda gens: float(g.logprob([p + x.text for p, x in zip(prompts, gens)]).mean())
    assert score(steered) > score(plain)


def _civility(**kw):
    from tokensteer.formula.guides import word_lists

    return WordGuide(guide_data.CIVILITY, "nontoxic", word_lists("POLITE", "TOXIC"), cap=1.0, repeats=True, **kw)


def test_prefix_scores_a_split_insult_at_its_first_piece():
    """'stup' (the first token of 'stupid' in many tokenizers) costs what the whole word costs,
    only with the option on, only at the text's end, and not for a piece no listed word begins."""
    on, off = _civility(prefix=3), _civility()
    base = "He looked at me and said I was"
    lp = lambda g, t: float(g.logprob([t])[0])
    assert lp(on, base + " stup") == pytest.approx(lp(on, base + " stupid"))
    assert lp(off, base + " stup") == pytest.approx(lp(off, base))
    assert lp(on, base + " stup and left") == pytest.approx(lp(off, base + " stup and left"))  # a finished piece is just a word
    assert lp(on, base + " qzx") == pytest.approx(lp(off, base + " qzx"))
    assert lp(on, base + " st") == pytest.approx(lp(off, base + " st"))  # shorter than the prefix length


def test_steady_guide_charges_an_opposed_word_fully_however_clear_the_text():
    """With saturation a negative word in a glowing text costs almost nothing; steady keeps its cost."""
    lists = {"positive": guide_words.words(guide_words.POSITIVE), "negative": guide_words.words(guide_words.NEGATIVE)}
    plain = WordGuide(guide_data.SENTIMENT, "positive", lists)
    steady = WordGuide(guide_data.SENTIMENT, "positive", lists, steady=True)
    glowing = "What a wonderful, happy, lovely, joyful and delightful day with friends, and"
    cost = lambda g: float(g.logprob([glowing])[0] - g.logprob([glowing + " terrible"])[0])
    assert cost(plain) < 0.1 < -steady.weights["terrible"] * 0.99 < cost(steady)
    assert float(steady.logprob([glowing])[0]) <= 0.0


def test_negation_turns_a_word_partly_around():
    from tokensteer.formula.guides import FLIP, negated

    assert negated("i did not like it at all".split()) == [("i", False), ("did", False), ("like", True), ("it", True), ("at", True), ("all", False)]
    assert negated(["wasn't", "happy"]) == [("happy", True)]
    lists = {"positive": guide_words.words(guide_words.POSITIVE), "negative": guide_words.words(guide_words.NEGATIVE)}
    g = WordGuide(guide_data.SENTIMENT, "negative", lists, negation=True)
    assert g.logit("I was not happy") - g.logit("I was") == pytest.approx(FLIP * g.weights["happy"])
    assert g.logit("I was not happy") > g.logit("I was happy")


def test_broad_lists_extend_leave_out_mild_words_and_keep_classes_apart():
    from tokensteer.formula.guides import word_lists

    for a, b in (("POSITIVE", "NEGATIVE"), ("POLITE", "TOXIC")):
        narrow, broad = word_lists(a, b), word_lists(a, b, broad=True)
        mild = set(guide_words.words(guide_words.MILD))
        for key in narrow:
            assert set(narrow[key]) - mild <= set(broad[key]) and len(broad[key]) == len(set(broad[key]))
            assert len(broad[key]) > len(narrow[key]) - len(mild) and not mild & set(broad[key])
        k1, k2 = broad
        assert not set(broad[k1]) & set(broad[k2])
