"""Regressions found by fuzzing the formula engine (benchmarks/results/formula.md, Session 7):
numbers that overflow, strings no tokenizer can encode, errors without a column, sums that took
quadratic time, guides inside recipes, steps where the formula excludes every token, texts printed
as rich markup, report weights that differed from the trace's, and checks made after the model loaded."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensteer as ts
from tokensteer.errors import UserError
from tokensteer.formula import FormulaControl, check, parse
from tokensteer.formula.ast import Model
from tokensteer.formula.parser import FormulaError
from test_formula_speculative import Recorder


@pytest.mark.parametrize(
    "text",
    [
        "M + 1e999",  # parsed to M + inf: every log-probability became NaN
        "union(M, 1e999)",
        "union(M, 1e300)",  # finite in Python, inf in float32
        "M*1e6*1e6*1e6*1e6*1e6*1e6*1e6",  # each factor allowed, their product printed as 1e+42 that did not parse back
        "M*" + "2*" * 1100 + "1",  # product overflowed to inf, printed as the name "inf"
        "M/1e-320",
        "M*1e999",  # refused, but without a column
        "topk(M, 1e999)",  # OverflowError
        'C("positive", k=1e999)',  # OverflowError
        "temp(M, 1e-320)",  # effective weight inf
        "M(T=1e-9)",
        "-(negative(21e6))",  # guards the recipe error keeping a column in this text, not its expansion
        "(" * 3000 + "M" + ")" * 3000,  # too deep: refused without a column
    ],
)
def test_numbers_out_of_range_are_refused_with_a_column(text):
    with pytest.raises(FormulaError) as e:
        check(parse(text))
    assert 1 <= e.value.column <= len(text) + 1


def test_huge_python_ints_in_formulas_are_refused_clearly():
    """``M * 10**400`` built in Python raised OverflowError instead of UserError."""
    from tokensteer.formula import M

    for build in (lambda: M * 10**400, lambda: M + 10**400, lambda: M / 10**400):
        with pytest.raises(UserError, match="weights must be finite"):
            build()


def test_empty_model_path_is_refused_at_its_column():
    """M(model="") looked for a model in the current folder at generation time."""
    with pytest.raises(FormulaError, match="model= needs the path") as e:
        parse('M + M(model="")')
    assert e.value.column == 5


def test_lone_surrogate_in_a_string_is_refused():
    with pytest.raises(FormulaError, match="not valid Unicode") as e:
        parse('M + M("\\ud800")')
    assert e.value.column == 7


def test_long_sum_is_normalised_once(monkeypatch):
    """A sum of n distinct terms merged its terms again at every "+": n²/2 hashes (20k terms took minutes)."""
    calls = []
    real = Model.__hash__
    monkeypatch.setattr(Model, "__hash__", lambda self: calls.append(1) or real(self))
    n = 300
    f = parse(" + ".join(f'M("p{i}")' for i in range(n)))
    assert len(f.root.terms) == n
    assert len(calls) < 10 * n


def test_recipe_with_a_guide_inside_a_bigger_formula_generates(tiny):
    """The recipes' documented use, ``positive(4) + 0.5*C("formal")``, failed at the first token:
    the recipe's guide sits in a nested sum the engine could not evaluate."""
    gens = ts.generate(tiny, ["the cat sat"], max_tokens=3, ignore_eos=True, controls=[FormulaControl(tiny, 'positive(4) + 0.5*C("formal")')])
    assert len(gens[0].tokens) == 3


def test_guide_in_a_nested_sum_equals_the_same_guide_at_the_top(tiny):
    """union(F, -1e6) is F's distribution when F is M + 2·C: a guide in a nested sum rescores the same way."""
    prompts = ["the cat sat", "one two three"]
    runs = []
    for f in ['M + 2*C("positive")', 'union(M + 2*C("positive"), -1e6)']:
        rec = Recorder()
        ts.generate(tiny, prompts, max_tokens=3, ignore_eos=True, controls=[FormulaControl(tiny, f), rec])
        runs.append(torch.stack(rec.steps))
    assert torch.allclose(runs[0], runs[1], atol=1e-4)


@pytest.mark.parametrize(
    "formula",
    ['intersection(topk(M, 1), topk(M + 3*(M("dog ") - M), 1))', 'topk(M, 1) + topk(M + 3*(M("dog ") - M), 1)'],
)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_formula_that_excludes_every_token_is_a_clear_error(tiny, formula, temperature):
    """Filters with no token in common normalised to NaN: greedy silently chose token 0, sampling
    crashed with an index error. On this tiny model the two top tokens differ for these prompts."""
    prompts = ["the cat sat", "one two three four five six", "x"]
    with pytest.raises(UserError, match="leaves no possible next token"):
        ts.generate(tiny, prompts, max_tokens=3, temperature=temperature, seed=1, controls=[FormulaControl(tiny, formula)])


