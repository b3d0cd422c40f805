"""Long prompts on the backends: chunked prefill with progress, --kv-select through the torch
backend and the CLI, the trained-length limit and extrapolation, llama.cpp contexts sized to the
model's trained length."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import tokensteer as ts
from tokensteer.cli import app
from tokensteer.errors import UserError
from tokensteer.kvselect.config import bare_option

runner = CliRunner()
WORDS = "the cat sat on the mat and the dog ran to the park a quick brown fox jumps over the lazy dog ".split()


@pytest.fixture()
def lm(tiny_dir):
    """A fresh tiny torch backend (set_kv_select changes it; the shared fixture stays dense)."""
    return ts.load(str(tiny_dir), backend="torch")


def _prompt(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


def test_long_prompt_is_prefilled_in_chunks_with_progress(lm):
    seen = []
    lm.progress = lambda done, total: seen.append((done, total))
    lm.prefill_chunk = 32
    prompt = _prompt(90)
    chunked = ts.generate(lm, prompt, max_tokens=6, temperature=0, ignore_eos=True)
    n = len(lm.tokenizer.encode(prompt))
    assert seen[-1] == (n, n) and [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) == -(-n // 32)
    lm.progress, lm.prefill_chunk = None, 10_000
    whole = ts.generate(lm, prompt, max_tokens=6, temperature=0, ignore_eos=True)
    assert chunked.tokens == whole.tokens


def test_kv_select_through_generate(lm):
    prompt = _prompt(150)
    dense = ts.generate(lm, prompt, max_tokens=8, temperature=0, ignore_eos=True)
    lm.set_kv_select("k=1000,local=8,init=2,chunk=32")  # a budget over the whole prompt: dense results
    assert ts.generate(lm, prompt, max_tokens=8, temperature=0, ignore_eos=True).tokens == dense.tokens
    lm.set_kv_select("k=8,local=8,init=2,chunk=32,theta=0")
    got = ts.generate(lm, prompt, max_tokens=8, temperature=0, ignore_eos=True)
    assert len(got.tokens) == 8
    stats = lm.last_selector.stats
    assert stats["selected"] > 0 and stats["reused"] > 0 and lm.last_selector.hit_rate() > 0
    lm.set_kv_select("off")
    assert lm.kv_select is None and ts.generate(lm, prompt, max_tokens=8, temperature=0, ignore_eos=True).tokens == dense.tokens


def test_past_the_trained_length_needs_extrapolation(lm):
    prompt = _prompt(700)  # the tiny model was trained to 512 positions
    with pytest.raises(UserError) as e:
        ts.generate(lm, prompt, max_tokens=4, temperature=0)
    assert "512" in str(e.value) and "extrapolate=on" in str(e.value)
    lm.set_kv_select("k=16,local=16,init=4,chunk=64,extrapolate=on")
    assert lm.context_length is None
    g = ts.generate(lm, prompt, max_tokens=4, temperature=0, ignore_eos=True)
    assert len(g.tokens) == 4


def test_bare_kv_select_never_eats_the_prompt():
    assert bare_option(["--kv-select", "Summarise this"]) == ["--kv-select=on", "Summarise this"]
    assert bare_option(["x", "--kv-select"]) == ["x", "--kv-select=on"]
    assert bare_option(["--kv-select", "k=64", "x"]) == ["--kv-select", "k=64", "x"]
    assert bare_option(["--kv-select", "--json"]) == ["--kv-select=on", "--json"]
    assert bare_option(["--", "--kv-select"]) == ["--", "--kv-select"]


def test_cli_kv_select(tiny_dir):
    r = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--kv-select", _prompt(40), "-n", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert "runs on the torch backend" in r.output
    r = runner.invoke(app, ["generate", "the cat", "--model", str(tiny_dir), "--kv-select", "k=0"])
    assert r.exit_code == 2 and "k must be ≥ 1" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["generate", "the cat", "--backend", "llamacpp", "--kv-select"])
    assert r.exit_code == 2 and "torch backend only" in r.output


@pytest.mark.model
def test_llamacpp_context_is_the_trained_length(monkeypatch):
    monkeypatch.delenv("TOKENSTEER_N_CTX", raising=False)
    lm = ts.load(None, backend="llamacpp")
    try:
        assert lm.n_ctx == lm.context_length == lm.trained == 32768
        assert "trained to 32768" in lm.context_hint
        ids = lm.tokenizer.encode(_prompt(700))  # longer than the 512-token sliding window
        out = {}
        for rollback in (False, True):
            s = lm.session(rollback=rollback)
            try:
                first = s.prefill([ids]).clone()
                out[rollback] = torch.cat([first, s.step(torch.tensor([506])).clone()])
                assert s.c.swa_full == rollback  # only rollback keeps every sliding-window cell
            finally:
                s.close()
        assert torch.equal(out[False], out[True])
    finally:
        lm.close()


@pytest.mark.model
def test_llamacpp_context_from_the_environment(monkeypatch):
    monkeypatch.setenv("TOKENSTEER_N_CTX", "2048")
    lm = ts.load(None, backend="llamacpp")
    try:
        assert lm.n_ctx == lm.context_length == 2048 and "TOKENSTEER_N_CTX" in lm.context_hint
        s = lm.session()
        try:
            s.prefill([[2, 506]])
            assert s.c.swa_full  # short contexts keep every cell: exact trim at any depth
        finally:
            s.close()
    finally:
        lm.close()


def test_a_cache_may_carry_its_own_settings(lm):
    from transformers import DynamicCache

    lm.set_kv_select("k=8,local=8,init=2,chunk=32")
    dense_cache, own_cache = DynamicCache(config=lm.model.config), DynamicCache(config=lm.model.config)
    lm.bind_kv_select(dense_cache, "off")
    lm.bind_kv_select(own_cache, "k=4,local=4,init=1,chunk=32")
    assert lm.selector(dense_cache) is None
    assert lm.selector(own_cache).cfg.k == 4 and lm.selector(DynamicCache()).cfg.k == 8


def test_load_takes_kv_select(tiny_dir):
    """``ts.load(..., kv_select=...)`` loads torch with TokenSelect on; llama.cpp is refused."""
    import tokensteer as ts

    lm = ts.load(str(tiny_dir), kv_select="k=8,local=4,init=2")
    assert lm.name == "torch" and len(ts.generate(lm, "the cat sat on the mat " * 5, max_tokens=3).tokens) == 3
    with pytest.raises(ts.UserError, match="kv_select runs in transformers' attention"):
        ts.load(str(tiny_dir), backend="llamacpp", kv_select=True)


def test_the_prompts_last_chunk_attends_densely_by_default(lm):
    """With ``tail`` (the default) the last prompt chunk reads the whole cache: when earlier chunks
    select nothing (each fits the budget), the first answer token's log-probability is dense's."""
    prompt = _prompt(40)
    n = len(lm.tokenizer.encode(prompt))
    assert 32 < n <= 48  # the first chunk is its own window (dense); the second, last one would select
    dense = ts.generate(lm, prompt, max_tokens=1, temperature=0, ignore_eos=True)
    lm.set_kv_select("k=4,local=4,init=1,chunk=32")
    tail = ts.generate(lm, prompt, max_tokens=1, temperature=0, ignore_eos=True)
    assert lm.kv_select.tail and lm.last_selector.stats["selected"] == 0
    assert tail.tokens == dense.tokens and tail.logprobs == pytest.approx(dense.logprobs, abs=1e-5)
    lm.set_kv_select("k=4,local=4,init=1,chunk=32,tail=off")
    sel = ts.generate(lm, prompt, max_tokens=1, temperature=0, ignore_eos=True)
    assert lm.last_selector.stats["selected"] > 0 and sel.logprobs != pytest.approx(dense.logprobs, abs=1e-5)
