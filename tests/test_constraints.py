"""Hard constraints on the tiny model: property tests that they hold under random sampling."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokensteer
from tokensteer.constraints import ConstraintSpec, build, check, from_mapping
from tokensteer.constraints.keywords import found
from tokensteer.constraints.vocab import token_table
from tokensteer.errors import UserError
from tokensteer.eval.scorers import count_check, final_word, word_count
from tokensteer.sampling import SamplingConfig

PROMPTS = ["the cat sat", "a quick brown", "one two", "hello"]
SLOW = settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def sample(lm, spec: ConstraintSpec, seed: int, n: int = 4, max_tokens: int = 40, prompts=PROMPTS):
    cfg = SamplingConfig(max_tokens=max_tokens, temperature=1.0, seed=seed)
    return tokensteer.generate(lm, list(prompts[:n]), cfg, build(lm, spec))


def banned_in(text: str, word: str) -> bool:
    w = re.escape(" ".join(word.split()).lower())
    return re.search(rf"(?<!\w){w}(?!\w)", text.lower()) is not None


WORDS = st.sampled_from(["the", "cat", "sat", "dog", "a", "on", "mat", "ran", "park", "five", "ov", "good day", "to the"])


@SLOW
@given(words=st.lists(WORDS, min_size=1, max_size=4, unique=True), seed=st.integers(0, 10_000))
def test_banned_words_never_appear(tiny, words, seed):
    for g in sample(tiny, ConstraintSpec(ban=words), seed):
        for w in words:
            assert not banned_in(g.text, w), (w, g.text)


@SLOW
@given(seed=st.integers(0, 10_000))
def test_banned_non_ascii_word_in_any_casing(tiny, seed):
    for g in sample(tiny, ConstraintSpec(ban=["é", "Ãé"]), seed):
        assert "é" not in g.text.lower() and "É" not in g.text


@SLOW
@given(n=st.integers(1, 12), end=st.sampled_from([None, "dog", "five", "mat"]), seed=st.integers(0, 10_000))
def test_exact_word_count_and_end_word(tiny, n, end, seed):
    spec = ConstraintSpec(words=n, end_word=end)
    for g in sample(tiny, spec, seed, max_tokens=3 * n + 10):
        assert word_count(g.text) == n and len(g.text.split()) == n, g.text
        if end:
            assert g.text.split()[-1] == end and final_word(g.text) == end
            assert count_check(g.text, n, end)["success"]


@SLOW
@given(n=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_exact_sentences(tiny, n, seed):
    for g in sample(tiny, ConstraintSpec(sentences=n), seed, max_tokens=60):
        assert len(re.findall(r"[.!?]+", g.text)) == n and g.text[-1] in ".!?", g.text


@SLOW
@given(kws=st.lists(st.sampled_from(["dog", "park", "five", "hello world"]), min_size=1, max_size=3, unique=True), seed=st.integers(0, 10_000))
def test_required_words_appear_within_deadline(tiny, kws, seed):
    within = sum(len(k.split()) for k in kws) + 3
    for g in sample(tiny, ConstraintSpec(require=kws, require_within=within), seed, max_tokens=50):
        head = " ".join(g.text.split()[:within])
        for k in kws:
            assert found(k, head), (k, g.text)


SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["cat", "dog"]},
        "name": {"type": "string", "maxLength": 6},
    },
    "required": ["n", "ok", "tag", "name"],
    "additionalProperties": False,
}


@SLOW
@given(seed=st.integers(0, 10_000))
def test_json_always_parses_and_validates(tiny, seed):
    for g in sample(tiny, ConstraintSpec(json_schema=SCHEMA), seed, max_tokens=80):
        assert g.finish_reason == "eos", g.text
        jsonschema.validate(json.loads(g.text), SCHEMA)


@SLOW
@given(seed=st.integers(0, 10_000))
def test_regex_matches(tiny, seed):
    rx = r"(cat|dog) [0-9]{2,4}!"
    for g in sample(tiny, ConstraintSpec(regex=rx), seed, max_tokens=30):
        assert re.fullmatch(rx, g.text), g.text


@SLOW
@given(seed=st.integers(0, 10_000))
def test_vocabulary_restriction(tiny, seed):
    listed = {"the", "cat", "sat", "on", "mat", "dog", "ran"}
    for g in sample(tiny, ConstraintSpec(vocab=sorted(listed)), seed, max_tokens=30):
        for w in re.findall(r"[\w']+", g.text.lower()):
            assert w in listed, (w, g.text)


@SLOW
@given(seed=st.integers(0, 10_000))
def test_script_restriction_hard(tiny, seed):
    import regex

    ok = regex.compile(r"[\p{Script=Latin}\p{Script=Common}\p{Script=Inherited}]*")
    for g in sample(tiny, ConstraintSpec(script=["latin"]), seed, max_tokens=40):
        # whole characters only (a U+FFFD the model spells out in its three bytes is one, of Common script)
        text = b"".join(tiny.tokenizer.token_bytes(t) for t in g.tokens).decode("utf-8")
        assert text == g.text and ok.fullmatch(text), g.text


def test_script_restriction_leaves_steps_to_finish_a_character(tiny):
    """A lone UTF-8 lead byte (3 bytes missing) is allowed only while 3 more tokens fit the budget."""
    from types import SimpleNamespace

    from tokensteer.constraints.script import ScriptOnly

    table = token_table(tiny.tokenizer)
    lead = table.tokens.index(b"\xf3")  # starts U+E0100.. (variation selectors, Inherited)
    only = ScriptOnly(table, ["latin"])
    for steps_left, allowed in [(1, False), (3, False), (4, True), (None, True)]:
        state = SimpleNamespace(batch_size=1, step=0, max_tokens=steps_left)
        only.reset(state)
        assert bool(only.allowed(state, 0)[lead]) is allowed, steps_left
    state = SimpleNamespace(batch_size=1, step=0, max_tokens=3)
    only.reset(state)
    only.pending[0] = b"\xf3\xa0"  # two bytes missing: a continuation byte leaves one missing
    cont = table.tokens.index(b"\x84")
    for step, allowed in [(0, True), (1, True), (2, False)]:  # 3, 2, 1 tokens left
        state.step = step
        assert bool(only.allowed(state, 0)[cont]) is allowed, step


def test_script_soft_downweights_other_scripts(tiny):
    from tokensteer.constraints.script import ScriptPreference

    table = token_table(tiny.tokenizer)
    soft = ScriptPreference(table, ["Cyrillic"], 0.01)
    assert soft.bias.min() < -4 and soft.bias.max() == 0
    lp = torch_log_uniform(table.size)
    out = soft.logprobs(None, lp)
    foreign = soft.bias < 0
    assert out[0, foreign].exp().sum() < lp[0, foreign].exp().sum()


def torch_log_uniform(v: int):
    import torch

    return torch.log_softmax(torch.zeros(1, v), dim=-1)


def test_constraints_compose_in_one_mask(tiny):
    spec = ConstraintSpec(ban=["the"], words=6, end_word="dog", script=["Latin"])
    [c] = build(tiny, spec)
    assert len(c.parts) == 3
    for g in sample(tiny, spec, 5, max_tokens=40):
        assert len(g.text.split()) == 6 and g.text.split()[-1] == "dog" and not banned_in(g.text, "the")


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(ban=["dog"], require=["dog"]), "banned"),
        (dict(ban=["Dog"], end_word="dog"), "banned"),
        (dict(ban=["dog"], require=["hot dog"]), "banned"),
        (dict(regex="(unclosed"), "invalid regex"),
        (dict(words=2, require=["a b", "c"]), "too few"),
        (dict(require=["a", "b"], require_within=1), "within"),
        (dict(words=0), "at least 1"),
        (dict(end_word="two words"), "one word"),
        (dict(regex="a", json_schema={"type": "string"}), "only one"),
        (dict(json_schema={"type": "nonsense"}), "not a valid JSON Schema"),
        (dict(script=["Klingonese"]), "unknown Unicode script"),
        (dict(script=["Cyrillic"], require=["dog"]), "not written in"),
        (dict(vocab=["cat"], end_word="dog"), "word list"),
        (dict(script_soft=0.5), "needs --script"),
        (dict(sentences=2, end_word="dog"), "contradict"),
        (dict(ban=[" "]), "empty"),
    ],
)
def test_contradictions_and_mistakes_are_caught(spec, message):
    with pytest.raises(UserError, match=message):
        check(ConstraintSpec(**spec))


def test_grammar_errors_are_one_line():
    with pytest.raises(UserError) as err:
        check(ConstraintSpec(regex="a(b"))
    assert "\n" not in str(err.value) and "unclosed group" in str(err.value)


def test_spec_from_mapping_reads_files(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "words.txt").write_text("the cat # comment\nsat, mat\n")
    spec = from_mapping({"json_schema": str(tmp_path / "s.json"), "vocab": str(tmp_path / "words.txt"), "keywords": "cat"})
    assert spec.json_schema == SCHEMA and spec.vocab == ["the", "cat", "sat", "mat"] and spec.require == ["cat"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot parse"):
        from_mapping({"json_schema": str(tmp_path / "bad.json")})
    with pytest.raises(UserError, match="unknown constraint"):
        from_mapping({"bann": ["x"]})


def test_eval_method_uses_item_fields(tiny):
    from tokensteer.eval.methods import make_method
    from tokensteer.eval.tasks import Item, get_task

    m = make_method("constraints:{ban: [the]}")
    task = get_task("count")
    a = Item("the cat sat", {"words": 4, "end_word": "dog"})
    b = Item("a quick brown", {"words": 6, "end_word": "five"})
    ca, cb = m.controls(tiny, task, a), m.controls(tiny, task, b)
    assert ca is cb  # one control list: the items share a batch, each row with its own constraints
    g = tokensteer.generate(tiny, [a.prompt, b.prompt], SamplingConfig(max_tokens=30, temperature=1.0, seed=1), ca)
    assert count_check(g[0].text, 4, "dog")["success"] and count_check(g[1].text, 6, "five")["success"]
    assert not any(banned_in(x.text, "the") for x in g)


def test_cli_rejects_contradiction_before_loading(tmp_path):
    from typer.testing import CliRunner

    from tokensteer.cli import app

    r = CliRunner().invoke(app, ["generate", "hi", "--model", str(tmp_path / "missing"), "--ban", "sea", "--end-word", "sea"])
    assert r.exit_code == 2 and "banned" in r.output


def test_token_table_recovers_byte_pieces(tiny):
    table = token_table(tiny.tokenizer)
    joined = b"".join(table.tokens[i] for i in tiny.tokenizer.encode("héllo wörld", add_bos=False))
    assert joined.decode("utf-8") == "héllo wörld"


class _CountingSessions:
    """Wraps ``lm.session`` so a test can count forward passes (step, step_pending and extend calls)."""

    def __init__(self, lm) -> None:
        self.inner, self.calls = lm.session, 0

    def __call__(self, *a, **k):
        sess, outer = self.inner(*a, **k), self

        class Counted:
            def __getattr__(self, name):
                return getattr(sess, name)

            def step(self, tokens):
                outer.calls += 1
                return sess.step(tokens)

            def step_pending(self, tokens):
                outer.calls += 1
                return sess.step_pending(tokens)

            def extend(self, tokens):
                outer.calls += 1
                return sess.extend(tokens)

        return Counted()


def test_fast_forward_feeds_fixed_json_text_in_fewer_passes(tiny, monkeypatch):
    counter = _CountingSessions(tiny)
    monkeypatch.setattr(tiny, "session", counter)
    cfg = SamplingConfig(max_tokens=80, temperature=0.0)
    outs = {}
    for ff in (True, False):
        counter.calls = 0
        g = tokensteer.generate(tiny, "the cat", cfg, build(tiny, ConstraintSpec(json_schema=SCHEMA, fast_forward=ff)))
        jsonschema.validate(json.loads(g.text), SCHEMA)
        outs[ff] = (g, counter.calls)
    (g_ff, calls_ff), (g_plain, calls_plain) = outs[True], outs[False]
    assert calls_plain == len(g_plain.tokens)  # one pass per token (EOS included, the last one not fed)
    assert calls_ff < calls_plain / 2, (calls_ff, calls_plain)  # the keys and braces go in one pass each
    # forced tokens report the real masked log-probability of the logits they were fed with
    assert all(-float("inf") < lp <= 0.0 for lp in g_ff.logprobs)


@SLOW
@given(seed=st.integers(0, 10_000))
def test_fast_forward_keeps_json_valid_in_batches(tiny, seed):
    for g in sample(tiny, ConstraintSpec(json_schema=SCHEMA, fast_forward=True), seed, max_tokens=80):
        assert g.finish_reason == "eos", g.text
        jsonschema.validate(json.loads(g.text), SCHEMA)


def test_fast_forward_is_off_when_another_constraint_masks(tiny, monkeypatch):
    """A banned word could forbid the forced text, so with two constraints nothing is forced."""
    counter = _CountingSessions(tiny)
    monkeypatch.setattr(tiny, "session", counter)
    g = tokensteer.generate(tiny, "the cat", SamplingConfig(max_tokens=80), build(tiny, ConstraintSpec(json_schema=SCHEMA, ban=["dog"])))
    assert json.loads(g.text)["tag"] == "cat"
    assert counter.calls == len(g.tokens)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rest=st.binary(min_size=1, max_size=3) | st.sampled_from([b"e", b"at", b"he", b"og", b" ", b"a"]), right=st.booleans())
def test_banned_cross_tables_match_a_plain_scan(tiny, rest, right):
    """The vectorized table of tokens that finish a started match equals the rule written out."""
    from tokensteer.constraints.banned import BannedWords
    from tokensteer.constraints.vocab import WORD_BYTES

    table = token_table(tiny.tokenizer)
    bad, pend = BannedWords(table, ["cat"])._build_cross(rest, right)
    want_bad, want_pend = [], []
    for i, low in enumerate(table.lowered):
        if not low.startswith(rest):
            continue
        if len(low) == len(rest):
            (want_pend if right else want_bad).append(i)
        elif not right or low[len(rest)] not in WORD_BYTES:
            want_bad.append(i)
    assert sorted(bad.tolist()) == want_bad and sorted(pend.tolist()) == want_pend


def _state(max_tokens, step=0, prompt=(), stop=()):
    """A LoopState stand-in for calling one constraint's mask by hand (one row)."""
    from types import SimpleNamespace

    return SimpleNamespace(batch_size=1, step=step, max_tokens=max_tokens, prompt_tokens=[list(prompt)], stop=stop, finished=[False], generated=[[]])


