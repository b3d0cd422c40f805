"""The decode loop and its hook points on a tiny random-weight model (fast, no download)."""

from __future__ import annotations

import pytest
import torch

import tokensteer as ts
from tokensteer.errors import UserError
from tokensteer.hooks import Control, ResidualEdit
from toy_controls import Watched
from tokensteer.engine import LoopState
from tokensteer.sampling import row_seed


def hf_greedy(lm, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([lm.tokenizer.encode(prompt)])
    out = lm.model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def test_greedy_matches_hf_generate(tiny):
    for prompt in ["the cat", "a quick brown fox", "hello world one two"]:
        ours = ts.generate(tiny, prompt, max_tokens=12, ignore_eos=True).tokens
        assert ours == hf_greedy(tiny, prompt, 12)


def test_batched_prompts_match_one_at_a_time(tiny):
    prompts = ["the cat sat on the mat", "good", "one two three four"]
    batched = ts.generate(tiny, prompts, max_tokens=10, ignore_eos=True)
    for p, g in zip(prompts, batched):
        assert g.tokens == ts.generate(tiny, p, max_tokens=10, ignore_eos=True).tokens


def test_seed_reproducible_and_seeds_differ(tiny):
    kw = dict(max_tokens=20, temperature=1.5, ignore_eos=True)
    a = ts.generate(tiny, "the dog", seed=7, **kw).tokens
    b = ts.generate(tiny, "the dog", seed=7, **kw).tokens
    c = ts.generate(tiny, "the dog", seed=8, **kw).tokens
    assert a == b
    assert a != c


def test_each_prompt_samples_from_its_own_seed(tiny):
    """Prompt i of a batch draws from its own seed (row_seed, or the i-th of a seed tuple): the same
    tokens as the prompt run alone with that seed, whatever shares its batch."""
    kw = dict(max_tokens=12, temperature=1.5, ignore_eos=True)
    prompts = ["the dog ran", "a cat sat", "one two three"]
    assert len({len(tiny.tokenizer.encode(p)) for p in prompts}) == 1  # no padding: identical forward passes
    seeds = [row_seed(40, i) for i in range(3)]
    assert seeds[0] == 40 and len(set(seeds) | {row_seed(41, i) for i in range(3)}) == 6  # nearby seeds share no stream
    alone = [ts.generate(tiny, p, seed=s, **kw).tokens for p, s in zip(prompts, seeds)]
    assert [g.tokens for g in ts.generate(tiny, prompts, seed=40, **kw)] == alone
    assert [g.tokens for g in ts.generate(tiny, prompts[::-1], seed=tuple(seeds[::-1]), **kw)] == alone[::-1]
    assert len({tuple(t) for t in alone}) == 3
    with pytest.raises(UserError, match="2 seeds given for 3 prompts"):
        ts.generate(tiny, prompts, seed=(1, 2), **kw)


def test_stream_equals_generate(tiny):
    kw = dict(max_tokens=16, temperature=1.0, seed=3, ignore_eos=True)
    text = "".join(e.text for e in ts.stream(tiny, "the park", **kw))
    assert text == ts.generate(tiny, "the park", **kw).text


def test_stop_string_ends_generation_and_is_excluded(tiny):
    full = ts.generate(tiny, "the cat", max_tokens=20, ignore_eos=True)
    stop = full.text[6:9]
    assert stop.strip(), full.text
    g = ts.generate(tiny, "the cat", max_tokens=20, ignore_eos=True, stop=[stop])
    assert g.finish_reason == "stop"
    assert stop not in g.text
    assert full.text.startswith(g.text)
    assert len(g.tokens) < 20


def test_eos_ends_generation(tiny):
    eos = next(iter(tiny.tokenizer.eos_ids))

    class ForceEos(Control):
        stages = frozenset({"mask"})

        def mask(self, state):
            m = torch.zeros(state.batch_size, tiny.tokenizer.vocab_size, dtype=torch.bool)
            m[:, eos if state.step == 3 else 5] = True
            return m

    g = ts.generate(tiny, "the cat", max_tokens=20, controls=[ForceEos()])
    assert g.finish_reason == "eos"
    assert g.tokens == [5, 5, 5]


def test_logits_hook_bans_a_token(tiny):
    base = ts.generate(tiny, "the cat", max_tokens=15, ignore_eos=True).tokens
    banned = base[0]

    class Ban(Control):
        stages = frozenset({"rewrite"})

        def logprobs(self, state, lp):
            return lp.index_fill(1, torch.tensor([banned]), float("-inf"))

    g = ts.generate(tiny, "the cat", max_tokens=15, ignore_eos=True, controls=[Ban()])
    assert banned not in g.tokens
    for seed in range(5):
        s = ts.generate(tiny, "the cat", max_tokens=15, temperature=2.0, seed=seed, ignore_eos=True, controls=[Ban()])
        assert banned not in s.tokens


def test_variant_rows_and_on_token_hooks(tiny):
    seen: list[tuple[int, ...]] = []

    class Variant(Control):
        stages = frozenset({"accept", "rewrite", "variants"})

        def variants(self, prompt):
            return ["good great happy " + prompt]

        def logprobs(self, state: LoopState, lp):
            rows = state.variant_rows(self)
            assert rows.shape == (state.batch_size, 1, lp.shape[-1])
            return rows[:, 0]  # sample from the conditioned row only

        def on_token(self, state, tokens):
            seen.append(tuple(tokens.tolist()))

    g = ts.generate(tiny, ["the cat", "a fox"], max_tokens=8, ignore_eos=True, controls=[Variant()])
    for prompt, out in zip(["the cat", "a fox"], g):
        direct = ts.generate(tiny, "good great happy " + prompt, max_tokens=8, ignore_eos=True)
        assert out.tokens == direct.tokens
    assert len(seen) == 8 and all(len(s) == 2 for s in seen)


def test_residual_edit_changes_output_and_zero_is_identity(tiny):
    base = ts.generate(tiny, "the cat", max_tokens=12, ignore_eos=True)

    class Steer(Control):
        stages = frozenset({"edits"})

        def __init__(self, scale):
            self.scale = scale

        def residual_edits(self, n_rows, rows_per_prompt):
            torch.manual_seed(0)
            return [ResidualEdit(layer=0, vector=torch.randn(tiny.hidden_size) * self.scale)]

    zero = ts.generate(tiny, "the cat", max_tokens=12, ignore_eos=True, controls=[Steer(0.0)])
    big = ts.generate(tiny, "the cat", max_tokens=12, ignore_eos=True, controls=[Steer(50.0)])
    assert zero.tokens == base.tokens
    assert zero.logprobs == base.logprobs
    assert big.tokens != base.tokens
    again = ts.generate(tiny, "the cat", max_tokens=12, ignore_eos=True)
    assert again.tokens == base.tokens  # edits do not leak out of their session


def test_logprobs_and_top_alternatives(tiny):
    g = ts.generate(tiny, "the cat", max_tokens=5, ignore_eos=True, top_logprobs=3)
    for t, lp, top in zip(g.tokens, g.logprobs, g.top_logprobs):
        assert len(top) == 3
        assert top[0][0] == t and top[0][1] == pytest.approx(lp)  # greedy picks the top one
        assert top[0][1] >= top[1][1] >= top[2][1]
        assert lp <= 0


def test_sampling_filters_keep_support(tiny):
    # top-k 1 is greedy whatever the temperature
    greedy = ts.generate(tiny, "the dog", max_tokens=10, ignore_eos=True).tokens
    for seed in range(3):
        assert ts.generate(tiny, "the dog", max_tokens=10, temperature=5.0, top_k=1, seed=seed, ignore_eos=True).tokens == greedy
        assert ts.generate(tiny, "the dog", max_tokens=10, temperature=5.0, min_p=0.999, seed=seed, ignore_eos=True).tokens == greedy


@pytest.mark.parametrize(
    "kw",
    [dict(max_tokens=-1), dict(temperature=-0.1), dict(top_p=0.0), dict(top_k=-3), dict(min_p=1.0), dict(stop=[""])],
)
def test_bad_sampling_values_are_user_errors(tiny, kw):
    with pytest.raises(ts.UserError):
        ts.generate(tiny, "the cat", **kw)


def test_empty_prompt_is_user_error(tiny):
    with pytest.raises(ts.UserError, match="empty"):
        ts.generate(tiny, "   ")


def test_more_tokens_than_the_context_holds_is_refused_before_any_work(tiny):
    assert tiny.context_length == 512
    n = len(tiny.tokenizer.encode("Hello there"))
    assert len(ts.generate(tiny, "Hello there", max_tokens=512 - n, ignore_eos=True).tokens) == 512 - n
    with pytest.raises(ts.UserError, match=f"prompt \\({n} tokens\\) plus max tokens \\({513 - n}\\) exceed the 512-token context"):
        ts.generate(tiny, "Hello there", max_tokens=513 - n)


def test_contradictory_mask_is_user_error(tiny):
    class Nothing(Control):
        stages = frozenset({"mask"})

        def mask(self, state):
            return torch.zeros(state.batch_size, tiny.tokenizer.vocab_size, dtype=torch.bool)

    with pytest.raises(ts.UserError, match="no next token"):
        ts.generate(tiny, "the cat", controls=[Nothing()])


def test_draw_matches_its_distribution_and_never_picks_zero_weight():
    """The inverse-CDF sampler draws each index with its probability (chi-square, fixed seed)."""
    from tokensteer.sampling import draw

    p = torch.tensor([[0.5, 0.0, 0.2, 0.0, 0.3], [0.0, 0.0, 0.0, 1e-3, 0.0]])
    n = 20000
    gen = torch.Generator().manual_seed(0)
    picks = torch.stack([draw(p, gen) for _ in range(n)])
    assert set(picks[:, 1].tolist()) == {3}
    counts = torch.bincount(picks[:, 0], minlength=5).double()
    assert counts[1] == 0 and counts[3] == 0
    keep = p[0] > 0
    expected = p[0][keep].double() * n
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # 2 degrees of freedom, p = 0.001


def test_session_mix_returns_the_mixed_rows_logits(tiny):
    """A session with a row mix returns mix @ (each row's logits), per group of rows, at prefill,
    step and extend: the output layer is linear, so mixing hidden states first is exact."""
    from tokensteer.backends.base import HEAD_MIX

    assert HEAD_MIX in tiny.capabilities
    rows = [tiny.tokenizer.encode(t) for t in ("the cat sat", "a dog", "one two three four", "the fox")]
    mix = torch.tensor([[1.0, 2.0], [0.0, -0.5]])  # 2 prompts × 2 rows -> 2 prompts × 2 mixed rows
    plain, mixed = tiny.session(), tiny.session(mix=mix)

    def grouped(x):  # [4, ..., V] per-row logits -> the mix of each prompt's pair
        return torch.einsum("or,br...->bo...", mix, x.view(2, 2, *x.shape[1:])).flatten(0, 1)

    torch.testing.assert_close(mixed.prefill(rows), grouped(plain.prefill(rows)), atol=1e-4, rtol=1e-4)
    feed = torch.tensor([5, 6, 7, 8])
    torch.testing.assert_close(mixed.step(feed), grouped(plain.step(feed)), atol=1e-4, rtol=1e-4)
    block = torch.tensor([[9, 10, 11]] * 4)
    torch.testing.assert_close(mixed.extend(block), grouped(plain.extend(block)), atol=1e-4, rtol=1e-4)
    again = tiny.session()  # the mix belongs to its session only
    assert again.prefill(rows).shape[0] == 4


def test_loop_mixes_rows_only_for_the_one_control_with_variants(tiny):
    """The loop asks the backend for a control's row mix, and the controls then see R' rows; not
    when another control also has variant rows, or a rewriter runs before the mixing one."""
    seen: dict[str, tuple] = {}

    class Mixer(Control):
        stages = frozenset({"rewrite", "variants"})

        def __init__(self, name):
            self.name = name

        def variants(self, prompt):
            return ["good " + prompt, "bad " + prompt]

        def row_mix(self):
            return torch.tensor([[1.0, 1.0, -1.0]])

        def logprobs(self, state, lp):
            seen[self.name] = (state.rows_per_prompt, state.mix is not None)
            return lp

    class Plain(Control):
        stages = frozenset({"rewrite"})

        def logprobs(self, state, lp):
            return lp

    out = ts.generate(tiny, "the cat", max_tokens=4, ignore_eos=True, controls=[Mixer("a")])
    assert seen["a"] == (1, True)
    single = ts.generate(tiny, ["the cat"], max_tokens=4, ignore_eos=True, controls=[Mixer("a")])[0]
    assert out.tokens == single.tokens
    ts.generate(tiny, "the cat", max_tokens=2, ignore_eos=True, controls=[Mixer("b"), Mixer("c")])
    assert seen["b"] == seen["c"] == (5, False)
    ts.generate(tiny, "the cat", max_tokens=2, ignore_eos=True, controls=[Plain(), Mixer("d")])
    assert seen["d"] == (3, False)


class _Finishing(Control):
    """Counts start/finish calls; optionally fails at a given step."""
    stages = frozenset({'accept'})

    def __init__(self, fail_at: int | None = None) -> None:
        self.started = self.finished = 0
        self.fail_at = fail_at

    def start(self, state) -> None:
        self.started += 1

    def on_token(self, state, tokens) -> None:
        if state.step == self.fail_at:
            raise RuntimeError("boom")

    def finish(self) -> None:
        self.finished += 1


def test_finish_runs_once_however_generation_ends(tiny):
    done = _Finishing()
    ts.generate(tiny, "the cat", max_tokens=5, ignore_eos=True, controls=[done])
    assert (done.started, done.finished) == (1, 1)
    failed = _Finishing(fail_at=2)
    with pytest.raises(RuntimeError, match="boom"):
        ts.generate(tiny, "the cat", max_tokens=5, ignore_eos=True, controls=[failed])
    assert failed.finished == 1
    dropped = _Finishing()
    events = ts.stream(tiny, "the cat", max_tokens=20, ignore_eos=True, controls=[dropped])
    next(events)
    assert dropped.finished == 0
    events.close()  # a client that stops reading
    assert dropped.finished == 1


def test_controls_close_their_own_sessions_when_generation_ends(tiny):
    """A steering guard's plain session is closed at the end, not left open until the next run."""
    from tokensteer.steering.apply import SteerGuard

    opened = []

    def watch(s):
        close = s.close
        rec = {"closed": False}

        def closing() -> None:
            rec["closed"] = True
            close()

        s.close = closing
        opened.append(rec)

    lm = Watched(tiny, watch)
    ts.generate(lm, "the cat", max_tokens=4, ignore_eos=True, controls=[SteerGuard(0.9)])
    assert len(opened) == 2 and all(r["closed"] for r in opened)
