"""Offline guides for classifier terms ``C("name")``: score candidate continuations with
log P(attribute | text), GeDi/FUDGE style, so the score can enter a formula.

The built-in guides are small text classifiers trained in milliseconds from the labelled
sentences in ``guide_data.py`` (sentiment and civility also from the word lists of
``guide_words.py``, scored word by word; register: TF-IDF over words and character n-grams). They are not the evaluation scorers (VADER, alt-profanity-check). Register your
own with ``register_guide(name, factory)``; a guide only needs ``logprob(texts) -> Tensor[N]``.
"""

from __future__ import annotations

import bisect
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
        steady: bool = False,
        prefix: int = 0,
        negation: bool = False,
    ) -> None:
        """``finish``: log-odds taken off a text that ends in a line break (it is finished), so a
        formula avoids ending a passage that has not shown the attribute yet (FUDGE's view: the
        classifier judges the text as it will end); a text that clearly has it barely loses.
        ``margin``: log-odds a text must pass before the guide saturates (it scores
        σ(z − margin)), so the push lasts until the attribute is clear rather than merely present.
        ``cap``: the most log-odds the target's own words may add up to, so a text cannot bank
        credit with them that would hide a word of the other class (one insult in a polite text
        still costs its full weight). ``repeats``: a listed word of another class (``lists``) counts
        each time it occurs, so repeating one (say, an insult already in the prompt) is never free.
        ``steady``: words against the target cost their full weight however clear the text already
        is (the score is log σ(z⁺ − margin) plus their weights, z⁺ the log-odds without them), so a
        text that has made its point is still kept from undoing it.
        ``prefix``: a text ending inside a word of at least this many letters that the guide does
        not know is scored as the most opposed listed word of another class it begins, so a word
        the tokenizer splits ("stup" + "id") is weighed when its first piece is chosen (0: off).
        ``negation``: a word up to ``SCOPE`` words after a negator ("not", "never", "didn't")
        counts ``FLIP`` times its weight ("not happy" leans negative, "not to cry" no longer does)."""
        import re

        examples = {c: list(ts) + list((lists or {}).get(c, ())) for c, ts in data.items()}
        self.weights, self.bias = _word_weights(examples, target, self.WORD)
        self._split = re.compile(self.WORD).findall
        self.finish, self.margin, self.cap = float(finish), float(margin), cap
        others = {w for c, ws in (lists or {}).items() if c != target for w in ws}
        self.repeated = {w: v for w, v in self.weights.items() if w in others and v < 0} if repeats else {}
        self.steady, self.prefix, self.negation = steady, int(prefix), negation
        self._opposed = sorted(w for w in others if self.weights.get(w, 0.0) < 0)

    def prefix_weight(self, piece: str) -> float:
        """The weight of the most opposed listed word that starts with ``piece`` (0 if none)."""
        i = bisect.bisect_left(self._opposed, piece)
        found = []
        while i < len(self._opposed) and self._opposed[i].startswith(piece):
            found.append(self.weights[self._opposed[i]])
            i += 1
        return min(found, default=0.0)

    def parts(self, text: str) -> tuple[float, float]:
        """(log-odds from the bias and the target's words, capped and less ``margin`` and the
        finish penalty; the summed weights of the words against it)."""
        words = self._split(text.lower())
        if self.negation:
            ws = [self.weights.get(w, 0.0) * (FLIP if neg else 1.0) for w, neg in set(negated(words))]
        else:
            ws = [self.weights.get(w, 0.0) for w in set(words)]
        if self.repeated:  # a listed word of another class again at each further occurrence
            ws += [self.repeated[w] * (n - 1) for w, n in Counter(words).items() if n > 1 and w in self.repeated]
        if self.prefix and words and text[-1:].isalpha():
            last = words[-1]  # the text may stop inside this word
            if len(last) >= self.prefix and last not in self.weights:
                ws.append(self.prefix_weight(last))
        gain = sum(w for w in ws if w > 0)
        if self.cap is not None:
            gain = min(gain, self.cap)
        z = self.bias + gain - self.margin - (self.finish if text.endswith("\n") else 0.0)
        return z, sum(w for w in ws if w < 0)

    def logit(self, text: str) -> float:
        """Log-odds of the attribute: the bias plus the weight of each distinct word (the target's
        words together at most ``cap``), less ``margin``."""
        z, loss = self.parts(text)
        return z + loss

    def logprob(self, texts: Sequence[str]) -> "torch.Tensor":
        import torch

        out = []
        for t in texts:  # log σ(z) in plain Python: a torch op per step costs more
            z, loss = self.parts(t)
            x = z if self.steady else z + loss
            out.append(min(x, 0.0) - math.log1p(math.exp(-abs(x))) + (loss if self.steady else 0.0))
        return torch.tensor(out, dtype=torch.float32)