def first_mask(constraint, budget: int):
    """``constraint``'s mask on the first step of a row that may generate ``budget`` tokens."""
    state = _state(budget)
    constraint.start(state)
    return constraint.allowed(state, 0)


def test_exact_words_refuses_a_letterless_piece_the_budget_cannot_finish(tiny):
    """A piece without a letter ("\\x87") needs another token to count as a word: with exactly one
    token per word left it is refused (it once made --words 5 in 5 tokens end with 4 words)."""
    from tokensteer.constraints.counts import ExactWords

    table = token_table(tiny.tokenizer)
    piece, word = table.tokens.index(b"\x87"), table.tokens.index(b" the")
    words = ExactWords(table, 5)
    for budget, allowed in [(5, False), (6, True)]:
        mask = first_mask(words, budget)
        assert bool(mask[word]) and bool(mask[piece]) is allowed, budget
    for seed in range(6):
        for g in sample(tiny, ConstraintSpec(words=5), seed, max_tokens=5, prompts=["dog dog", "the cat ", "naïve é", "x"]):
            assert len(g.text.split()) == 5, g.text


def test_required_word_is_spelled_within_the_budget(tiny):
    """With one token left, a required word is forced in its one-token spelling (" five"), not as
    " f" + "ive" that cannot finish; a budget too small for any spelling is refused up front."""
    from tokensteer.constraints.keywords import RequiredWords

    table = token_table(tiny.tokenizer)
    req = RequiredWords(tiny.tokenizer, table, ["five"])
    state = _state(1, prompt=tiny.tokenizer.encode("x"))
    req.start(state)
    assert [table.tokens[i] for i in req.allowed(state, 0).nonzero().flatten().tolist()] == [b" five"]
    for seed in range(4):
        for g in sample(tiny, ConstraintSpec(require=["five", "dog"]), seed, max_tokens=2):
            assert found("five", g.text) and found("dog", g.text), g.text
    with pytest.raises(UserError, match="need 2 tokens"):
        sample(tiny, ConstraintSpec(require=["hello world"]), 0, max_tokens=1)
    with pytest.raises(UserError, match="need 2 tokens"):  # " x" is two tokens: " " + "x"
        sample(tiny, ConstraintSpec(require=["x"]), 0, max_tokens=1, prompts=["hello"])
    [g] = sample(tiny, ConstraintSpec(require=["x"]), 0, max_tokens=1, prompts=["hello\n"])  # after a space, "x" is one
    assert g.text == "x"


