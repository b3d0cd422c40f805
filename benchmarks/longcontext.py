"""Long prompts on the bundled model: dense against TokenSelect attention on the torch backend, and
dense llama.cpp, at several lengths; accuracy per long-context task, dense and selected.

Speed, per length: one passkey prompt (needle at half depth), greedy, prompt + ``--new`` tokens
(EOS ignored), as torch dense and torch with --kv-select in lockstep (chunk by chunk, step by
step, so both see the same machine load), then llama.cpp dense, on the same prompt. Accuracy: every task of ``--tasks`` at ``--acc-lengths`` (``--n`` samples
each), plus the passkey prompts of the speed runs; fidelity (top-1 agreement, KL) against dense.

    .venv/bin/python benchmarks/longcontext.py [--lengths 4k,8k,16k] [--acc-lengths 4k] [--n 1]
        [--threads 1] [--kv-select on] [--no-llama]

On a shared machine, ``--threads 1`` keeps torch's and llama.cpp's thread pools from waiting on
descheduled threads. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from datetime import date
from statistics import mean

import torch


def cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4k,8k,16k")
    ap.add_argument("--acc-lengths", default="4k")
    ap.add_argument("--tasks", default="passkey,niah_single,niah_multikey,vt,cwe")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-select", default="on")
    ap.add_argument("--no-llama", action="store_true")
    args = ap.parse_args()

    os.environ["TOKENSTEER_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    import tokensteer as ts
    from tokensteer.kvselect import parse_kv_select
    from tokensteer.longcontext import evaluate, greedy_llama, greedy_torch, make_samples, string_match_all
    from tokensteer.longcontext.cli import parse_lengths
    from tokensteer.longcontext.run import fidelity

    cfg = parse_kv_select(args.kv_select)
    lengths, acc_lengths = parse_lengths(args.lengths), parse_lengths(args.acc_lengths)
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    lm = ts.load(None, backend="torch")
    llama = None if args.no_llama else ts.load(None, backend="llamacpp")
    print(f"# cpu: {cpu()}, threads {args.threads}, load average {load0:.1f}, kv-select {cfg.spec()}", flush=True)

    speed = {}
    for length in lengths:
        (s,) = make_samples(["passkey"], [length - args.new + 8], 1, lm.tokenizer.encode)  # room for --new tokens
        ids = lm.tokenizer.encode(s.prompt)
        dense, sel = greedy_torch(lm, ids, args.new, [None, cfg])  # in lockstep: the same load on both
        kls, agree = fidelity(dense, sel)
        row = {
            "prompt_tokens": len(ids),
            "torch_dense": {"prefill_s": dense.prefill_s, "tok_s": dense.tok_s, "e2e_s": dense.prefill_s + dense.decode_s,
                            "score": string_match_all(dense.text[:40], s.answers)},
            "torch_selected": {"prefill_s": sel.prefill_s, "tok_s": sel.tok_s, "e2e_s": sel.prefill_s + sel.decode_s,
                               "score": string_match_all(sel.text[:40], s.answers), "hit_rate": sel.hit_rate,
                               "top1_agreement": mean(agree), "kl": mean(kls), "compared_steps": len(kls)},
        }
        del dense, sel
        if llama is not None:
            ld = greedy_llama(llama, ids, args.new)
            row["llama_dense"] = {"prefill_s": ld.prefill_s, "tok_s": ld.tok_s, "e2e_s": ld.prefill_s + ld.decode_s,
                                  "score": string_match_all(ld.text[:40], s.answers)}
        speed[length] = row
        print(json.dumps({"length": length, **row}), flush=True)

    acc = evaluate(lm, cfg, [t.strip() for t in args.tasks.split(",") if t.strip()], acc_lengths, args.n)
    for length, row in acc["summary"].items():
        print(json.dumps({"accuracy_at": int(length), **{k: v for k, v in row.items()}}), flush=True)

    longest = max(lengths)
    top = speed[longest]
    d, s_ = top["torch_dense"], top["torch_selected"]
    dense_scores = [d["score"]] + [r["dense_score"] for r in acc["records"] if r["length"] == longest]
    sel_scores = [s_["score"]] + [r["selected_score"] for r in acc["records"] if r["length"] == longest]
    fastest = min([d["e2e_s"]] + ([top["llama_dense"]["e2e_s"]] if "llama_dense" in top else []))
    summary = {
        "longest": longest,
        "decode_speedup_longest": s_["tok_s"] / d["tok_s"],
        "prefill_speedup_longest": d["prefill_s"] / s_["prefill_s"],
        "accuracy_drop_longest": mean(dense_scores) - mean(sel_scores),
        "accuracy_samples_longest": len(dense_scores),
        "e2e_vs_fastest_dense": fastest / s_["e2e_s"],
        "hit_rate_longest": s_["hit_rate"],
        "accuracy": {k: v["tasks"] for k, v in acc["summary"].items()},
        "speed": {str(k): v for k, v in speed.items()},
        "kv_select": cfg.spec(), "threads": args.threads, "cpu": cpu(), "date": date.today().isoformat(),
        "load_average": [round(load0, 1), round(os.getloadavg()[0], 1)], "seconds": round(time.perf_counter() - t_start),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
