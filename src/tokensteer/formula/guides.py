"""Offline guides for classifier terms ``C("name")``: score candidate continuations with
log P(attribute | text), GeDi/FUDGE style, so the score can enter a formula.

The built-in guides are small text classifiers trained in milliseconds from the labelled
sentences in ``guide_data.py`` (sentiment and civility also from the word lists of
``guide_words.py``, scored word by word; register: TF-IDF over words and character n-grams). They are not the evaluation scorers (VADER, alt-profanity-check). Register your
own with ``register_guide(name, factory)``; a guide only needs ``logprob(texts) -> Tensor[N]``.
"""

from __future__ import annotations

import math
from collections import Counter
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
        self,
        data: dict[str, list[str]],
        target: str,
        lists: dict[str, list[str]] | None = None,
        finish: float = 0.0,
        margin: float = 0.0,
        cap: float | None = None,
        repeats: bool = False,
    ) -> None:
        """``finish``: log-odds taken off a text that ends in a line break (it is finished), so a
        formula avoids ending a passage that has not shown the attribute yet (FUDGE's view: the
        classifier judges the text as it will end); a text that clearly has it barely loses.
        ``margin``: log-odds a text must pass before the guide saturates (it scores
        σ(z − margin)), so the push lasts until the attribute is clear rather than merely present.
        ``cap``: the most log-odds the target's own words may add up to, so a text cannot bank
        credit with them that would hide a word of the other class (one insult in a polite text
        still costs its full weight). ``repeats``: a listed word of another class (``lists``) counts
        each time it occurs, so repeating one (say, an insult already in the prompt) is never free."""
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
        self.finish, self.margin, self.cap = float(finish), float(margin), cap
        others = {w for c, ws in (lists or {}).items() if c != target for w in ws}
        self.repeated = {w: v for w, v in self.weights.items() if w in others and v < 0} if repeats else {}

    def logit(self, text: str) -> float:
        """Log-odds of the attribute: the bias plus the weight of each distinct word (the target's
        words together at most ``cap``), less ``margin``."""
        words = self._split(text.lower())
        ws = [self.weights.get(w, 0.0) for w in set(words)]
        if self.repeated:  # a listed word of another class again at each further occurrence
            ws += [self.repeated[w] * (n - 1) for w, n in Counter(words).items() if n > 1 and w in self.repeated]
        gain = sum(w for w in ws if w > 0)
        if self.cap is not None:
            gain = min(gain, self.cap)
        z = self.bias + gain + sum(w for w in ws if w < 0) - self.margin
        return z - self.finish if text.endswith("\n") else z

    def logprob(self, texts: Sequence[str]) -> "torch.Tensor":
        import torch

        z = [self.logit(t) for t in texts]  # log σ(z) in plain Python: a torch op per step costs more
        return torch.tensor([min(x, 0.0) - math.log1p(math.exp(-abs(x))) for x in z], dtype=torch.float32)


#: log-odds the sentiment guides take off a finished text, and the margin they ask for (see
#: ``WordGuide``); chosen on the dev openings
FINISH, MARGIN = 3.0, 4.0
#: the most credit polite words give the civility guide (its ``cap``), so any insult weighs fully; chosen on rude_dev
CIVIL_CAP = 1.0

GUIDES: dict[str, Callable[[], Scorer]] = {
    "positive": lambda: WordGuide(guide_data.SENTIMENT, "positive", word_lists("POSITIVE", "NEGATIVE"), finish=FINISH, margin=MARGIN),
    "negative": lambda: WordGuide(guide_data.SENTIMENT, "negative", word_lists("POSITIVE", "NEGATIVE"), finish=FINISH, margin=MARGIN),
    "nontoxic": lambda: WordGuide(guide_data.CIVILITY, "nontoxic", word_lists("POLITE", "TOXIC"), cap=CIVIL_CAP, repeats=True),
    "formal": lambda: TextClassifierGuide(guide_data.REGISTER, "formal"),
    "informal": lambda: TextClassifierGuide(guide_data.REGISTER, "informal"),
}


def word_lists(first: str, second: str) -> dict[str, list[str]]:
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