def test_end_word_alone_is_written_before_the_budget_runs_out(tiny):
    """--end-word without --words: the last word is the end word even when the budget ends the text."""
    for seed in range(6):
        for end in ("dog", "cat."):
            for g in sample(tiny, ConstraintSpec(end_word=end), seed, max_tokens=3):
                assert g.text.split()[-1] == end, (end, g.text)
    with pytest.raises(UserError, match="needs at least 2 tokens"):
        sample(tiny, ConstraintSpec(end_word="é"), 0, max_tokens=1)
    with pytest.raises(UserError, match="letter or digit"):
        check(ConstraintSpec(end_word="!"))


def test_sentences_budget_counts_the_tokens_this_vocabulary_needs(tiny):
    """The tiny vocabulary has no token like "a." so N sentences need 2N - 1 tokens (".a.a."): a
    smaller budget is refused before decoding instead of ending with too few sentences."""
    with pytest.raises(UserError, match="--sentences 4 needs at least 7 tokens"):
        sample(tiny, ConstraintSpec(sentences=4), 0, max_tokens=6)
    for seed in range(4):
        for g in sample(tiny, ConstraintSpec(sentences=3), seed, max_tokens=5):
            assert len(re.findall(r"[.!?]+", g.text)) == 3 and g.text[-1] in ".!?", g.text


