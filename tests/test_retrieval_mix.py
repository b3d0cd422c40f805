"""The R term in the decode loop, on the tiny random model: its distribution is REPLUG's mixture of
the model conditioned on each passage (row path, row-mix path and re-retrieving side sessions
alike), it composes with other terms, and the CLI, eval task and method reach it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tokensteer
from tokensteer.cli import app
from tokensteer.errors import UserError
from tokensteer.formula.engine import FormulaControl
from tokensteer.retrieval import DocStore
from tokensteer.retrieval.term import FLOOR, mixture, weights, with_passage

PASSAGES = ["the cat sat on the mat", "a quick brown fox jumps", "one two three four five", "good great happy kind"]
PROMPT = "the dog ran to the"


def shifting_embed(texts):
    """Passage i is the unit vector e_i; a query points at passage len(query) % 4, a little towards
    the next one, so every new token can change what re-retrieval finds."""
    out = np.zeros((len(texts), len(PASSAGES)), np.float32)
    for r, t in enumerate(texts):
        if t in PASSAGES:
            out[r, PASSAGES.index(t)] = 1.0
        else:
            i = len(t) % len(PASSAGES)
            out[r, i], out[r, (i + 1) % len(PASSAGES)] = 0.8, 0.6
    return out


@pytest.fixture
def kb(tmp_path):
    f = tmp_path / "kb.jsonl"
    f.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(PASSAGES)))
    return DocStore(f, embed=shifting_embed, model="shifting", index_path=tmp_path / "index.json")


def expected(lm, passages, w, prompt, generated=()):
    """log Σ_d w_d · P(y | d ⊕ x), each passage's row run on its own."""
    tok = lm.tokenizer
    rows = [tok.encode(with_passage(p, prompt)) + list(generated) for p in passages]
    sess = lm.session()
    try:
        lp = torch.log_softmax(sess.prefill(rows).float(), -1)
    finally:
        sess.close()
    return torch.logsumexp(lp + w.log()[:, None], 0)


def top(g, step=0):
    return torch.tensor([i for i, _ in g.top_logprobs[step]]), torch.tensor([v for _, v in g.top_logprobs[step]])


@pytest.mark.parametrize("fuse", [True, False])
def test_mixture_matches_replug(tiny, kb, fuse):
    ctl = FormulaControl(tiny, "R(k=2, tau=0.5)", docs=kb, fuse=fuse)
    g = tokensteer.generate(tiny, PROMPT, max_tokens=1, top_logprobs=10, controls=[ctl])
    (hits,) = kb.search([PROMPT], 2)
    assert [e.passages[0]["text"] for e in ctl.retrieval.events] == [hits[0].chunk.text]
    want = expected(tiny, [h.chunk.text for h in hits], weights(hits, 0.5), PROMPT)
    ids, vals = top(g)
    assert torch.allclose(vals, want[ids], atol=1e-4)
    assert int(ids[0]) == int(want.argmax())


def test_mixture_reads_logits_or_log_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 50, generator=g) * 4
    logits[0, 1, 7] = float("-inf")  # a token one passage rules out
    w = torch.softmax(torch.randn(2, 3, generator=g), -1)
    want = torch.logsumexp(torch.log_softmax(logits, -1).clamp(min=FLOOR) + w.log()[:, :, None], 1)
    for rows in (logits, torch.log_softmax(logits, -1), logits + 3.0):
        got = mixture(w, rows)
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(got.exp().sum(-1), torch.ones(2), atol=1e-5)  # already normalised
    one_hot = torch.full((1, 2, 50), float("-inf"))
    one_hot[0, :, 3] = 0.0
    assert bool(torch.isfinite(mixture(torch.tensor([[0.5, 0.5]]), one_hot)).all())  # the floor keeps every token


