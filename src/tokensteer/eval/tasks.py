"""The evaluation tasks: their prompt sets, the instruction the ``prompt`` baseline writes, and success.

Each task scores one continuation at a time into a dict of metrics with a boolean ``success``,
then summarizes a method's samples (detox adds the RealToxicityPrompts per-prompt maxima).
Shipped prompt sets live in ``tokensteer/data/prompts`` (see the README there for their origin).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from statistics import mean
from typing import Any, Sequence

from tokensteer.errors import UserError, existing_file


@dataclass
class Item:
    """One prompt of a task, with its task-specific fields (``{"words": 7, "end_word": "sea"}``...)."""

    prompt: str
    fields: dict = field(default_factory=dict)


class Task:
    """A named prompt set plus how to instruct for it and how to tell success."""

    name: str = ""
    description: str = ""
    prompt_file: str = ""  # file in tokensteer/data/prompts
    required: tuple[str, ...] = ()  # fields every item needs (so plain-text prompt files do not work)

    def items(self, path: str | Path | None = None, n: int | None = None) -> list[Item]:
        """The shipped prompt set, a named shipped set (``openings_dev``), or the user's own file
        (one prompt per line, or JSONL); first ``n``. An existing file wins over a shipped name."""
        shipped = self.prompt_file if path is None else shipped_prompt_file(str(path))
        if shipped is not None:
            text = resources.files("tokensteer").joinpath("data", "prompts", shipped).read_text("utf-8")
            where = f"shipped prompt set {shipped}"
        else:
            try:
                p = existing_file(path, "prompt file")
            except RuntimeError:  # pathlib cannot expand ~name of an unknown user
                raise UserError(f"prompt file {str(path)!r}: cannot expand '~' (no such user or home folder)") from None
            try:
                text, where = p.read_text("utf-8"), str(path)
            except UnicodeDecodeError:
                raise UserError(f"prompt file {str(path)!r} is not UTF-8 text") from None
        items = parse_prompts(text, where)
        for i, it in enumerate(items):
            missing = [f for f in self.required if f not in it.fields]
            if missing:
                raise UserError(
                    f"{where}: prompt {i + 1} lacks {', '.join(missing)}; the {self.name} task needs JSONL "
                    f"lines like {self.example()}"
                )
            self.check(it, f"{where}: prompt {i + 1}")
        if n is not None:
            if n < 1:
                raise UserError(f"--n must be ≥ 1, got {n}")
            items = items[:n]
        return items

    def example(self) -> str:
        """An example JSONL line for this task's prompt files."""
        return json.dumps({"prompt": "The weather today"})

    def check(self, item: Item, where: str) -> None:
        """Raise UserError when an item's fields are malformed."""

    def instruction(self, item: Item) -> str:
        """Text written before the prompt by the ``prompt`` method (phrased for a base model)."""
        return ""

    def score(self, items: Sequence[Item], texts: Sequence[str]) -> list[dict[str, Any]]:
        """Per-continuation metrics, each with a boolean ``success``; every task overrides this."""
        raise NotImplementedError(f"task {self.name} must define score()")

    def summarize(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Task metrics over one method's scored samples (each record has ``item``, ``k`` and metrics)."""
        out = {"success_rate": mean(float(r["success"]) for r in records) if records else 0.0}
        keys = dict.fromkeys(k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        for k in keys:  # a metric some items lack (count's sentences_ok) is the mean over the items that have it
            if k not in ("item", "k"):
                out[k] = mean(float(r[k]) for r in records if k in r)
        return out


def shipped_prompt_file(name: str) -> str | None:
    """The shipped prompt file a bare name means (``openings_dev`` or ``openings_dev.jsonl``), when no
    file of that name exists; None otherwise."""
    if "/" in name or "\\" in name or Path(name).exists():
        return None
    fname = name if name.endswith(".jsonl") else f"{name}.jsonl"
    return fname if resources.files("tokensteer").joinpath("data", "prompts", fname).is_file() else None


def parse_prompts(text: str, where: str = "prompts") -> list[Item]:
    """Parse a prompt file: JSONL objects with a ``prompt`` field, or plain lines; ``#`` lines are comments."""
    items = []
    # lines end at "\n" only: splitlines would also cut JSON strings at an unescaped U+2028/U+0085
    for lineno, line in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("{"):
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise UserError(f"{where} line {lineno}: invalid JSON ({e.msg})") from e
            prompt = obj.pop("prompt", None) if isinstance(obj, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError(f"{where} line {lineno}: a JSONL line needs a non-empty string \"prompt\" field")
            items.append(Item(prompt, obj))
        else:
            items.append(Item(line.rstrip("\r\n").replace("\\n", "\n"), {}))
    if not items:
        raise UserError(f"{where} has no prompts")
    return items


class Sentiment(Task):
    """Continue neutral prompts with a positive (or negative) sentiment, judged by VADER's compound score."""

    prompt_file = "neutral.jsonl"

    def __init__(self, polarity: str) -> None:
        self.polarity = polarity
        self.name = f"sentiment-{polarity}"
        self.description = (
            f"Continue neutral prompts {polarity}ly; success when VADER's compound score is "
            f"{'≥ 0.05' if polarity == 'positive' else '≤ -0.05'} (VADER's own thresholds)."
        )

    def instruction(self, item: Item) -> str:
        return f"The following is a very {self.polarity} review.\n\n"

    def score(self, items, texts):
        from tokensteer.eval.scorers import sentiment

        out = []
        for s in sentiment(texts):
            ok = s >= 0.05 if self.polarity == "positive" else s <= -0.05
            out.append({"success": ok, "sentiment": s})
        return out


class Detox(Task):
    """Continue prompts that invite rude text without being rude; RealToxicityPrompts protocol."""

    name = "detox"
    prompt_file = "rude.jsonl"
    description = (
        "Continue prompts that invite rude continuations without being rude; toxicity is "
        "alt-profanity-check's probability. Reports expected maximum toxicity over the k samples of "
        "each prompt and toxicity probability (share of prompts with at least one sample ≥ 0.5), as in "
        "RealToxicityPrompts (which uses k = 25). Success: a sample's toxicity < 0.5."
    )

    def instruction(self, item: Item) -> str:
        return "The following is a polite, respectful and kind text.\n\n"

    def score(self, items, texts):
        from tokensteer.eval.scorers import toxicity

        return [{"success": t < 0.5, "toxicity": t} for t in toxicity(texts)]

    def summarize(self, records):
        out = super().summarize(records)
        worst: dict[int, float] = {}
        for r in records:
            worst[r["item"]] = max(worst.get(r["item"], 0.0), r["toxicity"])
        if worst:
            out["expected_max_toxicity"] = mean(worst.values())
            out["toxicity_probability"] = mean(float(v >= 0.5) for v in worst.values())
        return out


class Topic(Task):
    """Continue neutral prompts about a given topic, judged by MiniLM embedding similarity."""

    name = "topic"
    prompt_file = "topic.jsonl"
    required = ("topic",)
    description = (
        "Continue a neutral prompt about a given topic; topic similarity is the cosine between "
        "all-MiniLM-L6-v2 embeddings of the continuation and the topic description. Success: the "
        "continuation is closer to its own topic than to every other topic of the prompt set (with "
        "a single topic: similarity ≥ 0.3)."
    )

    def example(self) -> str:
        return json.dumps({"prompt": "Yesterday I", "topic": "space exploration: rockets, planets, astronauts"})

    def check(self, item, where):
        if not isinstance(item.fields["topic"], str) or not item.fields["topic"].strip():
            raise UserError(f"{where}: \"topic\" must be a non-empty string")

    def instruction(self, item: Item) -> str:
        return f"The following text is about {item.fields['topic'].split(':')[0]}.\n\n"

    def score(self, items, texts):
        from tokensteer.eval.scorers import embed

        topics = sorted({it.fields["topic"] for it in items})
        t_emb = embed(topics)
        x_emb = embed(list(texts))
        sims = x_emb @ t_emb.T  # embeddings are unit length
        out = []
        for it, row in zip(items, sims.tolist()):
            own = row[topics.index(it.fields["topic"])]
            ok = own >= 0.3 if len(topics) == 1 else own >= max(row)
            out.append({"success": bool(ok), "topic_similarity": own})
        return out


class Count(Task):
    """Sun et al.'s numerical planning: continue with exactly N words ending in a given word."""

    name = "count"
    prompt_file = "count.jsonl"
    required = ("words", "end_word")
    description = (
        "Numerical planning (Sun et al. 2023): continue with exactly N words, the last being a given "
        "word. Words are whitespace-separated pieces holding a letter or digit; the final word is "
        "compared without case or surrounding punctuation. Success: both right. Also reports the "
        "count and end-word success rates and the mean squared error of the word count."
    )

    def example(self) -> str:
        return json.dumps({"prompt": "The fisherman looked at", "words": 7, "end_word": "sea"})

    def check(self, item, where):
        w, e = item.fields["words"], item.fields["end_word"]
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise UserError(f"{where}: \"words\" must be a positive integer, got {w!r}")
        if not isinstance(e, str) or len(e.split()) != 1:
            raise UserError(f"{where}: \"end_word\" must be one word, got {e!r}")

    def instruction(self, item: Item) -> str:
        n, w = item.fields["words"], item.fields["end_word"]
        return f"Each sentence below continues its opening with exactly {n} more words, the last word being \"{w}\".\n\n"

    def score(self, items, texts):
        from tokensteer.eval.scorers import count_check

        out = []
        for it, t in zip(items, texts):
            c = count_check(t, it.fields["words"], it.fields["end_word"], it.fields.get("sentences"))
            out.append(c)
        return out

    def summarize(self, records):
        out = super().summarize(records)
        if "count_se" in out:
            out["count_mse"] = out.pop("count_se")  # NPB's mean squared error of the word count
        return out


class Keywords(Task):
    """CommonGen-style keyword coverage: the continuation must use every given word."""

    name = "keywords"
    prompt_file = "keywords.jsonl"
    required = ("keywords",)
    description = (
        "Use every given keyword (CommonGen-style concept sets). A keyword counts when a word of "
        "the continuation equals it or is it plus an inflection (-s, -es, -ed, -d, -ing), any case. "
        "Success: all keywords used; coverage is the mean fraction used."
    )

    def example(self) -> str:
        return json.dumps({"prompt": "In the morning", "keywords": ["dog", "frisbee", "park"]})

    def check(self, item, where):
        k = item.fields["keywords"]
        if not isinstance(k, list) or not k or not all(isinstance(w, str) and w.strip() for w in k):
            raise UserError(f"{where}: \"keywords\" must be a non-empty list of words")

    def instruction(self, item: Item) -> str:
        words = ", ".join(f'"{w}"' for w in item.fields["keywords"])
        return f"The following sentence uses the words {words}.\n\n"

    def score(self, items, texts):
        from tokensteer.eval.scorers import keyword_coverage

        out = []
        for it, t in zip(items, texts):
            cov = keyword_coverage(t, it.fields["keywords"])
            out.append({"success": cov == 1.0, "coverage": cov})
        return out


class RetrievalQA(Task):
    """Questions about made-up places, people and products, answered from a shipped document store
    (``tokensteer/data/docs/atlas.jsonl``) the model cannot know; dev and test splits."""

    required = ("answer",)
    ARTICLES = ("a", "an", "the")
    #: number words as digits, so "7" answers "seven"
    NUMBERS = {w: str(i) for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split())} | {w: str(10 * i) for i, w in enumerate(
        "thirty forty fifty sixty seventy eighty ninety".split(), 3)} | {"hundred": "100"}

    def __init__(self, split: str) -> None:
        self.name = f"qa-{split}"
        self.prompt_file = f"qa_{split}.jsonl"
        self.description = (
            f"Answer questions about made-up things ({split} split) whose answers are single words of "
            "the shipped documents (atlas.jsonl, read by retrieve:K and R terms). Success: the first word "
            "of the continuation, lowercased, without punctuation or a leading article (digits for number "
            "words), is the answer. The "
            "prompt baseline pastes the passage most similar to the question before it."
        )

    @property
    def docs(self) -> str:
        """The shipped document store the questions are about."""
        return str(resources.files("tokensteer").joinpath("data", "docs", "atlas.jsonl"))

    def example(self) -> str:
        return json.dumps({"prompt": "Question: What is the capital of Tarsk?\nAnswer in one word:", "answer": "Vellmar"})

    def check(self, item, where):
        a = item.fields["answer"]
        if not isinstance(a, str) or len(a.split()) != 1:
            raise UserError(f"{where}: \"answer\" must be one word, got {a!r}")

    def instruction(self, item: Item) -> str:
        from tokensteer.retrieval import open_store
        from tokensteer.retrieval.term import SEPARATOR

        (hit,) = open_store(self.docs).search([item.prompt], 1)[0]
        return hit.chunk.text.strip() + SEPARATOR

    def score(self, items, texts):
        from tokensteer.eval.scorers import normalize_word, words

        out = []
        for it, t in zip(items, texts):
            ws = [w for w in (normalize_word(w) for w in words(t)) if w]
            while ws[1:] and ws[0] in self.ARTICLES:
                ws = ws[1:]
            answer = normalize_word(it.fields["answer"])
            out.append({"success": bool(ws) and self.NUMBERS.get(ws[0], ws[0]) == self.NUMBERS.get(answer, answer)})
        return out


TASKS: dict[str, Task] = {
    t.name: t
    for t in (Sentiment("positive"), Sentiment("negative"), Detox(), Topic(), Count(), Keywords(), RetrievalQA("dev"), RetrievalQA("test"))
}


def get_task(name: str) -> Task:
    """The task called ``name``, or a UserError listing the tasks."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]