def test_stop_strings_cannot_cut_constrained_text(tiny):
    """A stop string inside a word the text must hold is refused up front, one that only a grammar's
    text would hold is named when it blocks the text; one spread over two tokens ("a" + "t") is
    never completed, so the text still meets its count."""
    with pytest.raises(UserError, match="stop string"):
        tokensteer.generate(tiny, "hello", SamplingConfig(max_tokens=9, stop=("e",)), build(tiny, ConstraintSpec(require=["five"])))
    with pytest.raises(UserError, match="only text holding a stop string"):  # not "contradict each other"
        tokensteer.generate(tiny, "hello", SamplingConfig(max_tokens=9, stop=("e",)), build(tiny, ConstraintSpec(regex="hello")))
    table = token_table(tiny.tokenizer)
    [words] = build(tiny, ConstraintSpec(words=8))
    state = _state(30, stop=("at",))
    words.start(state)
    ids = {table.tokens.index(x): x for x in (b"t", b"the", b" t", b"a", b"at")}
    before = words.mask(state)[0]
    state.generated[0].append(table.tokens.index(b"a"))  # the text ends in "a": "t..." would finish "at"
    after = words.mask(state)[0]
    assert {x for i, x in ids.items() if before[i]} == {b"t", b"the", b" t", b"a"}
    assert {x for i, x in ids.items() if after[i]} == {b" t", b"a"}


