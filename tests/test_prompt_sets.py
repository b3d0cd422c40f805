"""The held-out prompt sets of issue #27 and the shipped-name lookup of ``--prompts``."""

from __future__ import annotations

import pytest

from tokensteer.errors import UserError
from tokensteer.eval.tasks import get_task, shipped_prompt_file


@pytest.mark.parametrize("task,stem,least", [("sentiment-positive", "openings", 320), ("detox", "rude", 120)])
def test_dev_and_test_are_disjoint_and_large(task, stem, least):
    t = get_task(task)
    dev = [it.prompt for it in t.items(f"{stem}_dev")]
    test = [it.prompt for it in t.items(f"{stem}_test.jsonl")]
    assert len(dev) + len(test) >= least
    assert abs(len(dev) - len(test)) <= 1
    assert len(set(dev)) == len(dev) and len(set(test)) == len(test)
    assert not set(dev) & set(test)
    old = {it.prompt for it in t.items()}  # the tuned-on shipped set shares no line with the new ones
    assert not old & (set(dev) | set(test))


def test_new_openings_carry_no_sentiment():
    from tokensteer.eval.scorers import sentiment

    t = get_task("sentiment-negative")
    prompts = [it.prompt for s in ("dev", "test") for it in t.items(f"openings_{s}")]
    assert all(abs(s) < 0.05 for s in sentiment(prompts))


def test_existing_file_wins_over_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "openings_dev").write_text("My own prompt\n", "utf-8")
    assert shipped_prompt_file("openings_dev") is None
    assert [it.prompt for it in get_task("sentiment-positive").items("openings_dev")] == ["My own prompt"]
    assert shipped_prompt_file("openings_test") == "openings_test.jsonl"


@pytest.mark.parametrize("name", ["openings_nope", "sub/openings_dev", ""])
def test_unknown_names_are_files(name):
    assert shipped_prompt_file(name) is None
    with pytest.raises(UserError):
        get_task("sentiment-positive").items(name or "missing-file.txt")


def test_report_gives_perplexity_and_distinct_ratios_against_none():
    from tokensteer.eval.report import ratios, render_html

    res = {"task": "sentiment-positive", "methods": {
        "none": {"n": 2, "success_rate": 0.5, "perplexity": 10.0, "perplexity_median": 8.0, "distinct_2": 0.8},
        "formula:positive": {"n": 2, "success_rate": 1.0, "perplexity": 15.0, "perplexity_median": 10.0, "distinct_2": 0.6},
    }}
    r = ratios(res)["formula:positive"]
    assert r == {"ppl ÷ none": 1.5, "median ppl ÷ none": 1.25, "distinct-2 ÷ none": pytest.approx(0.75)}
    assert "median ppl ÷ none" in render_html(res, [])
    assert ratios({"methods": {"prompt": res["methods"]["none"]}}) == {}
