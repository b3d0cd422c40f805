"""Byte-level against token-level decoding on prompts that end inside a word (issue #21).

Each sentence of benchmarks/data/bytes_sentences.txt is cut at a random point inside one of its
words (seeded; never the first word, at least one letter left). Figures:

* exact-match completion of the cut word: greedy decoding, the letters it writes first must be
  the rest of the word (byte-level: ``tokensteer.bytes``; token-level: the engine on the same
  prompt, whose tokenizer ends the prompt with a partial-word token);
* mean log-probability of the rest of the word: byte-level (exact, every tokenization) against
  token-level (the prompt's tokens, then the rest's own tokens: what a tokenized model scores);
* speed: byte-level bytes/s and forward passes per byte while decoding, against token-level
  tokens/s on the same prompts, interleaved.

Targets: greedy byte-level completes ≥ 90 % of cut words; ≤ 4 forward passes per byte.

    .venv/bin/python benchmarks/bytes.py [--n 40] [--seed 0] [--backend torch] [--speed-prompts 3] [--speed-bytes 32]

The last line is one JSON object. Both decoders run in a fresh worker thread, as the engine
decodes (on a busy machine torch runs a thread that loaded the model differently).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path

import torch

import tokensteer as ts
from tokensteer.bytes import ByteState, generate_bytes
from tokensteer.bytes.utf8 import END, next_byte_mask, tail_state

SENTENCES = Path(__file__).parent / "data" / "bytes_sentences.txt"


def cut_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt ending inside a word, the rest of that word) pairs."""
    rng = random.Random(seed)
    lines = [s for s in SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()]
    out = []
    for i in range(n):
        s = lines[i % len(lines)]
        words = [m for m in re.finditer(r"[A-Za-z]+", s) if m.start() > 0 and len(m.group()) >= 3]
        m = rng.choice(words)
        k = rng.randint(1, len(m.group()) - 1)
        out.append((s[: m.start() + k], m.group()[k:]))
    return out


def leading_word(text: str) -> str:
    return re.match(r"[A-Za-z]*", text).group()


def token_logprob(lm, prompt: str, rest: str) -> float:
    """log P(rest's own tokens | the prompt's tokens), teacher-forced in one session."""
    ids_p, ids_r = lm.tokenizer.encode(prompt), lm.tokenizer.encode(rest, add_bos=False)
    sess = lm.session()
    try:
        first = torch.log_softmax(sess.prefill([ids_p]).float(), -1)[0]
        total = float(first[ids_r[0]])
        if len(ids_r) > 1:
            lps = torch.log_softmax(sess.extend(torch.tensor([ids_r[:-1]])).float(), -1)[0]
            total += sum(float(lps[i, ids_r[i + 1]]) for i in range(len(ids_r) - 1))
        return total
    finally:
        sess.close()


def byte_logprob(lm, prompt: str, rest: str) -> float:
    st = ByteState(lm, prompt)
    try:
        total = 0.0
        for b in rest.encode("utf-8"):
            total += float(st.logprobs()[b])
            st.push(b)
        return total
    finally:
        st.close()


def in_thread(fn, *args):
    """Run ``fn`` in a worker thread, as the engine runs its decoding (torch's intra-op threads
    behave differently in the main thread, so both sides of the comparison run in one)."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    t.join()
    return out[0]


def byte_speed(lm, prompt: str, n_bytes: int) -> tuple[float, float]:
    """Greedy byte-level decoding of ``n_bytes`` (END masked): (bytes/s, forward passes per byte)."""
    st = ByteState(lm, prompt)
    try:
        f0, pending = st.forwards, b""
        t = time.perf_counter()
        for _ in range(n_bytes):
            mask = next_byte_mask(pending).clone()
            mask[END] = False
            b = int(st.logprobs().float().masked_fill(~mask, float("-inf")).argmax())
            st.push(b)
            pending = b"" if tail_state(pending + bytes([b])) == 0 else pending + bytes([b])
        st.logprobs()
        dt = time.perf_counter() - t
        return n_bytes / dt, (st.forwards - f0) / n_bytes
    finally:
        st.close()


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--speed-prompts", type=int, default=3)
    ap.add_argument("--speed-bytes", type=int, default=32)
    args = ap.parse_args()
    lm = ts.load(None, backend=args.backend)
    t0 = time.perf_counter()
    rows = in_thread(quality, lm, args)
    quality_s = time.perf_counter() - t0
    byte_s, fpb, tok_s, bpt = [], [], [], []
    for prompt, _ in cut_prompts(args.speed_prompts, args.seed + 1):
        bs, fp = in_thread(byte_speed, lm, prompt, args.speed_bytes)
        g = ts.generate(lm, prompt, max_tokens=args.speed_bytes // 4 + 1, ignore_eos=True)
        byte_s.append(bs)
        fpb.append(fp)
        tok_s.append(g.tok_s)
        bpt.append(len(g.text.encode("utf-8")) / max(1, len(g.tokens)))
    n = len(rows)
    result = {
        "n_prompts": n,
        "byte_exact_match": sum(r["byte_word"] == r["rest"] for r in rows) / n,
        "token_exact_match": sum(r["token_word"] == r["rest"] for r in rows) / n,
        "byte_mean_logprob": statistics.fmean(r["byte_logprob"] for r in rows),
        "token_mean_logprob": statistics.fmean(r["token_logprob"] for r in rows),
        "bytes_s": statistics.median(byte_s),
        "forward_passes_per_byte": statistics.median(fpb),
        "token_tok_s": statistics.median(tok_s),
        "token_bytes_per_token": statistics.median(bpt),
        # per round: token-level text speed (tok/s × bytes per token) ÷ byte-level bytes/s
        "byte_slowdown": statistics.median(t * b / s for t, b, s in zip(tok_s, bpt, byte_s)),
        "target_exact_match": 0.9,
        "target_forward_passes_per_byte": 4,
        "backend": lm.name,
        "cpu": cpu_name(),
        "quality_s": round(quality_s, 1),
    }
    result["met"] = result["byte_exact_match"] >= 0.9 and result["forward_passes_per_byte"] <= 4
    print(json.dumps(result))


def quality(lm, args) -> list[dict]:
    """Completion and log-probability of every cut word, one JSON line each."""
    rows = []
    for prompt, rest in cut_prompts(args.n, args.seed):
        g = generate_bytes(lm, prompt, max_tokens=len(rest) + 1)
        tok = ts.generate(lm, prompt, max_tokens=4)
        row = {
            "prompt": prompt, "rest": rest,
            "byte_word": leading_word(g.text), "token_word": leading_word(tok.text),
            "byte_logprob": byte_logprob(lm, prompt, rest), "token_logprob": token_logprob(lm, prompt, rest),
        }
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    return rows


if __name__ == "__main__":
    main()
