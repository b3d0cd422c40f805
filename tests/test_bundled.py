"""The decode loop on the real bundled Gemma 3 270M (torch backend): equals HF generate, hooks work."""

from __future__ import annotations

import pytest
import torch

import tokensteer as ts
from tokensteer.hooks import Control

pytestmark = pytest.mark.model

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
]


def test_greedy_equals_hf_generate_token_for_token(bundled):
    for prompt in PROMPTS:
        ids = torch.tensor([bundled.tokenizer.encode(prompt)])
        with torch.inference_mode():
            ref = bundled.model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :].tolist()
        ours = ts.generate(bundled, prompt, max_tokens=16)
        eos = bundled.tokenizer.eos_ids
        ref = ref[: next((i for i, t in enumerate(ref) if t in eos), len(ref))]
        assert ours.tokens == ref, prompt


def test_batched_greedy_equals_single(bundled):
    batch = ts.generate(bundled, PROMPTS[:3], max_tokens=8)
    for p, g in zip(PROMPTS[:3], batch):
        assert g.tokens == ts.generate(bundled, p, max_tokens=8).tokens


def test_seeded_sampling_reproducible(bundled):
    kw = dict(max_tokens=12, temperature=0.9, top_p=0.95, seed=123)
    a = ts.generate(bundled, PROMPTS[1], **kw)
    b = ts.generate(bundled, PROMPTS[1], **kw)
    assert a.tokens == b.tokens and a.text == b.text


def test_stream_equals_generate_and_stop_string(bundled):
    kw = dict(max_tokens=20, temperature=0.8, seed=5)
    streamed = "".join(e.text for e in ts.stream(bundled, PROMPTS[1], **kw))
    full = ts.generate(bundled, PROMPTS[1], **kw)
    assert streamed == full.text
    words = full.text.split()
    assert len(words) > 3, full.text
    stop = " " + words[2]
    cut = ts.generate(bundled, PROMPTS[1], stop=[stop], **kw)
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_logits_hook_bans_the_greedy_token(bundled):
    first = ts.generate(bundled, PROMPTS[0], max_tokens=6).tokens
    banned = first[0]

    class Ban(Control):
        stages = frozenset({"rewrite"})

        def logprobs(self, state, lp):
            return lp.index_fill(1, torch.tensor([banned]), float("-inf"))

    g = ts.generate(bundled, PROMPTS[0], max_tokens=6, controls=[Ban()])
    assert banned not in g.tokens
    assert g.tokens != first
