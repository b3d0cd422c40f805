"""The llama.cpp backend on the bundled GGUF: same loop, same answers as torch, batching, steering."""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest
import torch

import tokensteer as ts
from tokensteer.backends import HIDDEN_STATES, LOAD_HF, RESIDUAL_ADD, RESIDUAL_FIRST, RESIDUAL_FN, choose_backend
from tokensteer.hooks import Control, ResidualEdit
from tokensteer.models import resolve

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.model

PROMPTS = [
    "The old lighthouse keeper climbed the stairs one last time and",
    "Once upon a time",
    "The capital of France is",
    "def fib(n):",
]


@pytest.fixture(scope="module")
def llama():
    lm = ts.load(None, backend="llamacpp")
    yield lm
    lm.close()


class Steer(Control):
    """Add one fixed random direction at the given layers (what llama.cpp control vectors do)."""
    stages = frozenset({'edits'})

    def __init__(self, hidden: int, layers=(4, 5, 6), norm: float = 60.0, positions="all", per_row=False):
        g = torch.Generator().manual_seed(0)
        v = torch.randn(hidden, generator=g)
        self.v, self.layers, self.positions, self.per_row = v / v.norm() * norm, layers, positions, per_row

    def residual_edits(self, n_rows, rows_per_prompt):
        v = self.v.expand(n_rows, -1) if self.per_row else self.v
        return [ResidualEdit(layer=i, vector=v, positions=self.positions) for i in self.layers]


def test_tokenizer_matches_hugging_face(llama, bundled):
    texts = [
        "The old lighthouse keeper",
        "  leading spaces\tand tabs\n\nnewlines",
        "Ünïcödé café 日本語 🙂",
        "<start_of_turn>user\nhi<end_of_turn>",
        "def f(x):\n    return x**2",
    ]
    for text in texts:
        ids = bundled.tokenizer.encode(text)
        assert llama.tokenizer.encode(text) == ids
        assert ids[0] == llama.tokenizer.bos_id  # Gemma starts with <bos> on both
        assert llama.tokenizer.decode(ids) == bundled.tokenizer.decode(ids)
        assert llama.tokenizer.encode(text, add_bos=False) == bundled.tokenizer.encode(text, add_bos=False)
    for i in range(0, 262144, 997):
        assert llama.tokenizer.token_text(i) == bundled.tokenizer.token_text(i), i


def _teacher_forced_top1(lm, ids: list[int]) -> list[int]:
    s = lm.session()
    try:
        out = [int(s.prefill([ids[:1]]).argmax(-1))]
        for t in ids[1:-1]:
            out.append(int(s.step(torch.tensor([t])).argmax(-1)))
    finally:
        s.close()
    return out