def test_cli_refuses_formula_nonsense_before_loading_the_model(tmp_path):
    """Σλ ≤ 0 and a bad --speculate were found only after the model loaded (here: a missing model),
    and an empty --formula was ignored."""
    from typer.testing import CliRunner

    from tokensteer.cli import app

    missing = str(tmp_path / "no-such-model")
    cases = [
        ('M("a") - 2*M("b")', [], "Σλ"),
        ("M + M('a')", ["--speculate", "2"], "--speculate needs a term on another model"),
        ("", [], "the formula is empty"),  # was taken as "no formula": plain decoding, silently
    ]
    for formula, extra, words in cases:
        r = CliRunner().invoke(app, ["generate", "hello", "--model", missing, "--formula", formula, *extra])
        assert r.exit_code == 2, r.output
        assert words in r.output and "Traceback" not in r.output


def test_conditioning_texts_and_tokens_are_printed_as_text_not_rich_markup(tiny_dir):
    """A prefix like "[/]" crashed `formula check` and `--trace` with a MarkupError traceback, and
    "[red]hi[/red]" was printed as "hi"."""
    import io

    from rich.console import Console
    from typer.testing import CliRunner

    from tokensteer.cli import app
    from tokensteer.formula.trace import TermValue, TokenTrace, render

    formula = 'M + 2*(M("[/]") - M("[red]hi[/red]"))'
    r = CliRunner().invoke(app, ["formula", "check", formula])
    assert r.exit_code == 0, r.output
    assert '"[/]"' in r.output and '"[red]hi[/red]"' in r.output
    r = CliRunner().invoke(app, ["generate", "the cat", "--model", tiny_dir, "--backend", "torch", "-n", "2", "--formula", formula, "--trace"])
    assert r.exit_code == 0, r.output
    assert "[red]hi[/red]" in r.output
    out = io.StringIO()
    render([TokenTrace(0, 5, "[/", [TermValue('M("[b]")', 1.0, -1.0)], 0.0, -1.0, -1.0, 0.0)], Console(file=out, width=200))
    assert "'[/'" in out.getvalue() and 'M("[b]")' in out.getvalue()


@pytest.mark.parametrize("formula", ['normalized: 2*M - 0.5*M("a ") + 3 + 0.5*C("positive")', 'temp(M + M("a ") - 2, 0.5)'])
def test_checked_weights_are_the_weights_the_trace_shows(tiny, formula):
    """In normalized mode the report left a constant undivided while the engine divides it by Σλ."""
    ctrl = FormulaControl(tiny, formula, trace=True)
    ts.generate(tiny, ["the cat sat"], max_tokens=2, ignore_eos=True, controls=[ctrl])
    shown = {t.term: t.weight for t in ctrl.traces[0][0].terms}
    assert shown == pytest.approx({w.term: w.effective for w in ctrl.report.weights})


FRAGMENTS = ["M", "C(\"positive\")", "(", ")", ",", "+", "-", "*", "/", "1e999", "9" * 320, "1e6", "2", "0.5", "1e-320", "union(",
             "topk(", "temp(", "T=", "k=", "\"a\"", "\"\\ud800\"", "\"[/]\"", "normalized:", "positive(", " ", "nan", "inf"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=14))
def test_any_text_parses_and_prints_back_or_is_refused_with_a_column(parts):
    """Property: a formula either parses, prints, and parses back to itself, or raises FormulaError with a column."""
    text = "".join(parts)
    try:
        f = parse(text)
    except FormulaError as e:
        assert 1 <= e.column <= len(text) + 1
        return
    assert parse(str(f)) == f
    try:
        check(f)
    except UserError:
        pass


def test_constraint_that_contradicts_a_formula_filter_says_so(tiny):
    """`--ban the` with topk(M, 1) leaving only " the" said the constraints "contradict each other"."""
    from tokensteer.controls import RequestControls, build_controls

    controls = build_controls(tiny, RequestControls(formula="topk(M, 1)", ban=["the"]))
    with pytest.raises(UserError, match="contradict the tokens the other controls left"):
        ts.generate(tiny, ["the cat sat the"], max_tokens=8, controls=controls)
