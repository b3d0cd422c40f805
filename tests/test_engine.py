"""The engine: requests join and leave a running batch; each keeps the tokens it gets alone."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch

import tokensteer as ts
from tokensteer.engine import Engine
from tokensteer.errors import UserError
from tokensteer.hooks import Control, ResidualEdit
from toy_controls import BanToken, Watched


class Steer(Control):
    """A fixed random vector added at one layer (per-row on torch, a control vector on llama.cpp)."""

    stages = frozenset({"edits"})

    def __init__(self, hidden: int, seed: int, layer: int = 1, norm: float = 2.0) -> None:
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(hidden, generator=g)
        self.v, self.layer = v / v.norm() * norm, layer

    def residual_edits(self, n_rows, rows_per_prompt):
        return [ResidualEdit(self.layer, vector=self.v)]


class Prefixed(Control):
    """Sample from the prompt behind a prefix: one more row per prompt."""

    stages = frozenset({"variants", "rewrite"})

    def variants(self, prompt):
        return ["good happy " + prompt]

    def logprobs(self, state, lp):
        return state.variant_rows(self)[:, 0]


class Boom(Control):
    stages = frozenset({"rewrite"})

    def __init__(self, at: int) -> None:
        self.at = at

    def logprobs(self, state, lp):
        if state.step == self.at:
            raise UserError("boom at step %d" % self.at)
        return lp


class NaNs(Control):
    label = "the NaN control"
    stages = frozenset({"rewrite"})

    def logprobs(self, state, lp):
        return torch.full_like(lp, float("nan"))


def others(lm):
    """Seven requests of different lengths and controls to run beside the one under test."""
    H = lm.hidden_size
    specs = [
        ("the dog ran to the park", dict(max_tokens=30, temperature=1.0, seed=1), []),
        ("a quick brown", dict(max_tokens=5), []),
        ("one two three four five six", dict(max_tokens=25, temperature=0.8, seed=2), [Prefixed()]),
        ("hello", dict(max_tokens=18, temperature=1.2, seed=3, top_p=0.9), [BanToken(5)]),
        ("good great happy kind", dict(max_tokens=12, repetition_penalty=1.3), []),
        ("the cat sat on the mat and the dog", dict(max_tokens=22, temperature=1.0, seed=4), [Steer(H, 1)]),
        ("sad rude", dict(max_tokens=9, temperature=0.7, seed=5, stop=("the",)), []),
    ]
    return [(p, ts.SamplingConfig(**{"ignore_eos": True, **kw}), c) for p, kw, c in specs]


TARGET = ("a cat sat on the", dict(max_tokens=20, temperature=1.0, seed=11, ignore_eos=True))


def run_alone(lm, prompt, cfg, controls=()):
    return Engine(lm).submit([prompt], cfg, controls).result()[0].tokens


def test_a_request_joining_mid_way_keeps_its_tokens(tiny):
    """Batch invariance on torch: the seeded target request gives the same tokens alone and when it
    joins a running batch of seven others with different controls and lengths."""
    cfg = ts.SamplingConfig(**TARGET[1])
    alone = run_alone(tiny, TARGET[0], cfg)
    eng = Engine(tiny)
    handles = [eng.submit([p], c, ctl) for p, c, ctl in others(tiny)]
    for h in handles[:3]:  # the batch is running: its requests have tokens out
        assert h.next() is not None
    target = eng.submit([TARGET[0]], cfg)
    assert target.result()[0].tokens == alone
    for (p, c, ctl), h in zip(others(tiny), handles):
        assert h.result()[0].tokens == run_alone(tiny, p, c, ctl)
    assert eng.counts["groups_opened"] == 1  # everything shared one running group


def test_cancelling_one_request_leaves_the_others_unchanged(tiny):
    eng = Engine(tiny)
    specs = others(tiny)[:4]
    handles = [eng.submit([p], c, ctl) for p, c, ctl in specs]
    victim = eng.submit(["the park"], ts.SamplingConfig(max_tokens=40, ignore_eos=True))
    assert victim.next() is not None
    victim.cancel()
    assert victim.done and victim.cancelled
    with pytest.raises(ts.engine.Cancelled):
        victim.result()
    for (p, c, ctl), h in zip(specs, handles):
        assert h.result()[0].tokens == run_alone(tiny, p, c, ctl)


def test_finished_rows_leave_the_session(tiny):
    """No step decodes a dead row: the batch shrinks as requests and prompts finish."""
    sizes = []

    def watch(s):
        step = s.step

        def counted(tokens):
            sizes.append(int(tokens.shape[0]))
            return step(tokens)

        s.step = counted

    lm = Watched(tiny, watch)
    gens = ts.generate(lm, ["the cat", "a dog ran"], max_tokens=6, controls=[LengthCap({0: 2, 1: 99})])
    assert [len(g.tokens) for g in gens] == [2, 6] and gens[0].finish_reason == "eos"
    assert sizes[0] == 2 and sizes[-1] == 1 and sizes.count(1) >= 3
    assert gens[1].tokens == ts.generate(tiny, "a dog ran", max_tokens=6, controls=[LengthCap({0: 99})]).tokens


class LengthCap(Control):
    """Ends prompt b after ``caps[b]`` tokens by allowing only EOS then, and never before."""

    stages = frozenset({"mask"})

    def __init__(self, caps: dict[int, int]) -> None:
        self.caps = caps

    def mask(self, state):
        m = torch.ones(state.batch_size, state.tokenizer.vocab_size, dtype=torch.bool)
        eos = next(iter(state.tokenizer.eos_ids))
        m[:, eos] = False
        for b, cap in self.caps.items():
            if state.step == cap:
                m[b] = False
                m[b, eos] = True
        return m


def test_a_failing_request_ends_alone(tiny):
    eng = Engine(tiny)
    specs = others(tiny)[:3]
    handles = [eng.submit([p], c, ctl) for p, c, ctl in specs]
    bad = eng.submit(["the cat"], ts.SamplingConfig(max_tokens=10), [Boom(3)])
    with pytest.raises(UserError, match="boom at step 3"):
        bad.result()
    for (p, c, ctl), h in zip(specs, handles):
        assert h.result()[0].tokens == run_alone(tiny, p, c, ctl)


def test_a_control_returning_nan_is_an_error_naming_it(tiny):
    with pytest.raises(UserError, match="the NaN control returned NaN"):
        ts.generate(tiny, "the cat", max_tokens=4, controls=[NaNs()])


def test_requests_from_threads_and_asyncio_share_the_engine(tiny):
    cfg = ts.SamplingConfig(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    want = run_alone(tiny, "the dog", cfg)
    eng = Engine(tiny)
    results: list[list[int]] = []

    def worker():
        results.append(eng.submit(["the dog"], cfg).result()[0].tokens)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()

    async def main():
        async def one():
            return [ev.token async for ev in eng.submit(["the dog"], cfg)]

        return await asyncio.gather(one(), one())

    assert asyncio.run(main()) == [want, want]
    for t in threads:
        t.join()
    assert results == [want] * 3


def test_a_declared_stage_must_match_the_methods():
    with pytest.raises(TypeError, match="does not declare the 'mask' stage"):

        class Undeclared(Control):
            def mask(self, state):
                return None


@pytest.mark.model
def test_llamacpp_rows_keep_their_tokens_in_a_running_batch():
    """llama.cpp's rule with our kernels and a cache of its own per row: a row's logits do not
    depend on its batch, so rows admitted together, joining mid-way or outliving their neighbours
    are bit-identical to rows decoded alone. Requests steered differently run in groups of their
    own, and the stats say why."""
    lm = ts.load(None, backend="llamacpp")
    try:
        prompts = ["The lighthouse keeper", "Once upon a time", "The capital of France is"]
        cfg = ts.SamplingConfig(max_tokens=12, ignore_eos=True)
        alone = [run_alone(lm, p, cfg) for p in prompts]
        eng = Engine(lm)
        with eng.hold():
            together = [eng.submit([p], cfg) for p in prompts]
        assert [h.result()[0].tokens for h in together] == alone
        first = eng.submit([prompts[0]], ts.SamplingConfig(max_tokens=24, ignore_eos=True))
        steered = eng.submit(["The weather today"], ts.SamplingConfig(max_tokens=8), [Steer(lm.hidden_size, 2, layer=6, norm=20.0)])
        short = eng.submit([prompts[2]], ts.SamplingConfig(max_tokens=2, ignore_eos=True))
        assert first.next() is not None and first.next() is not None
        short.result()  # it leaves before the next one joins
        late = eng.submit([prompts[1]], cfg).result()[0]
        solo = Engine(lm).submit([prompts[1]], cfg).result()[0]
        assert (late.tokens, late.logprobs) == (solo.tokens, solo.logprobs)
        steered.result()
        first.result()
        assert eng.counts["apart:edits"] == 1
    finally:
        lm.close()


@pytest.mark.model
def test_llamacpp_requests_arriving_at_random_keep_their_samples():
    """Seeded requests of different lengths, some with several samples (rows forked from one
    prompt), arrive at random times and leave as they finish: each gets exactly what it gets alone."""
    from tokensteer.backends.llamacpp.kernels import kernel

    if kernel() is None:  # TOKENSTEER_NO_NATIVE, or no build for this CPU
        pytest.skip("the rule holds with our kernels: llama.cpp's own products change with the rows in a call")
    lm = ts.load(None, backend="llamacpp")
    try:
        rng = random.Random(3)
        prompts = ["The lighthouse keeper", "Once upon a time", "Dear diary, today", "The train left", "She opened the letter", "In the year 2050"]
        cfgs = [ts.SamplingConfig(max_tokens=rng.randint(3, 14), temperature=0.9, seed=i, ignore_eos=True) for i in range(len(prompts))]
        batches = [[p] * (1 + i % 3) for i, p in enumerate(prompts)]  # repeated prompts fork one prefill
        alone = [Engine(lm).submit(b, c).result() for b, c in zip(batches, cfgs)]
        eng = Engine(lm)
        handles = []
        for b, c in zip(batches, cfgs):
            handles.append(eng.submit(b, c))
            time.sleep(rng.expovariate(1 / 0.08))
        for h, a in zip(handles, alone):
            assert [(g.tokens, g.logprobs) for g in h.result()] == [(g.tokens, g.logprobs) for g in a]
    finally:
        lm.close()


class Fused(Control):
    """Reads its prompt's two rows only as one weighted sum: the backend mixes them before the output layer."""

    stages = frozenset({"variants", "rewrite"})

    def variants(self, prompt):
        return ["good happy " + prompt]

    def row_mix(self):
        return torch.tensor([[0.5, 0.5]])

    def logprobs(self, state, lp):
        assert state.rows_per_prompt == 1  # the mixed row, not the two
        return state.rows[:, 0]


