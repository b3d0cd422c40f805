"""What the engine hands back: one event per accepted token, and a finished prompt's result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class TokenEvent:
    """One accepted token of one prompt, as a stream yields it."""

    index: int  # which prompt of the request
    token: int
    text: str  # new text that became final with this token (may be "")
    logprob: float  # under the controlled distribution, before temperature and truncation
    top: list[tuple[int, float]] = field(default_factory=list)  # top-n alternatives
    finish_reason: str | None = None  # "eos", "stop" or "length" on the last event
    t: float = 0.0  # seconds since the request was submitted
    # under the uncontrolled model (each prompt's own row before any control rewrote or masked it);
    # None where the forward pass itself was controlled (steering, mixed rows) or not computed
    model_logprob: float | None = None


@dataclass
class Generation:
    """The finished result for one prompt."""

    prompt: str
    text: str
    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    backend: str
    model_logprobs: list[float | None] = field(default_factory=list)  # TokenEvent.model_logprob of each token

    @property
    def tok_s(self) -> float:
        """Decode speed: tokens after the first, per second of decoding."""
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class Detokenizer:
    """Incremental detokenisation that holds back text a stop string could still claim, so a
    stream and a finished generation always give the same text.

    Each push decodes only a short window of the newest ids (the text before it is kept), so a
    long generation costs time in proportion to its length, not its square.
    """

    def __init__(self, tokenizer, stops: Sequence[str], skip_special: bool = True) -> None:
        self.tok, self.stops, self.emitted, self.skip_special = tokenizer, stops, 0, skip_special
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""  # the text of ids[: self.read], final
        self.start = self.read = 0  # the window: ids[start:] is decoded, ids[start:read] already in ``text``

    def push(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """Return the text that became final with these ids, and whether a stop string was hit."""
        text = self.text_of(ids)
        begin = max(0, self.emitted - self.longest + 1)  # a stop wholly in the emitted text was found before
        hits = [i for i in (text.find(s, begin) for s in self.stops) if i != -1]
        if hits:
            safe = min(hits)
        elif final:
            safe = len(text)
        else:
            safe = len(text)
            while safe > self.emitted and text[safe - 1] == "\ufffd":
                safe -= 1  # an incomplete UTF-8 character: wait for its next byte
            safe -= max((k for s in self.stops for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        new = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return new, bool(hits)

    def text_of(self, ids: list[int]) -> str:
        """The text of all ``ids`` (each push's ids extend the last): the kept text, then what the
        window's newest ids add. Both decodes of the window start at the same id, so a tokenizer's
        start-of-text rules cancel."""
        before = self.tok.decode(ids[self.start : self.read], skip_special=self.skip_special)
        window = self.tok.decode(ids[self.start :], skip_special=self.skip_special)
        if not window.startswith(before):  # a tokenizer whose text is not additive here: decode it all
            self.text, self.start, self.read = "", 0, 0
            return self.tok.decode(ids, skip_special=self.skip_special)
        tail = window[len(before) :]
        text = self.text + tail
        if tail and not tail.endswith("\ufffd"):  # complete characters: keep them, move the window on
            self.text, self.start, self.read = text, self.read, len(ids)
        return text


def collect(prompts: Sequence[str], events: Sequence[TokenEvent], prompt_tokens: Sequence[int], total_s: float, backend: str) -> list[Generation]:
    """Fold a request's events into one Generation per prompt."""
    per: list[list[TokenEvent]] = [[] for _ in prompts]
    for ev in events:
        per[ev.index].append(ev)
    out = []
    for p, evs, n in zip(prompts, per, prompt_tokens):
        kept = [e for e in evs if e.finish_reason != "eos"]
        first = evs[0].t if evs else total_s
        out.append(
            Generation(
                prompt=p,
                text="".join(e.text for e in evs),
                tokens=[e.token for e in kept],
                logprobs=[e.logprob for e in kept],
                top_logprobs=[e.top for e in kept],
                finish_reason=evs[-1].finish_reason if evs else "length",
                prompt_tokens=n,
                prefill_s=first,
                decode_s=(evs[-1].t - first) if evs else 0.0,
                backend=backend,
                model_logprobs=[e.model_logprob for e in kept],
            )
        )
    return out