def _word_weights(examples: dict[str, list[str]], target: str, word: str) -> tuple[dict[str, float], float]:
    """Each word's weight towards ``target`` and the bias of a logistic regression over whole words
    of ``examples``; trained once per data set and kept in the cache, since training (scikit-learn's
    import above all) takes longer than a short generation."""
    import hashlib
    import json
    from importlib.metadata import version

    from tokensteer.files import atomic_write
    from tokensteer.models import home

    spec = json.dumps([examples, target, word, version("scikit-learn")], sort_keys=True)
    path = home() / "guides" / f"words-{hashlib.sha1(spec.encode()).hexdigest()[:16]}.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(saved.get("weights"), dict) and isinstance(saved.get("bias"), float):
            return saved["weights"], saved["bias"]
    except (OSError, ValueError, AttributeError):
        pass  # none yet, or damaged: train again
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    texts = [t for ts in examples.values() for t in ts]
    labels = [c == target for c, ts in examples.items() for _ in ts]
    vec = CountVectorizer(token_pattern=word, lowercase=True, binary=True)
    lr = LogisticRegression(C=10.0, max_iter=2000).fit(vec.fit_transform(texts), labels)
    # classes_ is [False, True]: the coefficients point towards the target
    weights = {w: float(c) for w, c in zip(vec.get_feature_names_out(), lr.coef_[0])}
    bias = float(lr.intercept_[0])
    try:
        atomic_write(path, json.dumps({"weights": weights, "bias": bias}), user_error=False)
    except OSError:
        pass  # a read-only cache: train again next time
    return weights, bias


#: negators, how many words after one are negated, and the factor on a negated word's weight
NEGATORS = frozenset("not no never nothing nobody none neither nor without hardly cannot".split())
SCOPE, FLIP = 3, -0.5


def negated(words: Sequence[str]) -> list[tuple[str, bool]]:
    """Each word that is not a negator, with whether it falls within ``SCOPE`` words after one."""
    out, left = [], 0
    for w in words:
        if w in NEGATORS or w.endswith("n't"):
            left = SCOPE
            continue
        out.append((w, left > 0))
        left = max(left - 1, 0)
    return out


#: log-odds the sentiment guides take off a finished text, and the margin they ask for (see
#: ``WordGuide``); chosen on the dev openings
FINISH, MARGIN = 3.0, 4.0
#: the most credit polite words give the civility guide (its ``cap``), so any insult weighs fully, and
#: the letters of a word's first piece it scores as the insult it begins (``prefix``); chosen on rude_dev
CIVIL_CAP, CIVIL_PREFIX = 1.0, 3

GUIDES: dict[str, Callable[[], Scorer]] = {
    "positive": lambda: WordGuide(guide_data.SENTIMENT, "positive", word_lists("POSITIVE", "NEGATIVE"), finish=FINISH, margin=MARGIN),
    "negative": lambda: WordGuide(guide_data.SENTIMENT, "negative", word_lists("POSITIVE", "NEGATIVE", broad=True), finish=FINISH, margin=MARGIN),
    "nontoxic": lambda: WordGuide(
        guide_data.CIVILITY, "nontoxic", word_lists("POLITE", "TOXIC", broad=True), cap=CIVIL_CAP, repeats=True, steady=True, prefix=CIVIL_PREFIX
    ),
    "formal": lambda: TextClassifierGuide(guide_data.REGISTER, "formal"),
    "informal": lambda: TextClassifierGuide(guide_data.REGISTER, "informal"),
}


def word_lists(first: str, second: str, broad: bool = False) -> dict[str, list[str]]:
    """The word lists of ``guide_words`` for a two-class guide, keyed like its ``guide_data`` set;
    ``broad`` adds each class's ``*_MORE`` list where it has one and leaves out the ``MILD`` words."""
    from tokensteer.formula import guide_words as gw

    keys = {"POSITIVE": "positive", "NEGATIVE": "negative", "POLITE": "nontoxic", "TOXIC": "toxic"}
    if not broad:
        return {keys[n]: gw.words(getattr(gw, n)) for n in (first, second)}
    mild = set(gw.words(gw.MILD))
    full = lambda n: [w for w in dict.fromkeys(gw.words(getattr(gw, n)) + gw.words(getattr(gw, f"{n}_MORE", ""))) if w not in mild]
    return {keys[n]: full(n) for n in (first, second)}


def register_guide(name: str, factory: Callable[[], Scorer]) -> None:
    """Make ``C("name")`` available in formulas; ``factory`` is called once, on first use."""
    GUIDES[name] = factory
    get_guide.cache_clear()


@lru_cache(maxsize=None)
def get_guide(name: str) -> Scorer:
    """The guide called ``name``, built once per process."""
    return GUIDES[name]()