def test_mixed_rows_share_a_batch_with_plain_rows(tiny):
    """A formula's mixed rows (R rows in, R' out) run beside plain requests in one forward pass and
    give the tokens they give alone."""
    cfg = ts.SamplingConfig(max_tokens=10, temperature=1.0, seed=2, ignore_eos=True)
    alone = run_alone(tiny, "the cat", cfg, [Fused()])
    eng = Engine(tiny)
    plain = [eng.submit([p], c, ctl) for p, c, ctl in others(tiny)[:2]]
    assert plain[0].next() is not None
    mixed = eng.submit(["the cat"], cfg, [Fused()])
    assert mixed.result()[0].tokens == alone
    for (p, c, ctl), h in zip(others(tiny)[:2], plain):
        assert h.result()[0].tokens == run_alone(tiny, p, c, ctl)
    assert eng.counts["groups_opened"] == 1


def test_byte_level_requests_run_in_the_engine(tiny):
    """A byte-level request queues, streams and ends in the engine like any other, beside token requests."""
    from tokensteer.bytes import generate_bytes

    cfg = ts.SamplingConfig(max_tokens=6, temperature=1.0, seed=4)
    direct = generate_bytes(tiny, "the ca", cfg)
    eng = Engine(tiny)
    plain = eng.submit(["the dog"], ts.SamplingConfig(max_tokens=12, ignore_eos=True))
    got = eng.submit_bytes(["the ca"], cfg).result()[0]
    assert got.text == direct.text and got.tokens == direct.tokens and got.chars == direct.chars
    assert plain.result()[0].tokens == run_alone(tiny, "the dog", ts.SamplingConfig(max_tokens=12, ignore_eos=True))
    assert "".join(e.text for e in ts.stream(tiny, "the ca", cfg, byte_level=True)) == direct.text
    assert ts.generate(tiny, "the ca", cfg, byte_level=True).text == direct.text
    with pytest.raises(UserError, match="controls act on tokens"):
        ts.generate(tiny, "the ca", cfg, controls=[BanToken(5)], byte_level=True)


