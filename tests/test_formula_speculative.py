"""Speculative formulas (issue #5) on tiny random models: greedy output equals the plain formula's
token for token, sampled output follows the exact formula distribution, Session.extend equals
stepping, and a rolled-back session continues exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

import tokensteer as ts
from tokensteer.errors import UserError
from tokensteer.formula import FormulaControl
from tokensteer.formula.speculative import accept, draft_of
from tokensteer.formula.parser import parse
from tokensteer.hooks import Control
from tokensteer.sampling import SamplingConfig

PROMPTS = ["the cat sat", "one two three four five"]  # different lengths: padded rows


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """A second tiny model with the same tokenizer and other random weights: the "other model"."""
    folder = tmp_path_factory.mktemp("tiny-other")
    make_tiny_model(folder, seed=1)
    return str(folder)


def formulas(o: str) -> list[str]:
    """Formulas whose greedy output varies and whose drafts are sometimes kept, sometimes not (the
    random tiny models alone mostly repeat the prompt's last token)."""
    return [
        f'M + 2*(M(model="{o}") - M)',
        f'normalized: 1.5*M(model="{o}", T=2) - 0.5*M("good ")',
        f'union(2*M(model="{o}") - M, M("the ") - 0.5*M)',
        f'nucleus(M + 2*M(model="{o}", T=2) - 1.5*M("bad "), 0.9)',
        f'topk(3*M("good ", model="{o}") - 2*M, 5)',
        f'softunion(M, M(model="{o}")) - 0.6*M("a ")',
    ]


class Recorder(Control):
    """Keeps the log-probabilities the formula produced at every step."""
    stages = frozenset({'rewrite'})

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def logprobs(self, state, logprobs):
        self.steps.append(logprobs.clone())
        return logprobs


class Force(Control):
    """Forces the first len(prefix) tokens (to enumerate the exact distribution)."""
    stages = frozenset({'mask'})

    def __init__(self, prefix: list[int]) -> None:
        self.prefix = prefix

    def mask(self, state):
        if state.step >= len(self.prefix):
            return None
        m = torch.zeros(state.batch_size, state.tokenizer.vocab_size, dtype=torch.bool)
        m[:, self.prefix[state.step]] = True
        return m


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_greedy(tiny, other_dir, k):
    drafted = accepted = 0
    for f in formulas(other_dir):
        plain = ts.generate(tiny, PROMPTS, max_tokens=12, ignore_eos=True, top_logprobs=3, controls=[FormulaControl(tiny, f)])
        ctrl = FormulaControl(tiny, f, speculative=k)
        spec = ts.generate(tiny, PROMPTS, max_tokens=12, ignore_eos=True, top_logprobs=3, controls=[ctrl])
        for a, b in zip(plain, spec):
            assert a.tokens == b.tokens, (f, k)
            assert a.text == b.text and a.finish_reason == b.finish_reason
            assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)  # reported under the full formula
            assert [t for t, _ in b.top_logprobs[0]] == [t for t, _ in a.top_logprobs[0]]
        assert ctrl.stats.rounds >= 1 and ctrl.stats.other_calls == ctrl.stats.rounds
        drafted, accepted = drafted + ctrl.stats.drafted, accepted + ctrl.stats.accepted
    assert 0 < accepted < drafted  # both kept and rejected drafts were exercised


def test_greedy_speculative_stops_like_greedy(tiny, other_dir):
    """A stop string or EOS inside the drafted tokens ends the text where plain decoding ends it."""
    f = f'M + M(model="{other_dir}")'
    full = ts.generate(tiny, PROMPTS[0], max_tokens=20, ignore_eos=True, controls=[FormulaControl(tiny, f)])
    stop = full.text[5:8]
    assert stop.strip(), full.text
    for kw in (dict(stop=[stop], ignore_eos=True), dict(max_tokens=7)):
        kw = {"max_tokens": 20, **kw}
        a = ts.generate(tiny, PROMPTS, controls=[FormulaControl(tiny, f)], **kw)
        b = ts.generate(tiny, PROMPTS, controls=[FormulaControl(tiny, f, speculative=4)], **kw)
        assert [(g.tokens, g.text, g.finish_reason) for g in a] == [(g.tokens, g.text, g.finish_reason) for g in b]
    assert a[0].finish_reason == "length" and len(b[0].tokens) == 7


