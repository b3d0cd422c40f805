"""Offline guides for classifier terms ``C("name")``: score candidate continuations with
log P(attribute | text), GeDi/FUDGE style, so the score can enter a formula.

The built-in guides are small text classifiers (TF-IDF over words and character n-grams, then
logistic regression) trained in a few milliseconds from the labelled sentences in
``guide_data.py``. They are not the evaluation scorers (VADER, alt-profanity-check). Register your
own with ``register_guide(name, factory)``; a guide only needs ``logprob(texts) -> Tensor[N]``.
"""

from __future__ import annotations

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


GUIDES: dict[str, Callable[[], Scorer]] = {
    "positive": lambda: TextClassifierGuide(guide_data.SENTIMENT, "positive"),
    "negative": lambda: TextClassifierGuide(guide_data.SENTIMENT, "negative"),
    "nontoxic": lambda: TextClassifierGuide(guide_data.CIVILITY, "nontoxic"),
    "formal": lambda: TextClassifierGuide(guide_data.REGISTER, "formal"),
    "informal": lambda: TextClassifierGuide(guide_data.REGISTER, "informal"),
}


def register_guide(name: str, factory: Callable[[], Scorer]) -> None:
    """Make ``C("name")`` available in formulas; ``factory`` is called once, on first use."""
    GUIDES[name] = factory
    get_guide.cache_clear()


@lru_cache(maxsize=None)
def get_guide(name: str) -> Scorer:
    """The guide called ``name``, built once per process."""
    return GUIDES[name]()