def test_a_request_joining_as_the_last_one_leaves(tiny):
    """The last rows leave and a new request joins in the same step: it starts on an empty session."""
    cfg = ts.SamplingConfig(max_tokens=2, ignore_eos=True)
    want = run_alone(tiny, "a dog ran", cfg)
    eng = Engine(tiny)
    for _ in range(6):
        first = eng.submit(["the cat"], cfg)
        assert first.next() is not None  # it finishes at its next step, as the next request joins
        assert eng.submit(["a dog ran"], cfg).result()[0].tokens == want
        first.result()


def test_plain_requests_are_sampled_together_as_they_would_be_alone(tiny, monkeypatch):
    """Requests no control rewrites, masks or follows share one normalisation and one draw per
    sampling setting; each still gets the tokens and log-probabilities it gets alone, and a
    request with a control beside them decides on its own."""
    from tokensteer.engine import stages

    sizes: list[int] = []
    real = stages.sample_plain
    monkeypatch.setattr(stages, "sample_plain", lambda reqs: sizes.append(len(reqs)) or real(reqs))
    specs = [
        (["the dog ran", "a cat"], ts.SamplingConfig(max_tokens=9, temperature=1.0, seed=5, ignore_eos=True, top_logprobs=3), []),
        (["hello there"], ts.SamplingConfig(max_tokens=6, temperature=1.0, seed=6, ignore_eos=True), []),
        (["one two"], ts.SamplingConfig(max_tokens=7, ignore_eos=True), []),  # greedy
        (["good day"], ts.SamplingConfig(max_tokens=8, temperature=0.7, top_p=0.8, seed=7, ignore_eos=True), []),
        (["sad rude"], ts.SamplingConfig(max_tokens=5, temperature=1.0, seed=8, ignore_eos=True), [BanToken(5)]),
    ]
    alone = [Engine(tiny).submit(p, c, ctl).result() for p, c, ctl in specs]
    eng = Engine(tiny)
    with eng.hold():
        handles = [eng.submit(p, c, ctl) for p, c, ctl in specs]
    for h, want in zip(handles, alone):
        got = h.result()
        assert [g.tokens for g in got] == [g.tokens for g in want]
        # torch's products round differently at other batch sizes: log-probabilities agree closely
        assert [g.logprobs for g in got] == [pytest.approx(g.logprobs, abs=1e-5) for g in want]
        assert [[t for t, _ in alts] for g in got for alts in g.top_logprobs] == [[t for t, _ in alts] for g in want for alts in g.top_logprobs]
    assert max(sizes) == 4  # the four plain requests, not the banning one