def test_speculation_composes_with_residual_edits(tiny, other_dir):
    """Hook-2 controls (steering) run inside the forward pass, so they may draft along."""
    from tokensteer.hooks import ResidualEdit

    class Steer(Control):
        stages = frozenset({"edits"})

        def residual_edits(self, n_rows, rows_per_prompt):
            return [ResidualEdit(layer=1, vector=torch.randn(tiny.hidden_size, generator=torch.Generator().manual_seed(0)) * 3)]

    f = formulas(other_dir)[0]
    a = ts.generate(tiny, PROMPTS, max_tokens=10, ignore_eos=True, controls=[Steer(), FormulaControl(tiny, f)])
    b = ts.generate(tiny, PROMPTS, max_tokens=10, ignore_eos=True, controls=[Steer(), FormulaControl(tiny, f, speculative=3)])
    plain = ts.generate(tiny, PROMPTS, max_tokens=10, ignore_eos=True, controls=[FormulaControl(tiny, f)])
    assert [g.tokens for g in a] == [g.tokens for g in b] != [g.tokens for g in plain]


def test_speculation_saves_other_model_calls(tiny, other_dir):
    """With the draft close to the formula, several tokens are confirmed per other-model forward."""
    f = f'normalized: 0.7*M + 0.3*M(model="{other_dir}")'
    ctrl = FormulaControl(tiny, f, speculative=4)
    gens = ts.generate(tiny, PROMPTS[0], max_tokens=24, ignore_eos=True, controls=[ctrl])
    assert ctrl.stats.acceptance > 0.5
    assert ctrl.stats.other_calls < len(gens.tokens) / 2


def exact_joint(lm, f: str, prompt: str, n: int) -> dict[tuple[int, ...], float]:
    """P(first n tokens) of the formula, enumerated with the non-speculative control."""
    out: dict[tuple[int, ...], float] = {}

    def walk(prefix: list[int], prob: float) -> None:
        if len(prefix) == n:
            out[tuple(prefix)] = prob
            return
        rec = Recorder()
        ctrls = [FormulaControl(lm, f), rec, Force(prefix)]
        ts.generate(lm, prompt, max_tokens=len(prefix) + 1, ignore_eos=True, temperature=1.0, seed=0, controls=ctrls)
        p = rec.steps[len(prefix)][0].exp()
        for t in torch.nonzero(p).flatten().tolist():
            walk(prefix + [t], prob * float(p[t]))

    walk([], 1.0)
    return out


def empirical_joint(lm, f: str, prompt: str, n: int, k: int, batch: int, seeds) -> tuple[dict, float]:
    counts: dict[tuple[int, ...], int] = {}
    drafted = accepted = 0
    for s in seeds:
        ctrl = FormulaControl(lm, f, speculative=k)
        for g in ts.generate(lm, [prompt] * batch, max_tokens=n, ignore_eos=True, temperature=1.0, seed=s, controls=[ctrl]):
            counts[tuple(g.tokens)] = counts.get(tuple(g.tokens), 0) + 1
        drafted, accepted = drafted + ctrl.stats.drafted, accepted + ctrl.stats.accepted
    total = sum(counts.values())
    return {key: c / total for key, c in counts.items()}, accepted / drafted


def total_variation(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(key, 0.0) - b.get(key, 0.0)) for key in set(a) | set(b))


