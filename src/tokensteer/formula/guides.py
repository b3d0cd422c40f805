"""Offline guides for classifier terms ``C("name")``: score candidate continuations with
log P(attribute | text), GeDi/FUDGE style, so the score can enter a formula.

The built-in guides are small text classifiers trained in milliseconds from the labelled
sentences in ``guide_data.py`` (sentiment and civility also from the word lists of
``guide_words.py``, scored word by word; register: TF-IDF over words and character n-grams). They are not the evaluation scorers (VADER, alt-profanity-check). Register your
own with ``register_guide(name, factory)``; a guide only needs ``logprob(texts) -> Tensor[N]``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

if TYPE_CHECKING:
    import torch

from tokensteer.formula import guide_data


class Scorer(Protocol):
    """What a classifier term needs: the log-probability of its attribute for each text."""

    def logprob(self, texts: Sequence[str]) -> "torch.Tensor": ...


class TextClassifierGuide:
    """A TF-IDF + logistic-regression classifier over labelled texts; scores one class."""

    def __init__(self, data: dict[str, list[str]], target: str) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline, make_union

        texts = [t for ts in data.values() for t in ts]
        labels = [c == target for c, ts in data.items() for _ in ts]
        features = make_union(
            TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, lowercase=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, lowercase=True),
        )
        self.pipe = make_pipeline(features, LogisticRegression(C=10.0, max_iter=1000))
        self.pipe.fit(texts, labels)
        self.col = list(self.pipe.classes_).index(True)

    def logprob(self, texts: Sequence[str]) -> "torch.Tensor":
        import torch

        lp = self.pipe.predict_log_proba(list(texts))[:, self.col]
        return torch.from_numpy(lp).float()


class WordGuide:
    """A bag-of-words logistic regression over whole words, trained on labelled sentences plus
    word lists (``guide_words.py``); scoring is a dictionary lookup per word, cheap enough for
    every candidate at every step. Its log-odds saturate once a text clearly has the attribute,
    so a formula's push fades by itself after the text has made its point."""

    WORD = r"[a-z]+(?:'[a-z]+)?"

    def __init__(
        self, data: dict[str, list[str]], target: str, lists: dict[str, list[str]] | None = None, finish: float = 0.0
    ) -> None:
        """``finish``: log-odds taken off a text that ends in a line break (it is finished), so a
        formula avoids ending a passage that has not shown the attribute yet (FUDGE's view: the
        classifier judges the text as it will end); a text that clearly has it barely loses."""
        import re

        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.linear_model import LogisticRegression

        examples = {c: list(ts) + list((lists or {}).get(c, ())) for c, ts in data.items()}
        texts = [t for ts in examples.values() for t in ts]
        labels = [c == target for c, ts in examples.items() for _ in ts]
        vec = CountVectorizer(token_pattern=self.WORD, lowercase=True, binary=True)
        lr = LogisticRegression(C=10.0, max_iter=2000).fit(vec.fit_transform(texts), labels)
        # classes_ is [False, True]: the coefficients point towards the target
        self.weights = {w: float(c) for w, c in zip(vec.get_feature_names_out(), lr.coef_[0])}
        self.bias = float(lr.intercept_[0])
        self._split = re.compile(self.WORD).findall
        self.finish = float(finish)

    def logit(self, text: str) -> float:
        """Log-odds of the attribute: the bias plus the weight of each distinct word."""
        z = self.bias + sum(self.weights.get(w, 0.0) for w in set(self._split(text.lower())))
        return z - self.finish if text.endswith("\n") else z

    def logprob(self, texts: Sequence[str]) -> "torch.Tensor":
        import torch

        z = [self.logit(t) for t in texts]  # log σ(z) in plain Python: a torch op per step costs more
        return torch.tensor([min(x, 0.0) - math.log1p(math.exp(-abs(x))) for x in z], dtype=torch.float32)


#: log-odds the sentiment guides take off a finished text (see ``WordGuide``); chosen on the dev openings
FINISH = 3.0

GUIDES: dict[str, Callable[[], Scorer]] = {
    "positive": lambda: WordGuide(guide_data.SENTIMENT, "positive", _lists("POSITIVE", "NEGATIVE"), finish=FINISH),
    "negative": lambda: WordGuide(guide_data.SENTIMENT, "negative", _lists("POSITIVE", "NEGATIVE"), finish=FINISH),
    "nontoxic": lambda: WordGuide(guide_data.CIVILITY, "nontoxic", _lists("POLITE", "TOXIC")),
    "formal": lambda: TextClassifierGuide(guide_data.REGISTER, "formal"),
    "informal": lambda: TextClassifierGuide(guide_data.REGISTER, "informal"),
}


def _lists(first: str, second: str) -> dict[str, list[str]]:
    """The word lists of ``guide_words`` for a two-class guide, keyed like its ``guide_data`` set."""
    from tokensteer.formula import guide_words as gw

    keys = {"POSITIVE": "positive", "NEGATIVE": "negative", "POLITE": "nontoxic", "TOXIC": "toxic"}
    return {keys[n]: gw.words(getattr(gw, n)) for n in (first, second)}


def register_guide(name: str, factory: Callable[[], Scorer]) -> None:
    """Make ``C("name")`` available in formulas; ``factory`` is called once, on first use."""
    GUIDES[name] = factory
    get_guide.cache_clear()


@lru_cache(maxsize=None)
def get_guide(name: str) -> Scorer:
    """The guide called ``name``, built once per process."""
    return GUIDES[name]()
