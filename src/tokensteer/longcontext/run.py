"""Dense against selected attention on the same long prompts: accuracy, fidelity and speed.

Each sample is decoded greedily twice on the torch backend, with dense attention and with
TokenSelect, each in a fresh KV cache, in lockstep (chunk by chunk, step by step) so that the
timings of the two see the same machine load. Fidelity compares the two next-token distributions
(top-1 agreement, KL(dense ‖ selected)) at every step where both have generated the same text so
far: the first answer token always, later ones up to the first step where they differ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from statistics import mean
from typing import Any, Callable, Sequence

import torch

from tokensteer.errors import UserError
from tokensteer.kvselect import KVSelectConfig
from tokensteer.longcontext.tasks import TASKS, Sample, make_samples

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class Decoded:
    """One greedy generation: tokens, text, timings, per-step log-probabilities, selection counts."""

    tokens: list[int]
    text: str
    prefill_s: float
    decode_s: float
    logprobs: list[torch.Tensor] = field(repr=False)
    stats: dict | None = None
    hit_rate: float | None = None

    @property
    def tok_s(self) -> float:
        """Decode speed over the tokens after the first (the first comes from the prefill)."""
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 and self.decode_s > 0 else 0.0


def greedy_torch(lm, ids: Sequence[int], max_new: int, kvs: Sequence[KVSelectConfig | None], keep: bool = True) -> list[Decoded]:
    """Greedy decoding of ``max_new`` tokens (no stop) on a TorchBackend, once per config in ``kvs``
    (None: dense), in lockstep: each prefill chunk and each decode step runs for every config in
    turn, so a busy machine slows them alike and their timings compare."""
    from transformers import DynamicCache

    from tokensteer.kvselect import PREFILL_CHUNK, new_selector, use
    from tokensteer.kvselect.prefill import cache_kwarg, iter_prefill

    n, model = len(ids), lm.model
    prompt = torch.tensor([list(ids)])
    caches = [DynamicCache(config=model.config) for _ in kvs]
    sels = [new_selector(model, kv) if kv is not None else None for kv in kvs]
    pending = [iter_prefill(model, prompt, c, None, None, kv.chunk if kv else PREFILL_CHUNK, kv is not None and kv.dense_tail) for c, kv in zip(caches, kvs)]
    prefill_s, decode_s = [0.0] * len(kvs), [0.0] * len(kvs)
    logits: list[torch.Tensor | None] = [None] * len(kvs)
    while any(p is not None for p in pending):
        for j, gen in enumerate(pending):
            if gen is None:
                continue
            t = time.perf_counter()
            with use(sels[j]):
                step = next(gen, None)
            prefill_s[j] += time.perf_counter() - t
            if step is None:
                pending[j] = None
            elif step[1] is not None:
                logits[j] = step[1]
    tokens: list[list[int]] = [[] for _ in kvs]
    lps: list[list[torch.Tensor]] = [[] for _ in kvs]
    key = cache_kwarg(type(model))
    for i in range(max_new):
        for j in range(len(kvs)):
            lp = logits[j][0].log_softmax(-1)
            tok = int(lp.argmax())
            tokens[j].append(tok)
            if keep:
                lps[j].append(lp)
            if i + 1 < max_new:
                t = time.perf_counter()
                with use(sels[j]), torch.inference_mode():
                    out = model(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[n + i]]), use_cache=True, **{key: caches[j]})
                logits[j] = out.logits[:, -1].float()
                decode_s[j] += time.perf_counter() - t
    return [
        Decoded(tokens[j], lm.tokenizer.decode(tokens[j]), prefill_s[j], decode_s[j], lps[j],
                dict(sels[j].stats) if sels[j] else None, sels[j].hit_rate() if sels[j] else None)
        for j in range(len(kvs))
    ]


def greedy_llama(lm, ids: Sequence[int], max_new: int) -> Decoded:
    """The same greedy decoding through a llama.cpp session (dense attention)."""
    s = lm.session()
    try:
        t0 = time.perf_counter()
        logits = s.prefill([list(ids)])
        prefill_s = time.perf_counter() - t0
        tokens = []
        t1 = time.perf_counter()
        for i in range(max_new):
            tok = int(logits[0].argmax())
            tokens.append(tok)
            if i + 1 < max_new:
                logits = s.step(torch.tensor([tok]))
        decode_s = time.perf_counter() - t1
    finally:
        s.close()
    return Decoded(tokens, lm.tokenizer.decode(tokens), prefill_s, decode_s, [])


def string_match_all(text: str, answers: Sequence[str]) -> float:
    """RULER's metric: the share of reference strings found in the output, case-insensitive, in points."""
    low = text.lower()
    return 100.0 * sum(a.lower() in low for a in answers) / len(answers)