def test_vocabulary_leaves_steps_to_finish_an_open_word(tiny):
    """With two tokens left, "h" is refused ("ello" takes two more) but "he" is allowed ("llo"):
    near the end of the budget every open word must still fit, not only on the last step."""
    from tokensteer.constraints.wordlist import WordList

    table = token_table(tiny.tokenizer)
    words = WordList(table, ["hello", "world", "it's"])
    h, he = table.tokens.index(b"h"), table.tokens.index(b"he")
    for budget, allowed in [(2, False), (3, True)]:
        mask = first_mask(words, budget)
        assert bool(mask[he]) and bool(mask[h]) is allowed, budget
    for seed in range(4):
        for g in sample(tiny, ConstraintSpec(vocab=["hello", "world", "it's"]), seed, max_tokens=3):
            assert all(w in {"hello", "world", "it's"} for w in re.findall(r"[\w']+", g.text.lower())), g.text


def test_exact_words_sees_a_letter_finished_by_a_continuation_byte(tiny):
    """An open piece "\\xc6" becomes the letter "ƀ" with the byte "\\x80": with one token per word left,
    that token (which gives the piece its letter) is allowed and "!" is not. With --script latin it is
    the only way on: refusing it dead-ended --words 7 in 8 tokens."""
    from tokensteer.constraints.counts import ExactWords

    table = token_table(tiny.tokenizer)
    words = ExactWords(table, 2)
    state = _state(3, step=1)
    words.start(state)
    words.count[0], words.in_word[0], words.cur[0], words.has[0] = 1, True, b"\xc6", False
    mask = words.allowed(state, 0)
    assert bool(mask[table.tokens.index(b"\x80")]) and not bool(mask[table.tokens.index(b"\x21")])


