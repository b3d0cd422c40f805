"""Byte-level probabilities on the real bundled model (Gemma 3 270M, SentencePiece-style BPE with
byte fallback): prompts that end inside a word, agreement with token-level log-probabilities,
and the llama.cpp backend through the same Session API."""

from __future__ import annotations

import math

import pytest
import torch

import tokensteer
from tokensteer.bytes import ByteState, generate_bytes, score

pytestmark = pytest.mark.model


@pytest.mark.parametrize("prompt, rest", [("The capital of France is Par", "is"), ("Thank you very mu", "ch")])
def test_a_prompt_that_ends_inside_a_word_completes_it(bundled, prompt, rest):
    g = generate_bytes(bundled, prompt, max_tokens=len(rest) + 1)
    assert g.text.startswith(rest), g.text
    assert g.forward_passes <= len(prompt) + len(g.tokens) + 1


def test_byte_logprobs_agree_with_token_logprobs(bundled):
    """Σ log P(byte) + log P(END) is the token-level log-probability of the canonical encoding and
    EOS, renormalised over canonical tokens: never below the plain one, and close to it."""
    text = "The cat sat on the mat."
    byte_lps, end = score(bundled, text)
    got = math.fsum(byte_lps) + end
    ids = bundled.tokenizer.encode(text)
    with torch.no_grad():
        lp = torch.log_softmax(bundled.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    plain = sum(float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1))
    plain += float(torch.logsumexp(lp[-1, sorted(bundled.tokenizer.eos_ids)], 0))
    assert plain - 1e-3 <= got <= plain + 0.1 * len(ids), (got, plain)


def test_llamacpp_backend_runs_byte_level():
    pytest.importorskip("llama_cpp")
    lm = tokensteer.load(None, backend="llamacpp")
    st = ByteState(lm, "The capital of France is Par")
    lp = st.logprobs()
    assert abs(float(lp.exp().sum()) - 1) < 1e-9 and int(lp.argmax()) == ord("i")
    st.push(ord("i"))
    assert int(st.logprobs().argmax()) == ord("s")
    st.close()