def test_row_mix_skips_the_prompt_row(tiny, kb):
    ctl = FormulaControl(tiny, "R(k=3)", docs=kb)
    mix = ctl.row_mix()
    assert mix.shape == (3, 4) and mix[:, 0].abs().sum() == 0 and (mix[:, 1:] == torch.eye(3)).all()
    assert FormulaControl(tiny, "R(k=3) - 0.3*M", docs=kb).row_mix() is None  # M reads the prompt's row
    assert FormulaControl(tiny, "R(k=3)", docs=kb, trace=True).row_mix() is None


@pytest.mark.parametrize("formula, rows", [("R(k=3)", 3), ("R(k=3) - 0.3*M", 4), ("R(k=1)", 1), ("R(k=3) - 0.3*R(k=2, tau=10)", 3)])
def test_only_rows_the_formula_reads_are_decoded(tiny, kb, formula, rows):
    from tokensteer.engine import engine_for
    from tokensteer.sampling import SamplingConfig

    h = engine_for(tiny).submit([PROMPT, PROMPT + " big"], SamplingConfig(max_tokens=3, ignore_eos=True),
                                [FormulaControl(tiny, formula, docs=kb)])
    gens = h.result()
    assert h.rows_per_prompt == rows and all(len(g.tokens) == 3 for g in gens)
    assert [g.prompt_tokens for g in gens] == [len(tiny.tokenizer.encode(p)) for p in (PROMPT, PROMPT + " big")]


def test_r_composes_with_the_prompt_row(tiny, kb):
    ctl = FormulaControl(tiny, "R(k=2) - 0.3*M", docs=kb)
    g = tokensteer.generate(tiny, PROMPT, max_tokens=1, top_logprobs=10, controls=[ctl])
    (hits,) = kb.search([PROMPT], 2)
    r = expected(tiny, [h.chunk.text for h in hits], weights(hits, 0.1), PROMPT)
    sess = tiny.session()
    base = torch.log_softmax(sess.prefill([tiny.tokenizer.encode(PROMPT)]).float(), -1)[0]
    sess.close()
    want = torch.log_softmax(r - 0.3 * base, -1)
    ids, vals = top(g)
    assert torch.allclose(vals, want[ids], atol=1e-4)


def test_r_terms_share_their_passage_rows(tiny, kb):
    ctl = FormulaControl(tiny, "R(k=3) - 0.4*R(k=2, tau=10)", docs=kb)
    assert ctl.retrieval.n_rows == 3
    g = tokensteer.generate(tiny, PROMPT, max_tokens=1, top_logprobs=10, controls=[ctl])
    (hits,) = kb.search([PROMPT], 3)
    texts = [h.chunk.text for h in hits]
    r3 = expected(tiny, texts, weights(hits, 0.1), PROMPT)
    r2 = expected(tiny, texts[:2], weights(hits[:2], 10.0), PROMPT)
    want = torch.log_softmax(r3 - 0.4 * r2, -1)
    ids, vals = top(g)
    assert torch.allclose(vals, want[ids], atol=1e-4)


def test_re_retrieval_follows_the_generated_text(tiny, kb):
    ctl = FormulaControl(tiny, "R(k=2, tau=0.3, every=2)", docs=kb)
    g = tokensteer.generate(tiny, PROMPT, max_tokens=6, top_logprobs=10, ignore_eos=True, controls=[ctl])
    events = ctl.retrieval.events
    assert events[0].step == 0 and len(events) >= 2 and all(e.step % 2 == 0 for e in events)
    for step in range(len(g.tokens)):  # each step's distribution: the passages in force then, fed prompt + text so far
        ev = [e for e in events if e.step <= step][-1]
        texts = [p["text"] for p in ev.passages]
        w = torch.tensor([p["weight"] for p in ev.passages])
        want = expected(tiny, texts, w / w.sum(), PROMPT, g.tokens[:step])
        ids, vals = top(g, step)
        assert torch.allclose(vals, want[ids], atol=2e-3), step


