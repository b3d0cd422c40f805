"""REPLUG retrieval mixtures: accuracy on questions about made-up things, and cost per token.

Accuracy (greedy, exact first word, the qa-dev and qa-test tasks' scoring): no documents; the
passage most similar to the question pasted before it (top-1); REPLUG ``R(k=K)`` for each K. Also
the retrieval's recall (the question's own document among the K passages). Cost: median decode
seconds per token of plain decoding and of each configuration, interleaved round after round on
one question, generating a fixed number of tokens; the figure is their ratio. ``R(k=K)`` alone
reads only its passage rows, so the prompt's own row is not decoded at all (K rows); ``k4-unfused``
times the same formula with every row (1 + K) through the blocks and the output layer, and
``k4-every8`` re-retrieves every 8 tokens (a side session of K rows beside the prompt's row, and a
new prefill whenever the passages change). Beside each cost, the time to the first token (query
embedding, search and prefill of the passage rows) against plain decoding's, and the engine
thread's CPU seconds per token against plain's (with ``TOKENSTEER_THREADS=1 --torch-threads 1``
every step runs on that thread, so this ratio holds on a loaded machine where wall time does not). ``--formulas`` adds formulas with R terms
(by default ``R(k=4) - 0.2*M``, the mixture pushed away from the model without documents, and
``R(k=4) - 0.7*R(k=4, tau=10)``, pushed away from the same passages mixed evenly, which needs no
extra row), measured the same way. Target: k=4 ≥ 85 % at ≤ 1.6× plain decoding's cost per token. The last line is one
JSON object.

    .venv/bin/python benchmarks/replug.py [--splits dev,test] [--ks 1,2,4,8] [--rounds 3] [--tau T]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import tokensteer as ts
from tokensteer.eval.tasks import get_task
from tokensteer.formula.ast import Retrieve
from tokensteer.formula.engine import FormulaControl
from tokensteer.hooks import Control
from tokensteer.retrieval import open_store
from tokensteer.retrieval.term import with_passage
from tokensteer.sampling import SamplingConfig

BATCH = 8  # questions per batched generation (k = 8 gives 64 rows)
EVERY = 8  # tokens between re-retrievals in the cost table's re-retrieving configuration


def answers(lm, prompts: list[str], controls, max_tokens: int) -> list[str]:
    cfg = SamplingConfig(max_tokens=max_tokens, temperature=0.0, stop=("\n",))
    out = []
    for s in range(0, len(prompts), BATCH):
        out += [g.text for g in ts.generate(lm, prompts[s : s + BATCH], cfg, controls)]
    return out


def accuracy(lm, split: str, ks: list[int], tau: float, formulas: list[str], max_tokens: int, n: int | None) -> dict:
    task = get_task(f"qa-{split}")
    items = task.items(n=n)
    store = open_store(task.docs)
    prompts = [it.prompt for it in items]
    hits = store.search(prompts, max(ks))
    gold = [it.fields.get("doc") for it in items]
    res: dict = {"questions": len(items)}

    def score(name: str, texts: list[str]) -> None:
        ok = [r["success"] for r in task.score(items, texts)]
        res[name] = sum(ok) / len(ok)
        wrong = [(it.fields["answer"], t.strip()[:40]) for it, t, good in zip(items, texts, ok) if not good]
        print(f"  {split} {name:>8}: {res[name]:.3f}  wrong e.g. {wrong[:4]}", flush=True)

    score("none", answers(lm, prompts, [], max_tokens))
    score("top1", answers(lm, [with_passage(h[0].chunk.text, p) for h, p in zip(hits, prompts)], [], max_tokens))
    for k in ks:
        res[f"recall@{k}"] = sum(g in [x.chunk.doc for x in h[:k]] for g, h in zip(gold, hits)) / len(items)
        score(f"k{k}", answers(lm, prompts, [FormulaControl(lm, Retrieve(k, tau), docs=store)], max_tokens))
    for f in formulas:
        score(f, answers(lm, prompts, [FormulaControl(lm, f, docs=store)], max_tokens))
    return res


class StepClock(Control):
    """Reads the engine thread's CPU clock at every accepted token: with one llama.cpp thread and
    one torch thread, all of a step's work runs there, so CPU seconds per token do not depend on
    what else the machine runs."""

    stages = frozenset({"accept"})

    def start(self, state) -> None:
        self.marks: list[float] = []

    def on_token(self, state, tokens) -> None:
        self.marks.append(time.thread_time())


def per_token(lm, prompt: str, controls, tokens: int) -> tuple[float, float, float]:
    """(decode seconds per token after the first, seconds to the first token: retrieval + prefill,
    the engine thread's CPU seconds per token after the first)."""
    clock = StepClock()
    g = ts.generate(lm, prompt, max_tokens=tokens, ignore_eos=True, controls=[*controls, clock])
    cpu = (clock.marks[-1] - clock.marks[0]) / (len(clock.marks) - 1)
    return g.decode_s / (len(g.tokens) - 1), g.prefill_s, cpu


def cost(lm, ks: list[int], tau: float, formulas: list[str], rounds: int, tokens: int) -> dict:
    task = get_task("qa-dev")
    prompt = task.items(n=1)[0].prompt
    store = open_store(task.docs)
    configs = {"plain": (prompt, []), "top1": (task.instruction(task.items(n=1)[0]) + prompt, [])}
    for k in ks:
        configs[f"k{k}"] = (prompt, [FormulaControl(lm, Retrieve(k, tau), docs=store)])
    if 4 in ks:
        configs["k4-unfused"] = (prompt, [FormulaControl(lm, Retrieve(4, tau), docs=store, fuse=False)])
        configs[f"k4-every{EVERY}"] = (prompt, [FormulaControl(lm, Retrieve(4, tau, EVERY), docs=store)])
    for f in formulas:
        configs[f] = (prompt, [FormulaControl(lm, f, docs=store)])
    for p, c in configs.values():  # warm-up: contexts, kernels, the query embedding
        per_token(lm, p, c, 4)
    times: dict[str, list[float]] = {name: [] for name in configs}
    firsts: dict[str, list[float]] = {name: [] for name in configs}
    cpus: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(rounds):
        for name, (p, c) in configs.items():
            t, first, cpu = per_token(lm, p, c, tokens)
            times[name].append(t)
            firsts[name].append(first)
            cpus[name].append(cpu)
        print(f"  round {r + 1}: " + ", ".join(f"{n} {t[-1] * 1e3:.1f} ms (CPU {cpus[n][-1] * 1e3:.1f}; {firsts[n][-1] * 1e3:.0f} ms first)"
                                               for n, t in times.items()), flush=True)
    plain, plain_first, plain_cpu = (statistics.median(x["plain"]) for x in (times, firsts, cpus))
    out = {"plain_ms_per_token": round(plain * 1e3, 2), "plain_ms_first_token": round(plain_first * 1e3, 1),
           "plain_cpu_ms_per_token": round(plain_cpu * 1e3, 2)}
    for name, t in times.items():
        if name != "plain":
            out[f"cost_{name}"] = round(statistics.median(t) / plain, 3)
            out[f"cpu_cost_{name}"] = round(statistics.median(cpus[name]) / plain_cpu, 3)
            out[f"first_token_{name}"] = round(statistics.median(firsts[name]) / plain_first, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--splits", default="dev,test")
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--tau", type=float, default=Retrieve.tau)
    ap.add_argument("--formulas", default="R(k=4) - 0.2*M;R(k=4) - 0.7*R(k=4, tau=10)", help="';'-separated formulas with R terms to measure too")
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument("--n", type=int, default=None, help="only the first N questions of each split")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per cost measurement")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch's intra-op threads (the mixture's arithmetic)")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    formulas = [f.strip() for f in args.formulas.split(";") if f.strip()]
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    t0 = time.perf_counter()
    lm = ts.load(None, backend=args.backend)
    result: dict = {"backend": lm.name, "tau": args.tau}
    for split in [s for s in args.splits.split(",") if s]:
        print(f"accuracy, {split}:", flush=True)
        result[split] = accuracy(lm, split, ks, args.tau, formulas, args.max_tokens, args.n)
    if args.rounds:
        print("cost per token:", flush=True)
        result.update(cost(lm, ks, args.tau, formulas, args.rounds, args.tokens))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