def test_next_token_top1_agreement_with_torch(llama, bundled):
    text = (
        "The lighthouse stood at the edge of the cliff for two hundred years. Every night its keeper "
        "climbed the spiral stairs, trimmed the wick and watched the ships pass safely by. When the "
        "storm came in the winter of 1887, the light did not go out."
    )
    ids = llama.tokenizer.encode(text)
    a, b = _teacher_forced_top1(bundled, ids), _teacher_forced_top1(llama, ids)
    agree = sum(x == y for x, y in zip(a, b)) / len(a)
    assert agree >= 0.9, f"top-1 agreement {agree:.2f}"


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean KL(softmax p || softmax q) over rows."""
    lp, lq = torch.log_softmax(torch.from_numpy(p).double(), -1), torch.log_softmax(torch.from_numpy(q).double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_our_block_kernels_are_at_least_as_close_to_float32_as_llama_cpps(llama, bundled):
    """With our kernels spliced in (``matmul``), the logits differ from llama.cpp's own (so they ran)
    and are no further from the float32 model's than llama.cpp's own are (measured: KL 0.003 against 0.007)."""
    if not llama.splices:
        pytest.skip("our block kernels cannot run here: llama.cpp keeps its own")
    ids = llama.tokenizer.encode(
        "The lighthouse stood at the edge of the cliff for two hundred years. Every night its keeper "
        "climbed the spiral stairs, trimmed the wick and watched the ships pass safely by. When the "
        "storm came in the winter of 1887, the light did not go out."
    )
    theirs, ours = llama._all_logits(ids, None), llama._all_logits(ids, llama._splice)
    with torch.no_grad():
        ref = bundled.model(torch.tensor([ids])).logits[0].float().numpy()
    assert not np.array_equal(ours, theirs)
    assert _kl(ref, ours) <= 1.25 * _kl(ref, theirs), (_kl(ref, ours), _kl(ref, theirs))
    agree = float(np.mean(ours.argmax(1) == ref.argmax(1)))
    assert agree >= 0.9, f"top-1 agreement with float32 {agree:.2f}"


@pytest.mark.fallback
def test_batched_rows_match_one_at_a_time(llama):
    batched = ts.generate(llama, PROMPTS, max_tokens=12, ignore_eos=True)
    for p, g in zip(PROMPTS, batched):
        single = ts.generate(llama, p, max_tokens=12, ignore_eos=True)
        assert g.tokens == single.tokens
        assert g.logprobs == pytest.approx(single.logprobs, abs=1e-5)


def test_rows_match_one_at_a_time_in_batches_past_llama_cpps_gemm(llama):
    """From 8 rows llama.cpp's own kernels switch to GEMMs that move a row's logits; our spliced
    kernels treat every row alone at any batch size, so 9 rows still match bit for bit."""
    if not llama.splices:
        pytest.skip("our block kernels cannot run here: llama.cpp keeps its own")
    prompts = PROMPTS + ["In 1969,", "Dear Sir,", "Chapter one:", "Q: What is 2+2?", "import numpy as np"]
    batched = ts.generate(llama, prompts, max_tokens=6, ignore_eos=True)
    for p, g in zip(prompts, batched):
        single = ts.generate(llama, p, max_tokens=6, ignore_eos=True)
        assert g.tokens == single.tokens and g.logprobs == single.logprobs


def test_step_logits_are_not_copied(llama):
    s = llama.session()
    try:
        s.prefill([llama.tokenizer.encode("Hello"), llama.tokenizer.encode("Good morning")])
        logits = s.step(torch.tensor([1000, 2000]))
        if s.head is None:  # a view of llama.cpp's output buffer
            addr = ctypes.cast(llama_cpp.llama_get_logits(s.c.ptr), ctypes.c_void_p).value
        else:  # our output kernel wrote them straight into the session's buffer
            addr = s._out.ctypes.data
        assert logits.shape == (2, llama.tokenizer.vocab_size)
        assert logits.data_ptr() == addr  # no copy
        assert s.step(torch.tensor([3000, 4000])).data_ptr() == addr  # and no new buffer per step
    finally:
        s.close()


def test_logprobs_top_alternatives_and_seeds(llama):
    g = ts.generate(llama, "The capital of France is", max_tokens=5, ignore_eos=True, top_logprobs=3)
    for t, lp, top in zip(g.tokens, g.logprobs, g.top_logprobs):
        assert top[0][0] == t and top[0][1] == pytest.approx(lp)
        assert top[0][1] >= top[1][1] >= top[2][1] and lp <= 0
    kw = dict(max_tokens=16, temperature=1.2, top_p=0.95, ignore_eos=True)
    a = ts.generate(llama, "Once upon a time", seed=7, **kw).tokens
    assert a == ts.generate(llama, "Once upon a time", seed=7, **kw).tokens
    assert a != ts.generate(llama, "Once upon a time", seed=8, **kw).tokens


def test_trim_and_fork_reuse_the_cache_exactly(llama):
    ids = llama.tokenizer.encode("The old lighthouse keeper")
    s = llama.session()
    try:
        s.prefill([ids])
        after = [s.step(torch.tensor([t]))[0].clone() for t in (506, 1530, 236764)]
        s.trim(2)  # back to just after 506
        assert torch.equal(s.step(torch.tensor([1530]))[0], after[1])
        s.select([0, 0, 0])  # fork into three rows
        out = s.step(torch.tensor([236764, 236764, 532])).clone()
        assert torch.equal(out[0], after[2]) and torch.equal(out[1], after[2])
        s.select([2])  # keep only the third branch
        s.step(torch.tensor([1000]))
    finally:
        s.close()
    ref = llama.session()
    try:
        ref.prefill([ids + [506, 1530]])
        assert torch.equal(ref.step(torch.tensor([532])), out[2:3])
    finally:
        ref.close()


def test_steering_changes_output_and_clearing_restores_baseline(llama):
    p = "The weather today is"
    base = ts.generate(llama, p, max_tokens=16, ignore_eos=True)
    steered = ts.generate(llama, p, max_tokens=16, ignore_eos=True, controls=[Steer(llama.hidden_size)])
    assert steered.tokens != base.tokens
    again = ts.generate(llama, p, max_tokens=16, ignore_eos=True)
    assert again.tokens == base.tokens and again.logprobs == base.logprobs
    zero = ts.generate(llama, p, max_tokens=16, ignore_eos=True, controls=[Steer(llama.hidden_size, norm=0.0)])
    assert zero.tokens == base.tokens and zero.logprobs == base.logprobs


def test_steering_only_generated_positions_leaves_the_prompt_alone(llama):
    p = "The weather today is"
    base = ts.generate(llama, p, max_tokens=12, ignore_eos=True)
    gen = ts.generate(llama, p, max_tokens=12, ignore_eos=True, controls=[Steer(llama.hidden_size, positions="generated")])
    assert gen.tokens[0] == base.tokens[0] and gen.logprobs[0] == base.logprobs[0]  # from the prompt's pass
    assert gen.tokens != base.tokens


@pytest.mark.parametrize(
    "control, match",
    [
        (Steer(640, layers=(0,)), "layer 0"),
        (Steer(640, per_row=True), "per-row"),
        (Steer(640, layers=(40,)), "out of range"),
    ],
)
def test_edits_llama_cannot_run_are_user_errors(llama, control, match):
    with pytest.raises(ts.UserError, match=match):
        ts.generate(llama, "Hello", max_tokens=2, controls=[control])


def test_function_edits_and_hidden_states_point_to_torch(llama):
    class Fn(Control):
        stages = frozenset({"edits"})

        def residual_edits(self, n_rows, rows_per_prompt):
            return [ResidualEdit(layer=3, fn=lambda h, ctx: h * 2)]

    with pytest.raises(ts.UserError, match="--backend torch"):
        ts.generate(llama, "Hello", max_tokens=2, controls=[Fn()])
    with pytest.raises(ts.UserError, match="hidden states"):
        llama.hidden_states(["Hello"], [3])


def test_backend_choice(tiny_dir):
    bundled = resolve(None)
    assert choose_backend(bundled, "auto") == "llamacpp"
    assert choose_backend(bundled, "auto", needs=frozenset({RESIDUAL_ADD})) == "llamacpp"
    assert choose_backend(bundled, "auto", needs=frozenset({HIDDEN_STATES})) == "torch"
    assert choose_backend(bundled, "auto", needs=frozenset({RESIDUAL_FN})) == "torch"
    assert choose_backend(bundled, "auto", needs=frozenset({RESIDUAL_FIRST})) == "torch"
    assert choose_backend(bundled, "auto", needs=frozenset({LOAD_HF})) == "torch"
    assert choose_backend(bundled, "auto", dtype="bfloat16") == "torch"
    assert choose_backend(bundled, "torch") == "torch"
    hf = resolve(str(tiny_dir))
    assert choose_backend(hf, "auto") == "torch"
    with pytest.raises(ts.UserError, match="Hugging Face folder"):
        choose_backend(hf, "llamacpp")
    with pytest.raises(ts.UserError, match="hidden states"):
        choose_backend(bundled, "llamacpp", needs=frozenset({HIDDEN_STATES}))
    with pytest.raises(ts.UserError, match="unknown backend"):
        choose_backend(bundled, "vllm")


def test_user_gguf_file_loads_directly(llama, tmp_path):
    from tokensteer.models import bundled_gguf

    link = tmp_path / "my-model.gguf"
    link.symlink_to(bundled_gguf())
    lm = ts.load(str(link))
    try:
        assert lm.name == "llamacpp" and lm.model_name == "my-model.gguf"
        g = ts.generate(lm, "Once upon a time", max_tokens=6, ignore_eos=True)
        assert g.tokens == ts.generate(llama, "Once upon a time", max_tokens=6, ignore_eos=True).tokens
    finally:
        lm.close()


def test_full_context_is_a_user_error(tmp_path):
    from tokensteer.backends.llamacpp import LlamaCppBackend
    from tokensteer.models import bundled_gguf

    lm = LlamaCppBackend.load(bundled_gguf(), n_ctx=256)
    try:
        words = "one two three four five six seven eight nine ten "
        with pytest.raises(ts.UserError, match="exceed the 256-token context .* TOKENSTEER_N_CTX"):  # before any work
            ts.generate(lm, words * 30, max_tokens=8, ignore_eos=True)
        with pytest.raises(ts.UserError, match="exceed the 256-token context"):
            ts.generate(lm, words * 24, max_tokens=40, ignore_eos=True)
        prompts = [f"{i} " + words * 6 for i in range(4)]  # each row fits; the four rows share 256 cells
        with pytest.raises(ts.UserError, match="context is full"):  # while decoding
            ts.generate(lm, prompts, max_tokens=40, ignore_eos=True)
        assert len(ts.generate(lm, words, max_tokens=4, ignore_eos=True).tokens) == 4  # still usable
    finally:
        lm.close()


def test_cli_json_says_which_backend_ran():
    from typer.testing import CliRunner

    from tokensteer.cli import app

    res = CliRunner().invoke(app, ["generate", "Once upon a time", "-n", "4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["backend"] == "llamacpp" and len(out["tokens"]) == 4
    res = CliRunner().invoke(app, ["generate", "Hi", "--backend", "llamacpp", "--model", "/nonexistent.gguf"])
    assert res.exit_code == 2


def test_tokenizer_keeps_its_model_alive_and_refuses_after_close():
    import gc

    from tokensteer.backends.llamacpp import LlamaCppBackend
    from tokensteer.models import bundled_gguf

    tok = LlamaCppBackend.load(bundled_gguf(), n_ctx=64).tokenizer  # the backend itself is dropped
    gc.collect()
    assert tok.decode(tok.encode("Hello world", add_bos=False)) == "Hello world"
    lm = LlamaCppBackend.load(bundled_gguf(), n_ctx=64)
    lm.close()
    with pytest.raises(ts.UserError, match="closed"):
        lm.tokenizer.encode("Hello")
    with pytest.raises(ts.UserError, match="closed"):
        ts.generate(lm, "Hello", max_tokens=2)

