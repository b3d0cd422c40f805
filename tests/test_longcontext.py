"""The longcontext task: generated prompts fit their budget and hold their answers; scoring;
dense-against-selected comparison on a tiny model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensteer as ts
from tokensteer.errors import UserError
from tokensteer.kvselect import KVSelectConfig
from tokensteer.longcontext import TASKS, evaluate, make_samples, string_match_all
from tokensteer.longcontext.run import Decoded, fidelity


def words_encode(text: str) -> list[str]:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return text.split()


@settings(max_examples=25, deadline=None)
@given(task=st.sampled_from(TASKS), length=st.integers(600, 3000), seed=st.integers(0, 10**6))
def test_prompts_fit_the_budget_and_hold_the_answers(task, length, seed):
    (s,) = make_samples([task], [length], 1, words_encode, seed)
    n = len(words_encode(s.prompt))
    assert n <= length - s.max_new
    assert n >= 0.8 * (length - s.max_new) or task in ("niah_multikey", "cwe")  # filled up to the budget
    for a in s.answers:
        assert a in s.prompt  # the needle (every chain variable, every common word) is in the text
    assert s == make_samples([task], [length], 1, words_encode, seed)[0]  # the same seed, the same prompt


def test_needles_sit_at_their_depth():
    shallow, deep = make_samples(["passkey"], [2000], 2, words_encode, 1)
    at = lambda s: s.prompt.index(f"The pass key is {s.answers[0]}") / len(s.prompt)  # noqa: E731
    assert at(shallow) < 0.4 < 0.6 < at(deep)


def test_cwe_common_words_are_the_most_common():
    (s,) = make_samples(["cwe"], [3000], 1, words_encode, 3)
    lines = [ln.split(". ", 1)[1] for ln in s.prompt.split("\n") if ". " in ln and ln.split(". ", 1)[0].isdigit()]
    counts = {w: lines.count(w) for w in set(lines)}
    top = sorted(counts, key=counts.get, reverse=True)[:10]
    assert set(top) == set(s.answers)


def test_string_match_all_is_rulers_metric():
    assert string_match_all("they are: ABCDE, FGHIJ", ["abcde", "fghij", "KLMNO"]) == pytest.approx(200 / 3)
    assert string_match_all("nothing", ["12345"]) == 0.0


def test_unknown_task_and_bad_counts():
    with pytest.raises(UserError):
        make_samples(["essay"], [1000], 1, words_encode)
    with pytest.raises(UserError):
        make_samples(["passkey"], [1000], 0, words_encode)
    with pytest.raises(UserError):
        make_samples(["passkey"], [20], 1, words_encode)  # no room even for the question


def test_fidelity_stops_at_the_first_different_token():
    import torch

    lp = [torch.log_softmax(torch.tensor([2.0, 1.0, 0.0]), 0)] * 3
    other = [torch.log_softmax(torch.tensor([0.0, 1.0, 2.0]), 0)] * 3
    d = Decoded([0, 0, 0], "", 0, 0, lp)
    same = Decoded([0, 0, 0], "", 0, 0, lp)
    diff = Decoded([2, 2, 2], "", 0, 0, other)
    assert fidelity(d, same) == ([0.0, 0.0, 0.0], [True, True, True])
    kls, agree = fidelity(d, diff)
    assert len(kls) == 1 and agree == [False] and kls[0] > 0.5


def test_evaluate_on_a_tiny_model(tiny_dir):
    lm = ts.load(str(tiny_dir), backend="torch")
    full = evaluate(lm, KVSelectConfig(k=1000, local=8, init=2, chunk=64), ["passkey", "niah_single"], [480], 1)
    rec = full["records"][0]
    assert rec["kl"] == pytest.approx(0.0, abs=1e-6) and rec["top1_agreement"] == 1.0 and rec["dense_text"] == rec["selected_text"]
    small = evaluate(lm, KVSelectConfig(k=8, local=8, init=2, chunk=64, theta=0.0), ["passkey"], [480], 1)
    summary = small["summary"]["480"]
    assert set(summary["tasks"]) == {"passkey"} and summary["hit_rate"] > 0
    assert small["records"][0]["stats"]["selected"] > 0
    assert lm.kv_select is None  # evaluate leaves the backend as it found it
    with pytest.raises(UserError):
        evaluate(lm, KVSelectConfig(), ["passkey"], [1024], 1)  # past the tiny model's 512 positions


def test_parse_lengths():
    from tokensteer.longcontext.cli import parse_lengths

    assert parse_lengths("4k, 8k,16000") == [4096, 8192, 16000] and parse_lengths(None) == [4096]
    for bad in ("4x", "100", ","):
        with pytest.raises(UserError):
            parse_lengths(bad)


def test_eval_cli_longcontext(tiny_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from tokensteer.cli import app

    r = CliRunner().invoke(app, ["eval", "--task", "longcontext:passkey", "--lengths", "480", "--n", "1", "--model", str(tiny_dir),
                                 "--kv-select", "k=8,local=8,init=2,chunk=64", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["kv_select"].startswith("k=8,") and set(res["summary"]["480"]["tasks"]) == {"passkey"}
    assert "longcontext" in r.output and "480" in r.output
    kept = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [k["dense_text"] for k in kept] == [k["dense_text"] for k in res["records"]] and len(kept) == 1


def test_runs_spread_depths_and_interleave_tasks(tiny_dir):
    from tokensteer.longcontext.run import spread

    assert [spread(i) for i in range(4)] == [0.0, 0.5, 0.25, 0.75]
    lm = ts.load(str(tiny_dir), backend="torch")
    seen = []
    res = evaluate(lm, KVSelectConfig(k=8, local=8, init=2, chunk=64), ["passkey", "niah_single"], [480], 2, on_record=seen.append)
    assert [(r["task"], r["depth"]) for r in seen] == [("passkey", 0.25), ("niah_single", 0.25), ("passkey", 0.75), ("niah_single", 0.75)]
    assert seen == res["records"]
