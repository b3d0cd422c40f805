"""The sequential Monte Carlo planner for word counts and end words (tokensteer.constraints.smc)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokensteer
from tokensteer.constraints import ConstraintSpec, build, from_mapping
from tokensteer.constraints.base import AllOf
from tokensteer.constraints.counts import count_words
from tokensteer.constraints.smc import SMCPlanner, ess, systematic
from tokensteer.constraints.spec import parts
from tokensteer.constraints.vocab import token_table
from tokensteer.errors import UserError
from tokensteer.eval.scorers import count_check
from tokensteer.hooks import Control
from tokensteer.sampling import SamplingConfig

SLOW = settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PROMPTS = ["the cat sat", "a quick brown", "one two"]


def planner(lm, spec: ConstraintSpec, **kw) -> SMCPlanner:
    table = token_table(lm.tokenizer)
    return SMCPlanner(lambda: AllOf(parts(lm, spec, table), table), spec.particles, **kw)


def test_counts_plan_by_default_and_mask_on_request(tiny):
    (c,) = build(tiny, ConstraintSpec(words=3, end_word="dog"))
    assert isinstance(c, SMCPlanner)
    (m,) = build(tiny, from_mapping({"words": 3, "plan": "mask"}))
    assert isinstance(m, AllOf)
    (b,) = build(tiny, ConstraintSpec(ban=["dog"]))
    assert isinstance(b, AllOf)  # nothing to plan without a count or an end word
    for bad in ({"words": 3, "plan": "beam"}, {"words": 3, "particles": 0}, {"words": 3, "particles": True}):
        with pytest.raises(UserError):
            from_mapping(bad)


@SLOW
@given(n=st.integers(1, 9), end=st.sampled_from([None, "dog", "five"]), seed=st.integers(0, 10_000), resample=st.sampled_from([0.5, 1.01]))
def test_planned_text_meets_the_count_and_is_the_plan(tiny, n, end, seed, resample):
    """Every prompt's text has the count and end word, and is exactly the chosen particle (also
    when every step resamples, which replays the constraints over copied texts)."""
    c = planner(tiny, ConstraintSpec(words=n, end_word=end, particles=4), resample_below=resample)
    cfg = SamplingConfig(max_tokens=3 * n + 10, temperature=1.0, seed=seed)
    out = tokensteer.generate(tiny, PROMPTS, cfg, [c])
    assert c.plans is not None and not c.aside
    for b, g in enumerate(out):
        assert count_check(g.text, n, end or g.text.split()[-1])["success"], g.text
        assert g.tokens == c.plans[b] or g.tokens == [t for t in c.plans[b] if t not in tiny.tokenizer.eos_ids]
        assert not set(g.tokens) & (tiny.tokenizer.special_ids - tiny.tokenizer.eos_ids)


def test_resampling_replays_each_copied_text(tiny):
    """After resampling, each particle's constraint state is its own text's (words counted again)."""
    from tokensteer.constraints.smcstate import Particles, Target

    spec = ConstraintSpec(words=6, end_word="dog")
    c = planner(tiny, spec)
    st_ = _state(tiny, "the cat sat", max_tokens=30)
    ps = Particles(st_, c.inner, 4, Target(), torch.Generator().manual_seed(0))
    try:
        for _ in range(5):
            ps.step()
        ps.logw = torch.tensor([0.0, -50.0, -50.0, -50.0], dtype=torch.float64)
        ps.resample(0.9)
        w = ps.words
        assert len({tuple(x) for x in ps.st.generated}) == 1  # all copies of the heaviest
        for i, toks in enumerate(ps.st.generated):
            data = b"".join(c.table.tokens[t] for t in toks)
            assert w.count[i] == count_words(data) and bytes(w.generated[i]) == data
        assert torch.allclose(ps.logw, ps.logw[0].expand(4))
        while not ps.done():
            ps.step()
        assert all(count_words(bytes(w.generated[i])) == 6 for i in range(4))
    finally:
        ps.close()


class Tilt(Control):
    """A rewriter that changes the distribution (as a formula would)."""

    stages = frozenset({"rewrite"})

    def logprobs(self, state, logprobs):
        return torch.log_softmax(logprobs + torch.linspace(0, 1, logprobs.shape[-1]), dim=-1)


def test_steps_aside_when_another_control_rewrites(tiny):
    c = planner(tiny, ConstraintSpec(words=4, end_word="dog"))
    g = tokensteer.generate(tiny, "the cat sat", SamplingConfig(max_tokens=20, temperature=1.0, seed=0), [Tilt(), c])
    assert c.aside and c.plans is None
    assert count_check(g.text, 4, "dog")["success"], g.text


def test_planner_in_the_eval_method(tiny):
    """The eval's per-item rows (RowView) plan too, with the request's temperature and seed."""
    from tokensteer.eval.methods import make_method
    from tokensteer.eval.tasks import Item, get_task

    m, task = make_method("constraints"), get_task("count")
    a, b = Item("the cat sat", {"words": 4, "end_word": "dog"}), Item("a quick brown", {"words": 6, "end_word": "five"})
    ca = m.controls(tiny, task, a)
    m.controls(tiny, task, b)
    cfg = SamplingConfig(max_tokens=30, temperature=1.0, seed=1)
    g1 = tokensteer.generate(tiny, [a.prompt, b.prompt], cfg, ca)
    g2 = tokensteer.generate(tiny, [a.prompt, b.prompt], cfg, ca)
    assert [x.text for x in g1] == [x.text for x in g2]  # seeded
    assert count_check(g1[0].text, 4, "dog")["success"] and count_check(g1[1].text, 6, "five")["success"]
    planners = [p for ps in m._built.values() for p in ps]
    assert planners and all(isinstance(p, SMCPlanner) and p.plans is not None for p in planners)


@given(w=st.lists(st.floats(-20, 0), min_size=1, max_size=12), u=st.floats(0, 0.999))
def test_systematic_resampling_keeps_weights_in_proportion(w, u):
    logw = torch.tensor(w, dtype=torch.float64)
    idx = systematic(logw, u)
    K = len(w)
    assert len(idx) == K and all(0 <= i < K for i in idx) and idx == sorted(idx)
    p = torch.softmax(logw, 0)
    for i in range(K):  # systematic resampling gives each particle floor or ceil of K * weight copies
        assert abs(idx.count(i) - K * float(p[i])) < 1 + 1e-6
    assert 1 - 1e-9 <= ess(logw) <= K + 1e-9


def _state(lm, prompt: str, max_tokens: int):
    from tokensteer.engine.state import LoopState

    st_ = LoopState(lm, [lm.tokenizer.encode(prompt)], 1)
    st_.max_tokens = max_tokens
    return st_