class Tilt(Control):
    """Rewrites the distribution: one token made far likelier."""

    stages = frozenset({"rewrite"})

    def logprobs(self, state, lp):
        out = lp.clone()
        out[:, 7] += 5.0
        return torch.log_softmax(out, dim=-1)


def test_each_token_carries_the_uncontrolled_models_log_probability(tiny):
    """``model_logprob``: the token under the prompt's own row before any control rewrote or masked
    it (the same number a plain request reports as its log-probability); None where a control
    steered the forward pass itself."""
    cfg = ts.SamplingConfig(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    hidden = int(tiny.hidden_size)
    eng = Engine(tiny)
    plain, tilted, masked, steered = (
        eng.submit(["the dog ran"], cfg, ctl).result()[0] for ctl in ([], [Tilt()], [BanToken(5)], [Steer(hidden, 1)])
    )
    assert plain.model_logprobs == plain.logprobs and len(plain.logprobs) == 6
    assert steered.model_logprobs == [None] * 6
    for g in (tilted, masked):  # the uncontrolled model's numbers for the tokens this request chose
        s = tiny.session()
        logits, want = s.prefill([tiny.tokenizer.encode("the dog ran")]), []
        for t in g.tokens:
            want.append(float(torch.log_softmax(logits.float(), -1)[0, t]))
            logits = s.step(torch.tensor([t]))
        assert g.model_logprobs == pytest.approx(want, abs=1e-5)
    assert tilted.model_logprobs != pytest.approx(tilted.logprobs, abs=1e-3)
    eng.close()