def fidelity(dense: Decoded, sel: Decoded) -> tuple[list[float], list[bool]]:
    """KL(dense ‖ selected) and top-1 agreement at each step both reached with the same text."""
    kls, agree = [], []
    for i, (p, q) in enumerate(zip(dense.logprobs, sel.logprobs)):
        if i and dense.tokens[i - 1] != sel.tokens[i - 1]:
            break
        kls.append(float((p.exp() * (p - q)).sum().clamp(min=0)))
        agree.append(dense.tokens[i] == sel.tokens[i])
    return kls, agree


def evaluate(
    lm,
    kv: KVSelectConfig,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int] = (4096,),
    n: int = 1,
    seed: int = 0,
    progress: Progress | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Score dense and selected attention on ``n`` samples of each task at each length. Samples run
    round by round (every task and length, then the next depth, spread out), so an eval stopped
    early has scored every task at depths across the prompt; ``on_record`` gets each record as it is made."""
    if "kv_select" not in getattr(lm, "capabilities", ()):
        raise UserError("the longcontext task compares dense and selected attention on the torch backend; use --backend torch")
    trained = getattr(lm, "trained", None)
    if trained and not kv.extrapolate and max(lengths) > trained:
        raise UserError(f"length {max(lengths)} is past the {trained} tokens {lm.model_name} was trained to; add extrapolate=on to --kv-select")
    samples = make_samples(tasks, lengths, n, lm.tokenizer.encode, seed)
    samples = [samples[j] for j in sorted(range(len(samples)), key=lambda j: (spread(j % n), j))]
    records = []
    for i, s in enumerate(samples):
        if progress:
            progress(f"{s.task} @ {s.length}", i, len(samples))
        records.append(compare(lm, s, kv))
        if on_record is not None:
            on_record(records[-1])
    if progress:
        progress("done", len(samples), len(samples))
    return {"kv_select": kv.spec(), "model": lm.model_name, "n_per_task": n, "records": records, "summary": summarize(records)}


def spread(i: int) -> float:
    """Sample ``i``'s place in the run order: its bits reversed as a binary fraction, so the first
    samples of any run have needle depths spread across the prompt (0, 1/2, 1/4, 3/4, …)."""
    f, half = 0.0, 0.5
    while i:
        f, i, half = f + half * (i & 1), i >> 1, half / 2
    return f


def compare(lm, s: Sample, kv: KVSelectConfig) -> dict[str, Any]:
    """One sample, dense then selected: scores, timings and fidelity as a flat record."""
    ids = lm.tokenizer.encode(s.prompt)
    dense, sel = greedy_torch(lm, ids, s.max_new, [None, kv])
    kls, agree = fidelity(dense, sel)
    return {
        "task": s.task, "length": s.length, "prompt_tokens": len(ids), "depth": s.depth, "answers": s.answers,
        "dense_text": dense.text, "selected_text": sel.text,
        "dense_score": string_match_all(dense.text, s.answers), "selected_score": string_match_all(sel.text, s.answers),
        "dense_prefill_s": dense.prefill_s, "selected_prefill_s": sel.prefill_s,
        "dense_tok_s": dense.tok_s, "selected_tok_s": sel.tok_s,
        "hit_rate": sel.hit_rate, "stats": sel.stats,
        "kl": mean(kls), "top1_agreement": mean(agree), "compared_steps": len(kls),
    }


def summarize(records: Sequence[dict]) -> dict[str, Any]:
    """Per length: accuracy per task (dense, selected, points), mean timings, hit rate and fidelity."""
    out: dict[str, Any] = {}
    for length in sorted({r["length"] for r in records}):
        rs = [r for r in records if r["length"] == length]
        tasks = {}
        for t in dict.fromkeys(r["task"] for r in rs):
            tr = [r for r in rs if r["task"] == t]
            tasks[t] = {"n": len(tr), "dense": mean(r["dense_score"] for r in tr), "selected": mean(r["selected_score"] for r in tr)}
        hits = [r["hit_rate"] for r in rs if r["hit_rate"] is not None]
        out[str(length)] = {
            "tasks": tasks,
            "dense_accuracy": mean(r["dense_score"] for r in rs),
            "selected_accuracy": mean(r["selected_score"] for r in rs),
            "dense_prefill_s": mean(r["dense_prefill_s"] for r in rs),
            "selected_prefill_s": mean(r["selected_prefill_s"] for r in rs),
            "dense_tok_s": mean(r["dense_tok_s"] for r in rs),
            "selected_tok_s": mean(r["selected_tok_s"] for r in rs),
            "hit_rate": mean(hits) if hits else None,
            "top1_agreement": mean(r["top1_agreement"] for r in rs),
            "kl": mean(r["kl"] for r in rs),
        }
    return out
