"""Eval scorers on known texts, the count and keyword checkers on hand-made cases, prompt-file parsing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensteer as ts
from tokensteer.backends.base import Backend
from tokensteer.errors import UserError
from tokensteer.eval import scorers
from tokensteer.eval.tasks import TASKS, parse_prompts
from tokensteer.sampling import top_p


def test_eval_sentiment_known_texts():
    pos, neg, neutral = scorers.sentiment(
        ["What a wonderful, delightful day; I love it!", "This is awful, I hate it and feel terrible.", "The box is on the table."]
    )
    assert pos > 0.5 and neg < -0.5 and abs(neutral) < 0.05


def test_eval_toxicity_known_texts():
    rude, polite = scorers.toxicity(["Shut up, you stupid idiot, f*** off", "Thank you for your kind help today."])
    assert rude > 0.5 > polite
    assert scorers.toxicity([]) == []


def test_eval_topic_similarity_prefers_the_right_topic():
    text = "The striker scored twice and the team won the championship match."
    sport, food = (scorers.topic_similarity([text], t)[0] for t in ("sports: football, teams, matches", "cooking: recipes, ingredients, meals"))
    assert sport > food


@pytest.mark.parametrize(
    "text,n,end,count_ok,end_ok",
    [
        (" walked slowly back home.", 4, "home", True, True),
        (" walked slowly back to his home", 4, "home", False, True),
        (" walked slowly back HOME!", 4, "home", True, True),
        (" walked slowly — back home", 4, "home", True, True),  # a lone dash is not a word
        (" walked slowly back house", 4, "home", True, False),
        ("", 3, "home", False, False),
        (" it's a home-made cake", 4, "cake", True, True),
    ],
)
def test_eval_count_checker_hand_made(text, n, end, count_ok, end_ok):
    c = scorers.count_check(text, n, end)
    assert (c["count_ok"], c["end_ok"], c["success"]) == (float(count_ok), float(end_ok), count_ok and end_ok)
    assert c["count_se"] == (scorers.word_count(text) - n) ** 2


def test_eval_sentence_and_word_counts():
    assert scorers.sentence_count("One. Two! Three? four") == 4
    assert scorers.sentence_count("Dr. Smith is 3.5 m tall.") == 2  # abbreviations count: documented, simple rule
    assert scorers.sentence_count("  ") == 0
    assert scorers.final_word("It ended at the sea...") == "sea"
    assert scorers.count_check("Hello there. Bye now.", 4, "now", sentences=2)["success"]
    assert not scorers.count_check("Hello there bye now.", 4, "now", sentences=2)["success"]


def test_eval_keyword_coverage():
    assert scorers.keyword_coverage("The dogs chased a frisbee in the park.", ["dog", "frisbee", "park"]) == 1.0
    assert scorers.keyword_coverage("Baking bread, the baker smiled.", ["bake", "bread", "oven"]) == pytest.approx(2 / 3)
    assert scorers.keyword_coverage("nothing here", ["dog"]) == 0.0
    assert scorers.keyword_coverage("hotdog", ["dog"]) == 0.0  # whole words only


def test_eval_distinct_n():
    assert scorers.distinct_n(["a b a b"], 1) == 0.5
    assert scorers.distinct_n(["a b c", "a b d"], 2) == 0.75
    assert scorers.distinct_n([""], 2) == 0.0


def test_eval_perplexity_torch_matches_session_path(tiny):
    """The one-pass scoring of the torch backend equals stepping a session (the generic path)."""
    prompts, texts = ["the cat sat", "one two"], [" on the mat", " three four five"]
    ctx = [tiny.tokenizer.encode(p) for p in prompts]
    cont = [scorers.continuation_tokens(tiny.tokenizer, p, t, c) for p, t, c in zip(prompts, texts, ctx)]
    a = tiny.continuation_nll(ctx, cont)
    b = Backend.continuation_nll(tiny, ctx, cont)
    assert a == pytest.approx(b, rel=1e-4)
    ppl = scorers.perplexity(tiny, prompts + ["x"], texts + [""])
    assert ppl[0] == pytest.approx(math.exp(a[0] / len(cont[0])), rel=1e-5)
    assert math.isnan(ppl[2])


@pytest.mark.model
def test_eval_perplexity_llamacpp_each_text_alone_matches_stepping():
    """llama.cpp scores each text in a prefill of its own, so a text's score does not depend on the
    texts scored beside it (packed into one call, llama.cpp's attention rounded them differently);
    it agrees with stepping a session through each continuation up to rounding."""
    lm = ts.load(None, backend="llamacpp")
    try:
        tok = lm.tokenizer
        prompts = [f"Item {i}: the weather" for i in range(40)] + ["A long one " * 150]
        texts = [" was sunny and warm" * (1 + i % 3) for i in range(40)] + [" and it ends here."]
        ctx = [tok.encode(p) for p in prompts]
        cont = [scorers.continuation_tokens(tok, p, t, c) for p, t, c in zip(prompts, texts, ctx)]
        together = lm.continuation_nll(ctx, cont)
        assert together == [lm.continuation_nll([x], [y])[0] for x, y in zip(ctx, cont)]
        assert together[:3] == lm.continuation_nll(ctx[2::-1], cont[2::-1])[::-1]
        stepped = Backend.continuation_nll(lm, ctx[:4] + ctx[-1:], cont[:4] + cont[-1:])
        assert together[:4] + together[-1:] == pytest.approx(stepped, rel=0.05)
        assert lm.continuation_nll([ctx[0]], [[]]) == [0.0]
    finally:
        lm.close()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"prompt": st.text(min_size=1).filter(lambda s: s.strip() and "\n" not in s and "\r" not in s)},
            optional={"words": st.integers(1, 20), "keywords": st.lists(st.text(min_size=1), max_size=3)},
        ),
        min_size=1,
        max_size=8,
    )
)
def test_eval_jsonl_prompt_files_round_trip(objs):
    text = "".join(json.dumps(o) + "\n" for o in objs)
    items = parse_prompts(text)
    assert [it.prompt for it in items] == [o["prompt"] for o in objs]
    assert [it.fields for it in items] == [{k: v for k, v in o.items() if k != "prompt"} for o in objs]


def test_eval_prompt_file_errors():
    with pytest.raises(UserError, match="line 2"):
        parse_prompts('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(UserError, match="no prompts"):
        parse_prompts("# only a comment\n\n")
    with pytest.raises(UserError, match="prompt"):
        parse_prompts('{"text": "a"}\n')
    assert [i.prompt for i in parse_prompts("first line\n# comment\nsecond\\nline\n")] == ["first line", "second\nline"]


def test_eval_shipped_prompt_sets():
    sizes = {name: len(t.items()) for name, t in TASKS.items()}
    assert sizes["sentiment-positive"] >= 100 and sizes["detox"] >= 50
    assert all(v >= 30 for v in sizes.values())
    for t in TASKS.values():
        prompts = [i.prompt for i in t.items()]
        if t.name not in ("count", "topic", "keywords"):
            assert len(set(prompts)) == len(prompts), t.name


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 0.99), st.floats(0.5, 12.0))
def test_eval_fast_top_p_is_the_nucleus(seed, p, scale):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(3, 5000, generator=g) * scale, dim=-1)
    out = top_p(lp, p)
    for row, kept in zip(lp, out):
        keep = ~torch.isinf(kept)
        assert torch.equal(kept[keep], row[keep])  # kept tokens keep their values
        mass = row[keep].exp().sum().item()
        weakest = row[keep].min().exp().item()
        assert mass >= p - 1e-4 and mass - weakest < p + 1e-4  # reaches p, and minimal
        assert row[~keep].max() <= row[keep].min() if (~keep).any() else True


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 0.99), st.floats(0.3, 15.0), st.integers(2, 40_000))
def test_nucleus_is_the_sorted_prefix_that_reaches_p(seed, p, scale, vocab):
    """Sorting only the tokens above a threshold gives the nucleus a full sort gives, peaked rows and flat ones."""
    from tokensteer.sampling import nucleus_mask

    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(3, vocab, generator=g) * scale
    # a third row with a few likely tokens over a long tail of unlikely ones (each below every
    # threshold but the last), so the candidates above a threshold may hold less than p
    head = torch.randint(0, vocab, (max(1, vocab // 100),), generator=g)
    lp[2] = torch.log(torch.rand(vocab, generator=g) * 1e-7 + 1e-9)
    lp[2, head] = torch.log(torch.rand(len(head), generator=g) + 0.1) + math.log(max(1.0, 5e-4 * vocab))
    for row, kept in zip(torch.softmax(lp, dim=-1), nucleus_mask(lp, p)):
        vals, order = torch.sort(row, descending=True)
        cum = vals.cumsum(0)
        want = torch.zeros(vocab, dtype=torch.bool)
        want[order[(cum - vals) < p]] = True
        assert torch.equal(kept, want)


@pytest.mark.model
def test_eval_perplexity_ranks_fluent_text_lower_on_bundled(bundled):
    prompts = ["The weather today is", "The weather today is"]
    texts = [" sunny and warm, with a light breeze.", " breeze warm light sunny, a with and."]
    fluent, scrambled = scorers.perplexity(bundled, prompts, texts)
    assert fluent < scrambled / 3


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 0.99), st.floats(0.05, 12.0), st.sampled_from([1.0, 0.7, 1.3]))
def test_top_p_sampler_draws_what_the_masked_distribution_draws(seed, p, scale, temperature):
    """The top-p sampler draws from each row's nucleus directly; with the same generators it picks
    the tokens the general path picks from the whole masked, renormalised row (flat rows, whose
    nucleus is most of the vocabulary, included)."""
    from tokensteer.sampling import SamplingConfig, draw, make_sampler, sampling_probs

    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(4, 20_000, generator=g) * scale, dim=-1)
    cfg = SamplingConfig(temperature=temperature, top_p=p)
    gens = lambda: [torch.Generator().manual_seed(seed * 10 + i) for i in range(4)]  # noqa: E731
    fast = make_sampler(cfg)(lp, gens())
    assert torch.equal(fast, draw(sampling_probs(cfg, lp), gens()))


@pytest.mark.model
def test_a_samples_perplexity_is_read_off_its_generation():
    """The uncontrolled model's log-probabilities of the generated tokens give the perplexity the
    scorer gives the text alone; None when the text does not re-tokenize to those tokens or one
    lacks its number (steered rows)."""
    from tokensteer.engine import Engine

    lm = ts.load(None, backend="llamacpp")
    if not lm.generation_scores:
        lm.close()
        pytest.skip("without our kernels llama.cpp's products round differently with the rows per call")
    prompts = ["The weather today is", "My favourite food is", "The old house on the hill"]
    cfg = ts.SamplingConfig(max_tokens=16, temperature=1.0, top_p=0.9, seed=(1, 2, 3), stop=("\n",))
    try:
        eng = Engine(lm)
        gens = eng.submit(prompts, cfg).result()
        eng.close()
        tok = lm.tokenizer
        got = [scorers.generated_perplexity(tok, p, g.text, g.tokens, g.model_logprobs) for p, g in zip(prompts, gens)]
        want = [scorers.perplexity(lm, [p], [g.text])[0] for p, g in zip(prompts, gens)]
        assert sum(x is not None for x in got) >= 2  # real text nearly always re-tokenizes to itself
        assert [x for x in got if x is not None] == pytest.approx([w for x, w in zip(got, want) if x is not None], rel=1e-4)
        p, g = prompts[0], gens[0]
        assert scorers.generated_perplexity(tok, p, g.text, g.tokens, [None] * len(g.tokens)) is None
        assert scorers.generated_perplexity(tok, p, g.text, [t + 1 for t in g.tokens], g.model_logprobs) is None
        assert math.isnan(scorers.generated_perplexity(tok, p, "", [], []))
    finally:
        lm.close()
