"""The formula language without a model: parsing, round trips, errors with columns, weight checks."""

from __future__ import annotations

import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from tokensteer.errors import UserError
from tokensteer.formula import RECIPES, check, parse
from tokensteer.formula.ast import Const, Formula, Guide, M, Model, lin, op, to_string
from tokensteer.formula.parser import FormulaError

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
weights = st.floats(min_value=-50, max_value=50, allow_nan=False, allow_infinity=False)
leaves = st.one_of(
    st.builds(Model, texts, st.one_of(st.none(), texts.filter(str.strip)), st.floats(min_value=0.05, max_value=5)),
    st.builds(Guide, st.sampled_from(["positive", "nontoxic", "formal"]), st.integers(1, 100)),
    st.builds(Const, weights),
)


def _lin_in_range(terms):
    """``lin`` of the terms, or no example where nested sums multiply a weight past the limit."""
    try:
        return lin(terms)
    except UserError:
        reject()


def _extend(children):
    combos = st.builds(lambda name, xs: op(name, *xs), st.sampled_from(["union", "softunion", "intersection"]), st.lists(children, min_size=2, max_size=3))
    filters = st.one_of(
        st.builds(lambda x, k: op("topk", x, param=k), children, st.integers(1, 50)),
        st.builds(lambda x, p: op("topp", x, param=p), children, st.floats(min_value=0.01, max_value=1)),
        st.builds(lambda x, p: op("nucleus", x, param=p), children, st.floats(min_value=0.01, max_value=1)),
        st.builds(lambda x, t: op("temp", x, param=t), children, st.floats(min_value=0.05, max_value=5)),
    )
    sums = st.builds(_lin_in_range, st.lists(st.tuples(weights, children), min_size=1, max_size=4))
    return st.one_of(combos, filters, sums)


trees = st.recursive(leaves, _extend, max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(trees, st.sampled_from(["logits", "normalized"]))
def test_round_trip(node, mode):
    f = Formula(node, mode)
    text = str(f)
    back = parse(text)
    assert back == f, text
    assert str(back) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('M C ( ) , + - * / = : "x\' 0.5 union topk nucleus normalized positive −×')), max_size=30))
def test_any_input_parses_or_fails_cleanly(text):
    try:
        parse(text)
    except FormulaError as e:
        assert 1 <= e.column <= len(text) + 1
    except UserError:
        pass


@pytest.mark.parametrize(
    "text,column,words",
    [
        ('M("x"', 6, "expected"),
        ("2*M*M", 4, "multiply"),
        ("M + ", 5, "expected a term"),
        ("M + foo", 5, "unknown name"),
        ('C("nope")', 3, "unknown guide"),
        ("topk(M, 0.5)", 1, "whole number"),
        ("M / M", 3, "divide"),
        ("M(T=0)", 3, "temperature"),
        ("M $ 2", 3, "unexpected character"),
        ("M M", 3, "unexpected"),
        ("sideways: M", 1, "unknown mode"),
        ('M("a" + "b")', 7, "strings cannot"),
        ("", 1, "empty"),
        ("union(M)", 1, "at least 2"),
        ("cfg", 1, "needs text"),
    ],
)
def test_malformed_input_points_at_the_column(text, column, words):
    with pytest.raises(FormulaError) as e:
        parse(text)
    assert e.value.column == column, str(e.value)
    assert words in str(e.value)
    assert str(e.value).splitlines()[-1].index("^") == column + 1  # the caret sits under it


def test_python_operators_equal_the_string_form():
    from tokensteer.formula import C, nucleus, union

    built = nucleus(M + 2 * (M("a") - M("b")) - 0.5 * union(M("t"), M) + C("positive"), 0.9)
    assert parse('nucleus(M + 2*(M("a") - M("b")) - 0.5*union(M("t"), M) + C("positive"), 0.9)').root == built
    assert parse("M − 2×M('a')").root == M - 2 * M("a")  # unicode operators, single quotes
    assert parse("M + M").root == 2 * M
    assert parse("(M + M(\"a\")) / 2").root == 0.5 * M + 0.5 * M("a")


def test_effective_weights_normalized_mode_shows_the_lma_trap():
    r = check(parse('normalized: M - 0.6*M("adult")'))
    assert [round(w.effective, 6) for w in r.weights] == [2.5, -1.5]
    assert any("2.5" in n for n in r.notes)
    r = check(parse('M - 0.6*M("adult")'))  # logits mode: used as written
    assert [w.effective for w in r.weights] == [1.0, -0.6]
    assert any("temperature" in n for n in r.notes)


@pytest.mark.parametrize("mode", ["logits", "normalized"])
@pytest.mark.parametrize("text", ['M("a") - M', 'M - 1.5*M("a")', 'M + union(M("a"), M) - 2.5*M("b")', 'M + topk(M("a") - M, 5)'])
def test_weights_that_do_not_sum_to_a_positive_number_are_refused(mode, text):
    with pytest.raises(UserError, match="Σλ"):
        check(parse(f"{mode}: {text}"))


@pytest.mark.parametrize(
    "text,words",
    [("3", "no model term"), ('C("positive")', "no model term"), ('union(M, C("positive"))', "must be a term of a sum"), ("M + union(M, 2)", None)],
)
def test_nonsense_is_refused(text, words):
    if words is None:
        check(parse(text))
        return
    with pytest.raises(UserError, match=words):
        check(parse(text))


def test_recipes_parse_check_and_document_their_formula():
    for name, r in RECIPES.items():
        assert r.doc
        if all(d is not None for _, d in r.params):
            f = parse(name)
            check(f)
            assert to_string(f.root) == to_string(parse(r.formula()).root)
    assert parse('cfg("Be kind:\\n", 2)').root == 2 * M("Be kind:\n") - M
    assert parse('cfg(text="x", gamma=3)').root == 3 * M("x") - 2 * M
    assert parse('expert-antiexpert("a", "b", 1)').root == op("nucleus", M + M("a") - M("b"), param=0.9)
    assert parse('M - expert-antiexpert("a", "b")').root != parse("M").root  # a recipe is a term too
    with pytest.raises(UserError, match="must be a number"):
        parse('positive("strong")')


def test_a_negated_constant_too_large_is_refused_at_its_sign():
    """'-1e61' raised a UserError without a column (the sign turns the constant into a weight)."""
    with pytest.raises(FormulaError) as e:
        parse("M + -1e61")
    assert e.value.column == 5