def test_required_word_that_prefixes_another_is_not_taken_as_written(tiny):
    """Forcing " to the" and " t": after " to" the keyword "t" is not written (the "o" is glued to
    it), so forcing goes on; it once stopped there and missed both words."""
    import torch

    from tokensteer.constraints.keywords import RequiredWords

    table = token_table(tiny.tokenizer)
    req = RequiredWords(tiny.tokenizer, table, ["to the", "t"], within=5)
    state = _state(24, step=0, prompt=tiny.tokenizer.encode("one two"))
    req.start(state)
    req.generated[0] += b" a b"
    req.allowed(state, 0)  # three words left before the deadline for the three keyword words: forced
    req.on_token(state, torch.tensor([table.tokens.index(b" to")]))
    assert req.forcing[0] and req.spell[0] == b" to"
    for seed in range(6):
        for g in sample(tiny, ConstraintSpec(require=["to the", "t"], require_within=5), seed, max_tokens=24, prompts=["five.", "dog dog", "one two", "a\n"]):
            head = " ".join(g.text.split()[:5])
            assert found("to the", head) and found("t", head), g.text


@pytest.mark.parametrize(
    "spec, max_tokens",
    [
        (ConstraintSpec(words=10, vocab=["the", "cat", "sat", "on", "mat", "dog", "ran"]), 37),
        (ConstraintSpec(sentences=4, vocab=["a", "dog"]), 32),
    ],
)
def test_two_budgeted_constraints_leave_room_for_each_other(tiny, spec, max_tokens):
    """Each constraint keeps room in the budget for what it still needs; together they keep room for
    the sum (an open word must be finished AND the words counted): these once dead-ended."""
    for seed in (589121, 889248, 339207, 0):
        gens = sample(tiny, spec, seed, max_tokens=max_tokens, prompts=["a\n", "the cat ", "x", "dog dog"])
        for g in gens:
            assert all(w in spec.vocab for w in re.findall(r"[\w']+", g.text.lower())), g.text
            if spec.words:
                assert len(g.text.split()) == spec.words, g.text
            else:
                assert len(re.findall(r"[.!?]+", g.text)) == spec.sentences and g.text[-1] in ".!?", g.text