@pytest.mark.parametrize(
    "formula,batch,seeds",
    [
        ('topk(M(T=3) + M(model="{o}", T=3), 3)', 8, range(120)),  # 960 samples
        ('normalized: topk(0.5*M("good ", T=2) + 0.5*M(model="{o}", T=2), 3)', 16, range(60)),
    ],
)
def test_sampling_is_exact_in_distribution(tiny, other_dir, formula, batch, seeds):
    """The joint of the first 3 sampled tokens (27 outcomes, k=2 so drafts chain) matches the formula.

    Fixed seeds make it deterministic. On these seeds the correct rule gives TV ≈ 0.03, while
    always accepting, resampling from P instead of the residual, or accepting with min(1, Q/P) give
    TV 0.16–0.27 or tokens outside the support (checked in a scratch run), so the check can fail.
    """
    f = formula.format(o=other_dir)
    exact = exact_joint(tiny, f, PROMPTS[0], 3)
    assert len(exact) == 27 and sum(exact.values()) == pytest.approx(1.0, abs=1e-5)
    emp, acceptance = empirical_joint(tiny, f, PROMPTS[0], 3, 2, batch, seeds)
    assert set(emp) <= set(exact)
    assert 0.2 < acceptance < 0.98  # both the accept and the residual paths ran
    assert total_variation(emp, exact) < 0.09


def test_accept_rule_first_token_follows_p():
    """The rule alone, on fixed distributions: the token at the first position is distributed as P
    (accepted draft or residual sample), whatever the draft Q, over 40,000 rows of one batch."""
    g = torch.Generator().manual_seed(0)
    V, n, B = 6, 3, 40000
    p = torch.log_softmax(torch.randn(n + 1, 1, V, generator=g) * 1.5, -1).expand(n + 1, B, V)
    q = torch.log_softmax(torch.randn(n, 1, V, generator=g) * 1.5, -1).expand(n, B, V)
    drafted = torch.multinomial(q[:, 0].exp(), B, replacement=True, generator=g)  # [n, B] ~ Q
    cfg = SamplingConfig(temperature=1.0)
    keep, tokens, accepted = accept(cfg, g, p, q, drafted, [False] * B)
    assert keep == 0 and 0 < float(accepted.float().mean()) < n
    first = torch.where(accepted > 0, drafted[0], tokens)  # what each row emits first
    emp = torch.bincount(first, minlength=V).float() / B
    assert (emp - p[0, 0].exp()).abs().sum() / 2 < 0.01
    assert (emp - q[0, 0].exp()).abs().sum() / 2 > 0.05  # not simply the draft


def test_draft_replaces_other_models_by_the_loaded_model():
    f = parse('M + 2*(M(model="x") - M) + union(M("a ", model="y", T=2), M)')
    assert str(draft_of(f.root)) == 'M + union(M("a ", T=2), M)'


def test_extend_equals_repeated_steps_torch(tiny):
    rows = [tiny.tokenizer.encode("the cat sat on the mat and the dog"), tiny.tokenizer.encode("one two")]
    toks = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    a, b = tiny.session(), tiny.session()
    a.prefill(rows), b.prefill(rows)
    got = a.extend(toks)
    want = torch.stack([b.step(toks[:, j]) for j in range(4)], 1)
    assert got.shape == (2, 4, tiny.tokenizer.vocab_size)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_rollback_continues_identically_torch(tiny):
    """Trim after a multi-token extend, past the tiny model's sliding window of 8, then go on:
    the same logits as a session that never saw the dropped tokens."""
    rows = [tiny.tokenizer.encode("the cat sat on the mat and the dog ran"), tiny.tokenizer.encode("good great")]
    s, ref = tiny.session(rollback=True), tiny.session()
    s.prefill(rows), ref.prefill(rows)
    s.step(torch.tensor([20, 21]))
    s.extend(torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]))
    s.trim(4)  # keep 20, 5 / 21, 10
    for t in ([20, 21], [5, 10]):
        ref.step(torch.tensor(t))
    for t in ([30, 31], [32, 33]):
        torch.testing.assert_close(s.step(torch.tensor(t)), ref.step(torch.tensor(t)), atol=1e-4, rtol=1e-4)