def test_re_retrieval_prefills_only_new_passages(tiny, kb, monkeypatch):
    added: list[int] = []
    real = tiny.session

    def session(*args, **kw):
        s = real(*args, **kw)
        if not args and not kw:  # the R term's side session (the engine's own sessions take arguments)
            add = s.add
            s.add = lambda rows, *a, **k: added.append(len(rows)) or add(rows, *a, **k)
        return s

    monkeypatch.setattr(tiny, "session", session)
    ctl = FormulaControl(tiny, "R(k=2, tau=0.3, every=1)", docs=kb)
    tokensteer.generate(tiny, PROMPT, max_tokens=8, ignore_eos=True, controls=[ctl])
    texts = [{p["text"] for p in e.passages} for e in ctl.retrieval.events]
    entering = [len(now - before) for before, now in zip(texts, texts[1:])]
    moves = [n for n in entering if n]
    assert added == [2] + moves and 0 < sum(moves) < 2 * len(moves)  # the first prefill, then only passages new to a row


def test_r_without_documents(tiny):
    with pytest.raises(UserError, match="no documents were given: add --docs PATH"):
        FormulaControl(tiny, "R(k=2) + M")


def test_batched_prompts_get_their_own_passages(tiny, kb):
    prompts = [PROMPT, PROMPT + " big"]  # different lengths: different passages
    ctl = FormulaControl(tiny, "R(k=1)", docs=kb)
    gens = tokensteer.generate(tiny, prompts, max_tokens=1, top_logprobs=5, controls=[ctl])
    for b, (p, g) in enumerate(zip(prompts, gens)):
        (hits,) = kb.search([p], 1)
        assert [e.passages[0]["doc"] for e in ctl.retrieval.events if e.prompt == b] == [hits[0].chunk.doc]
        want = expected(tiny, [hits[0].chunk.text], torch.ones(1), p)
        ids, vals = top(g)
        assert torch.allclose(vals, want[ids], atol=1e-4)


# ---- the CLI (MiniLM embeddings, the tiny model) ----

runner = CliRunner()


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "kb"
    d.mkdir()
    for i, t in enumerate(PASSAGES):
        (d / f"p{i}.txt").write_text(t)
    return d


@pytest.mark.parametrize("args, fragment", [
    (["--docs", "{missing}", "--retrieve", "2"], "do not exist"),
    (["--docs", "{folder}", "--retrieve", "9"], "hold only 4 passages; lower k"),
    (["--retrieve", "2"], "--retrieve needs --docs"),
    (["--docs", "{folder}"], "--docs is read by retrieval terms"),
    (["--docs", "{folder}", "--retrieve-tau", "0.5"], "add --retrieve K"),
    (["--docs", "{folder}", "--retrieve", "0"], "whole number ≥ 1"),
    (["--docs", "{folder}", "--retrieve", "2", "--formula", "M"], "inside the formula"),
    (["--formula", "R(k=2)"], "no documents were given"),
])
def test_cli_mistakes(tiny_dir, folder, tmp_path, args, fragment):
    args = [a.format(folder=folder, missing=tmp_path / "nope") for a in args]
    r = runner.invoke(app, ["generate", "x", "--model", str(tiny_dir), "-n", "2", *args])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert fragment in r.output


def test_cli_trace_and_json(tiny_dir, folder):
    r = runner.invoke(app, ["generate", "the cat", "--model", str(tiny_dir), "-n", "3", "--docs", str(folder),
                            "--retrieve", "2", "--trace", "--no-stream"])
    assert r.exit_code == 0, r.output
    assert "R(k=2): passages from token 0 on" in r.output and "similarity" in r.output
    r = runner.invoke(app, ["generate", "the cat", "--model", str(tiny_dir), "-n", "3", "--docs", str(folder),
                            "--retrieve", "2", "--retrieve-every", "2", "--json"])
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert obj["retrieval"][0]["term"] == "R(k=2, every=2)" and len(obj["retrieval"][0]["passages"]) == 2
    assert abs(sum(p["weight"] for p in obj["retrieval"][0]["passages"]) - 1) < 1e-3