def test_regex_plan_costs_count_the_vocabularys_tokens():
    """(ab){3}c costs 7 single characters but 3 tokens here ("abab", "ab", "c"); near the end of
    the budget only tokens that leave room to finish are allowed."""
    from tokensteer.constraints.regexplan import RegexPlan
    from tokensteer.constraints.vocab import TokenTable

    table = TokenTable([b"", b"a", b"b", b"ab", b"abab", b"c", b"\xe2"], eos_ids=[0])
    plan = RegexPlan("(ab){3}c", table)
    assert plan.dist[plan.initial] == 7 and plan.allowed(plan.initial, 99) is None
    allowed = plan.allowed(plan.initial, 3)  # now exact: 3 tokens
    assert plan.dist[plan.initial] == 3
    assert allowed.tolist() == [True, False, False, True, True, False, False]  # EOS, "ab", "abab"
    assert plan.allowed(plan.initial, 2) is None  # out of reach: llguidance alone decides
    assert plan.step(plan.initial, "ababab") != plan.dead and plan.step(plan.initial, "abc") == plan.dead


@pytest.mark.parametrize("regex", [r"(a|b)*a(a|b){20}", r"\p{L}+"])
def test_regexes_without_a_small_dfa_go_unplanned(tiny, regex):
    from tokensteer.constraints.grammar import regex_plan

    assert regex_plan(regex, token_table(tiny.tokenizer)) is None
    g = sample(tiny, ConstraintSpec(regex=regex), 0, n=1, max_tokens=6)[0]
    assert g.finish_reason in {"length", "eos"}


REGEXES = [r"(cat|dog) [0-9]{2,4}!", r"[a-z ]+\.", r"(yes|no), because [a-z]+\.", r"[0-9]{3}-[0-9]{4}", r"the (cat|mat)+ sat"]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(regex=st.sampled_from(REGEXES), spare=st.integers(0, 2), seed=st.integers(0, 10_000))
def test_regex_finishes_whenever_the_budget_holds_its_shortest_match(tiny, regex, spare, seed):
    """Sampled freely, a regex used to stop half-matched at --max-tokens; with the plan, every row
    completes once the budget holds the fewest tokens a match needs (fast-forward on)."""
    from tokensteer.constraints.regexplan import RegexPlan

    plan = RegexPlan(regex, token_table(tiny.tokenizer))
    plan.allowed(plan.initial, 1)  # exact token costs
    need = int(plan.dist[plan.initial])
    for g in sample(tiny, ConstraintSpec(regex=regex), seed, max_tokens=need + spare):
        assert re.fullmatch(regex, g.text), (g.text, need + spare)


def test_regex_plan_prices_fixed_text_as_the_tokenizer_writes_it():
    """A run the regex fixes (``","key":``) costs the tokens the tokenizer spells it with, not one
    per character, even for DFAs too big for exact costs; a wrong spelling is ignored."""
    from tokensteer.constraints.regexplan import RegexPlan
    from tokensteer.constraints.vocab import TokenTable

    fixed = '","key":'
    tokens = [b""] + [c.encode() for c in sorted(set(fixed) | set("ab0123456789"))] + [fixed.encode()]
    table = TokenTable(tokens, eos_ids=[0])
    regex = '"[ab]' + fixed + "[0-9]"
    spelled = RegexPlan(regex, table, lambda text: [len(tokens) - 1] if text == fixed else [])
    assert spelled.dist[spelled.initial] == 4  # '"', a letter, the run, a digit
    unspelled = RegexPlan(regex, table, lambda text: [1])  # bytes that do not spell the run
    assert unspelled.dist[unspelled.initial] == 3 + len(fixed)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000))
def test_json_schema_finishes_in_a_budget_its_plan_says_fits(tiny, seed):
    from tokensteer.constraints.grammar import regex_plan
    from tokensteer.constraints.regexplan import schema_regex

    schema = {"type": "object", "additionalProperties": False, "required": ["n", "tag"],
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "tag": {"enum": ["cat", "dog"]}}}
    plan = regex_plan(schema_regex(schema), token_table(tiny.tokenizer), lambda t: tiny.tokenizer.encode(t, add_bos=False))
    plan.allowed(plan.initial, 1)
    for g in sample(tiny, ConstraintSpec(json_schema=schema), seed, max_tokens=int(plan.dist[plan.initial]) + 1):
        jsonschema.validate(json.loads(g.text), schema)