def test_refusals(tiny, other_dir):
    with pytest.raises(UserError, match="another model"):
        FormulaControl(tiny, 'M + M("good ")', speculative=3)
    with pytest.raises(UserError, match="whole number"):
        FormulaControl(tiny, f'M + M(model="{other_dir}")', speculative=-1)
    with pytest.raises(UserError, match="--trace"):
        FormulaControl(tiny, f'M + M(model="{other_dir}")', speculative=2, trace=True)
    ctrl = FormulaControl(tiny, f'M + M(model="{other_dir}")', speculative=2)
    with pytest.raises(UserError, match="repetition penalty"):
        ts.generate(tiny, "the cat", max_tokens=4, repetition_penalty=1.3, controls=[ctrl])
    from tokensteer.controls import RequestControls, build_controls

    ban = build_controls(tiny, RequestControls(ban=["dog"]))
    with pytest.raises(UserError, match="cannot be combined with hard constraints") as err:
        ts.generate(tiny, "the cat", max_tokens=4, controls=[ctrl, *ban])
    assert "AllOf" not in str(err.value)  # users see the flags, not class names


def test_cli_speculate(tiny_dir, other_dir):
    from typer.testing import CliRunner

    from tokensteer.cli import app

    base = ["generate", "the cat", "--model", str(tiny_dir), "--backend", "torch", "-n", "6", "--json"]
    f = f'M + M(model="{other_dir}")'
    plain = CliRunner().invoke(app, [*base, "--formula", f])
    spec = CliRunner().invoke(app, [*base, "--formula", f, "--speculate", "3"])
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    ids = [[t["id"] for t in json.loads(r.output.strip().splitlines()[-1])["tokens"]] for r in (plain, spec)]
    assert ids[0] == ids[1] and len(ids[0]) == 6
    r = CliRunner().invoke(app, [*base, "--formula", 'M + M("good ")', "--speculate", "3"])
    assert r.exit_code == 2 and "nothing to speculate" in r.output
    r = CliRunner().invoke(app, [*base, "--speculate", "3"])
    assert r.exit_code == 2 and "--formula" in r.output
    r = CliRunner().invoke(app, ["formula", "check", f])
    assert r.exit_code == 0 and "--speculate" in r.output


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    lp, lq = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.model
def test_extend_and_rollback_llamacpp():
    """One llama_decode over k tokens per row gives the distributions of k steps, and after a
    trim a row continues as a row that never saw the dropped tokens. llama.cpp's kernels depend on
    the tokens per call, so the match is close (KL ≈ 0.005 measured), not bit for bit."""
    pytest.importorskip("llama_cpp")
    lm = ts.load(None, backend="llamacpp")
    try:
        rows = [lm.tokenizer.encode("The old lighthouse keeper"), lm.tokenizer.encode("Once upon a time")]
        toks = torch.tensor([[506, 1530, 236764], [532, 1000, 506]])
        nxt = torch.tensor([1530, 1000])
        a, b, ref = lm.session(), lm.session(), lm.session()
        try:
            a.prefill(rows), b.prefill(rows)
            got = a.extend(toks)
            want = torch.stack([b.step(toks[:, j]).clone() for j in range(3)], 1)
            assert got.shape == want.shape
            assert torch.equal(got.argmax(-1), want.argmax(-1)) and float(kl(want, got).max()) < 0.02
            a.trim(2)  # back to the first extended token of both rows
            ref.prefill([r + [int(t)] for r, t in zip(rows, toks[:, 0])])
            cont, expect = a.step(nxt).clone(), ref.step(nxt).clone()
            assert torch.equal(cont.argmax(-1), expect.argmax(-1)) and float(kl(expect, cont).max()) < 0.02
        finally:
            for s in (a, b, ref):
                s.close()
    finally:
        lm.close()
