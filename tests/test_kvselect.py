"""TokenSelect: spec parsing, soft voting, the attention function against a naive reference,
the selection cache, position re-indexing, and chunked prefill on a tiny random Gemma 3."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensteer import kvselect as kv
from tokensteer.errors import UserError
from tokensteer.kvselect.attention import Selector
from tokensteer.kvselect.config import KVSelectConfig, looks_like_spec, parse_kv_select
from tokensteer.kvselect.positions import Rotary
from tokensteer.kvselect.select import soft_vote, window

# ---------------------------------------------------------------- the spec


def test_parse_on_off_and_settings():
    assert parse_kv_select(None) is None and parse_kv_select("off") is None
    assert parse_kv_select("on") == KVSelectConfig() == parse_kv_select(True)
    c = parse_kv_select("k=64, local=16,init=4,theta=0.95,refresh=8,chunk=32,extrapolate=on")
    assert (c.k, c.local, c.init, c.theta, c.refresh, c.chunk, c.extrapolate) == (64, 16, 4, 0.95, 8, 32, True)
    assert parse_kv_select({"k": 10, "theta": "off"}).theta > 1  # the server's JSON; theta off: never reuse
    assert KVSelectConfig().dense_tail and not parse_kv_select("tail=off").dense_tail
    assert not parse_kv_select("extrapolate=on").dense_tail  # re-indexed positions: the last chunk selects too
    assert KVSelectConfig().theta > 1  # the selection cache is off unless asked for
    assert c.budget == 64 + 16 + 4


@pytest.mark.parametrize(
    "bad", ["k=0", "k=abc", "kk=3", "k=3,k=4", "k", "theta=2.5", "init=-1", "extrapolate=maybe", "tail=2", "local=1.5"]
)
def test_parse_rejects_with_one_line(bad):
    with pytest.raises(UserError) as e:
        parse_kv_select(bad)
    assert "\n" not in str(e.value) and "kv-select" in str(e.value)


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 10**6), local=st.integers(1, 10**5), init=st.integers(0, 10**4),
    theta=st.floats(0, 2, allow_nan=False), refresh=st.integers(1, 1000), chunk=st.integers(1, 8192), ex=st.booleans(), tail=st.booleans(),
)
def test_spec_round_trips(k, local, init, theta, refresh, chunk, ex, tail):
    c = KVSelectConfig(k, local, init, theta, refresh, chunk, ex, tail)
    assert parse_kv_select(c.spec()) == c
    assert looks_like_spec(c.spec().split(",")[0])


def test_bare_option_does_not_eat_a_prompt():
    assert looks_like_spec("on") and looks_like_spec("k=5") and looks_like_spec("off")
    assert not looks_like_spec("Summarise this report") and not looks_like_spec("x=1 is a formula")


# ---------------------------------------------------------------- voting and the attention function


def test_soft_vote_is_per_head_softmax_summed_with_grouped_heads():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 8), torch.randn(1, 2, 30, 8)  # 4 query heads read 2 key heads: 0,1 -> 0 and 2,3 -> 1
    got = soft_vote(q, k, 0.5)
    want = sum(torch.softmax((k[0, h // 2] @ q[0, h]) * 0.5, -1) for h in range(4))
    torch.testing.assert_close(got[0], want)
    assert math.isclose(float(got.sum()), 4.0, rel_tol=1e-5)  # each head spreads one unit of mass


def test_soft_vote_is_not_dominated_by_one_loud_head():
    q = torch.zeros(1, 2, 4)
    q[0, 0, 0], q[0, 1, 1] = 100.0, 1.0  # head 0 has huge logits
    k = torch.zeros(1, 1, 3, 4)
    k[0, 0, 0, 0], k[0, 0, 1, 1], k[0, 0, 2, 1] = 1.0, 3.0, 2.9
    votes = soft_vote(q, k, 1.0)
    raw = (k[0, 0] @ q[0].T).sum(-1)
    assert int(raw.argmax()) == 0  # a raw sum follows head 0 only
    assert votes[0, 1] > 0.5  # head 1's favourite still gets its own unit of mass


class _Module(torch.nn.Module):
    def __init__(self, layer_idx=0, groups=2):
        super().__init__()
        self.layer_idx, self.num_key_value_groups, self.is_causal = layer_idx, groups, True


def _reference(q, k, v, slots, scaling, q_slots):
    """Naive attention of each query over ``slots`` (causal by slot), key head h // groups."""
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(B, L, Hq, D)
    for b in range(B):
        for h in range(Hq):
            for i in range(L):
                s = [j for j in slots[b] if j <= q_slots[i]]
                w = torch.softmax(torch.stack([q[b, h, i] @ k[b, h // G, j] for j in s]) * scaling, 0)
                out[b, i, h] = sum(wj * v[b, h // G, j] for wj, j in zip(w, s))
    return out


def _topk_slots(q, k, cfg, N, L, scaling):
    lo, hi = window(N, L, cfg)
    votes = soft_vote(q.mean(2), k[:, :, lo:hi], scaling)
    chosen = [sorted((votes[b].topk(cfg.k).indices + lo).tolist()) for b in range(q.shape[0])]
    return [list(range(lo)) + c + list(range(hi, N)) for c in chosen]


@pytest.mark.parametrize("L", [1, 5])
def test_selected_attention_matches_a_naive_reference(L):
    torch.manual_seed(1)
    cfg = KVSelectConfig(k=6, local=4, init=2, theta=2.0)
    B, Hq, Hkv, N, D = 2, 4, 2, 40, 8
    q, k, v = torch.randn(B, Hq, L, D), torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
    sel = Selector(cfg)
    out, _ = sel.attend(_Module(), q, k, v, None, 0.35, None)
    slots = _topk_slots(q, k, cfg, N, L, 0.35)
    torch.testing.assert_close(out, _reference(q, k, v, slots, 0.35, list(range(N - L, N))), atol=1e-5, rtol=1e-4)
    assert sel.stats["selected"] == 1 and sel.stats["dense"] == 0


def test_short_cache_is_plain_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(2)
    cfg = KVSelectConfig(k=30, local=8, init=2)
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    sel = Selector(cfg)
    out, _ = sel.attend(_Module(), q, k, v, None, 0.3, None)
    want, _ = sdpa_attention_forward(_Module(), q, k, v, None, scaling=0.3)
    torch.testing.assert_close(out, want)
    assert sel.stats["dense"] == 1


def test_padding_mask_is_respected_per_row():
    """Left padding is never voted for nor attended, even where it would win every vote."""
    torch.manual_seed(3)
    cfg = KVSelectConfig(k=5, local=3, init=2, theta=2.0)
    N, pad = 30, 4
    q, k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 1, N, 8), torch.randn(2, 1, N, 8)
    k[1, :, :pad] = 100 * q[1, 0, 0]  # padding that would take all the weight if it were not masked
    mask = torch.ones(2, 1, 1, N, dtype=torch.bool)
    mask[1, 0, 0, :pad] = False
    out, _ = Selector(cfg).attend(_Module(groups=2), q, k, v, mask, 0.3, None)
    lo, hi = window(N, 1, cfg)
    votes = soft_vote(q[:, :, 0], k[:, :, lo:hi], 0.3, mask[:, 0, 0, lo:hi])
    for b in range(2):
        chosen = sorted((votes[b].topk(5).indices + lo).tolist())
        assert b == 0 or set(chosen).isdisjoint(range(pad))
        slots = [j for j in list(range(lo)) + chosen + list(range(hi, N)) if bool(mask[b, 0, 0, j])]
        want = _reference(q[b : b + 1], k[b : b + 1], v[b : b + 1], [slots], 0.3, [N - 1])
        torch.testing.assert_close(out[b : b + 1], want, atol=1e-5, rtol=1e-4)


def test_selection_cache_reuses_then_refreshes():
    torch.manual_seed(4)
    cfg = KVSelectConfig(k=4, local=2, init=1, theta=0.0, refresh=3)
    sel = Selector(cfg)
    k, v = torch.randn(1, 1, 60, 8), torch.randn(1, 1, 60, 8)
    q = torch.randn(1, 2, 1, 8)
    for n in range(20, 26):  # one decode step per new cache slot
        sel.attend(_Module(), q, k[:, :, :n], v[:, :, :n], None, 0.3, None)
    # steps at n = 20 (select), 21, 22 (reuse), 23 (refresh: 3 steps old), 24, 25 (reuse)
    assert sel.stats["decode_selected"] == 2 and sel.stats["reused"] == 4
    assert sel.hit_rate() == pytest.approx(4 / 6)
    never = Selector(KVSelectConfig(k=4, local=2, init=1, theta=2.0))
    for n in range(20, 26):
        never.attend(_Module(), q, k[:, :, :n], v[:, :, :n], None, 0.3, None)
    assert never.stats["reused"] == 0


def test_cache_reuse_keeps_tokens_that_leave_the_local_window():
    cfg = KVSelectConfig(k=3, local=2, init=1, theta=0.0, refresh=10)
    sel = Selector(cfg)
    torch.manual_seed(5)
    k, v, q = torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8), torch.randn(1, 2, 1, 8)
    sel.attend(_Module(), q, k[:, :, :20], v[:, :, :20], None, 0.3, None)
    first = sel.layers[0].chosen.clone()
    sel.attend(_Module(), q, k[:, :, :21], v[:, :, :21], None, 0.3, None)
    st_ = sel.layers[0]
    assert st_.chosen[0, :3].tolist() == first[0].tolist() and st_.chosen[0, 3:].tolist() == [18]  # slot 18 left the window


def test_a_stale_state_is_not_reused():
    """Another sequence's forward in between (a different cache length) forces a fresh selection."""
    cfg = KVSelectConfig(k=3, local=2, init=1, theta=0.0, refresh=10)
    sel = Selector(cfg)
    k, v, q = torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8), torch.randn(1, 2, 1, 8)
    sel.attend(_Module(), q, k[:, :, :20], v[:, :, :20], None, 0.3, None)
    sel.attend(_Module(), q, k[:, :, :30], v[:, :, :30], None, 0.3, None)
    assert sel.stats["reused"] == 0 and sel.stats["decode_selected"] == 2


# ---------------------------------------------------------------- positions


def test_rotations_compose_and_invert():
    torch.manual_seed(6)
    rot = Rotary(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))
    x = torch.randn(1, 2, 5, 16)
    a, b = torch.tensor([3, 7, 11, 0, 2]), torch.tensor([-1, 4, -11, 9, 100])
    torch.testing.assert_close(rot.rotate(rot.rotate(x, a), b), rot.rotate(x, a + b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rot.rotate(rot.rotate(x, a), -a), x, atol=1e-5, rtol=1e-5)


def test_extrapolation_places_selected_keys_on_compact_positions():
    """Re-indexed attention equals attention computed from raw keys rotated at compact positions."""
    torch.manual_seed(7)
    inv = 1.0 / (100 ** (torch.arange(0, 8, 2).float() / 8))
    rot = Rotary(inv)
    cfg = KVSelectConfig(k=4, local=3, init=2, theta=2.0, extrapolate=True)
    N, D = 50, 8
    raw_k, v, raw_q = torch.randn(1, 1, N, D), torch.randn(1, 1, N, D), torch.randn(1, 2, 1, D)
    k = rot.rotate(raw_k, torch.arange(N))  # the cache holds keys rotated at their true positions
    q = rot.rotate(raw_q, torch.tensor([N - 1]))
    sel = Selector(cfg, {"default": rot})
    out, _ = sel.attend(_Module(), q, k, v, None, 0.4, torch.tensor([[N - 1]]))
    slots = _topk_slots(q, k, cfg, N, 1, 0.4)[0]
    S = len(slots)
    k_c = rot.rotate(raw_k[:, :, slots], torch.arange(S))
    q_c = rot.rotate(raw_q, torch.tensor([S - 1]))
    want = _reference(q_c, k_c, v[:, :, slots], [list(range(S))], 0.4, [S - 1])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- on a tiny Gemma 3


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    assert kv.install(m)
    return m


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (1, n), generator=g)


def _logits(model, ids, selector, chunk):
    from transformers import DynamicCache

    with kv.use(selector):
        cache = DynamicCache(config=model.config)
        first = kv.prefill_chunks(model, ids, cache, chunk=chunk)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([[5]]), position_ids=torch.tensor([[ids.shape[1]]]), use_cache=True, **{kv.prefill.cache_kwarg(type(model)): cache})
    return first, out.logits[:, -1].float()


def test_chunked_prefill_matches_one_forward_and_reports_progress(tiny_model):
    ids = _ids(70)
    seen = []
    from transformers import DynamicCache

    with torch.inference_mode():
        whole = tiny_model(input_ids=ids).logits[:, -1].float()
    got = kv.prefill_chunks(tiny_model, ids, DynamicCache(config=tiny_model.config), chunk=16, progress=lambda d, t: seen.append((d, t)))
    torch.testing.assert_close(got, whole, atol=1e-4, rtol=1e-4)
    assert seen == [(16, 70), (32, 70), (48, 70), (64, 70), (70, 70)]


def test_a_budget_covering_the_prompt_gives_dense_logits(tiny_model):
    ids = _ids(60, 1)
    dense = _logits(tiny_model, ids, None, 16)
    sel = kv.new_selector(tiny_model, KVSelectConfig(k=100, local=8, init=2, chunk=16))
    same = _logits(tiny_model, ids, sel, 16)
    torch.testing.assert_close(same[0], dense[0])
    torch.testing.assert_close(same[1], dense[1])
    assert sel.stats["selected"] == 0 and sel.stats["dense"] > 0


def test_selection_runs_only_in_the_full_attention_layer(tiny_model):
    ids = _ids(80, 2)
    sel = kv.new_selector(tiny_model, KVSelectConfig(k=4, local=4, init=2, chunk=16, theta=2.0))
    dense = _logits(tiny_model, ids, None, 16)
    got = _logits(tiny_model, ids, sel, 16)
    assert sel.stats["selected"] > 0 and set(sel.layers) == {1}  # layer 1 is the full-attention one
    assert not torch.allclose(got[1], dense[1])  # a 10-token budget over 80 tokens changes the logits
    assert got[1].isfinite().all()


def test_default_selector_and_use_none(tiny_model):
    ids = _ids(80, 3)
    dense = _logits(tiny_model, ids, None, 16)
    default = kv.attach(tiny_model, KVSelectConfig(k=4, local=4, init=2, chunk=16))
    try:
        from transformers import DynamicCache

        cache = DynamicCache(config=tiny_model.config)
        kv.prefill_chunks(tiny_model, ids, cache, chunk=16)  # no ``use``: the default selects
        assert default.stats["selected"] > 0 and kv.default_selector(tiny_model) is default
        again = _logits(tiny_model, ids, None, 16)  # use(None): dense, default or not
        torch.testing.assert_close(again[1], dense[1])
    finally:
        kv.attach(tiny_model, None)
    assert kv.default_selector(tiny_model) is None


def test_cache_compares_consecutive_queries():
    """A query that drifts slowly keeps hitting (each step close to the last) until the refresh."""
    cfg = KVSelectConfig(k=3, local=2, init=1, theta=0.99, refresh=100)
    sel = Selector(cfg)
    k, v = torch.randn(1, 1, 60, 8), torch.randn(1, 1, 60, 8)
    base, turn = torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8)
    base[..., 0], turn[..., 1] = 1.0, 1.0
    for i, n in enumerate(range(20, 32)):
        angle = 0.1 * i  # 0.1 rad a step: cos 0.995 with the last step, far below 0.99 with the first after 2 steps
        q = (math.cos(angle) * base + math.sin(angle) * turn).expand(1, 2, 1, 8)
        sel.attend(_Module(), q, k[:, :, :n], v[:, :, :n], None, 0.3, None)
    assert sel.stats["decode_selected"] == 1 and sel.stats["reused"] == 11


def test_an_eager_model_keeps_its_attention(tiny_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")
    assert not kv.install(m) and m.config._attn_implementation == "eager"
