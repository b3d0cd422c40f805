"""`tokensteer serve` under load, through the official openai client (streaming), on the bundled model.

The server runs as a subprocess (`tokensteer serve --port 0`, llama.cpp, ``TOKENSTEER_THREADS``
threads, 2 by default); the Python API baseline loads the same model in this process. In
interleaved rounds:

* ``throughput_8_vs_1``: 8 streaming clients at once against the same 8 requests one after
  another, aggregate generated tokens per second;
* ``ttft_p50_ms`` / ``ttft_p95_ms``: from sending a request to its first token, under that load;
* ``http_overhead``: one streaming request's decode speed (tokens after the first, per second,
  as the client receives them) through the server ÷ the same request through ``tokensteer.stream``,
  read with the standard library's HTTP client; ``http_overhead_openai_client`` reads it with the
  openai package instead (its per-chunk parsing runs on the same CPU as the model);
  ``http_overhead_best``: the fastest server run ÷ the fastest API run (each side's least
  disturbed run, as ``timeit`` takes the minimum: on a shared machine the median mixes in other
  work's load);
* ``same_text_under_load``: a seeded sampled request gives the same text alone and as one of 8;
* ``failed``: requests that raised or came back short.

    .venv/bin/python benchmarks/server.py [--tokens 48] [--single-tokens 128] [--rounds 3] [--single-pairs 2] [--stream-interval S]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import sys
import threading
import time

os.environ.setdefault("TOKENSTEER_THREADS", "2")

import openai  # noqa: E402

import tokensteer as ts  # noqa: E402
from tokensteer.server.cli import STREAM_INTERVAL_S  # noqa: E402
from common import PROMPTS, cpu_name, start_server  # noqa: E402

MODEL = "gemma-3-270m"


def one(client: openai.OpenAI, prompt: str, tokens: int, seed: int) -> dict:
    """One streaming completion: text, token count, time to first token, first and last token times."""
    t0 = time.perf_counter()
    times, text = [], []
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=tokens, temperature=0.8, seed=seed, stream=True,
                                       logprobs=0, extra_body={"ignore_eos": True})
    for chunk in stream:
        for c in chunk.choices:
            if c.logprobs and c.logprobs.tokens:
                times.append(time.perf_counter() - t0)
            text.append(c.text)
    return {"text": "".join(text), "n": len(times), "ttft": times[0] if times else None, "first": times[0] if times else 0, "last": times[-1] if times else 0}


def raw(url: str, prompt: str, tokens: int, seed: int) -> float:
    """One streaming completion read with the standard library's HTTP client (no SDK parsing): decode tok/s as received."""
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0.8, "seed": seed, "stream": True,
                       "ignore_eos": True}).encode()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp, times, t0 = conn.getresponse(), [], time.perf_counter()
    for line in resp:
        if line.startswith(b"data: {"):
            times.append(time.perf_counter() - t0)
    conn.close()
    return (len(times) - 1) / (times[-1] - times[0])


def together(clients: list[openai.OpenAI], reqs: list[tuple[str, int]], tokens: int) -> tuple[float, list[dict], int]:
    """Send every request at once, one client thread each; wall time, results, failures."""
    out: list = [None] * len(reqs)
    failed = [0]

    def work(i: int, prompt: str, seed: int) -> None:
        try:
            out[i] = one(clients[i], prompt, tokens, seed)
        except Exception as e:  # noqa: BLE001 - counted, and shown
            print(f"request {i} failed: {e}", flush=True)
            failed[0] += 1

    threads = [threading.Thread(target=work, args=(i, p, s)) for i, (p, s) in enumerate(reqs)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t0, out, failed[0]


def api_decode_speed(lm, prompt: str, tokens: int) -> float:
    cfg = ts.SamplingConfig(max_tokens=tokens, temperature=0.8, seed=0, ignore_eos=True)
    t0 = time.perf_counter()
    times = [time.perf_counter() - t0 for _ in ts.stream(lm, prompt, cfg)]
    return (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48, help="tokens per request in the load rounds")
    ap.add_argument("--single-tokens", type=int, default=128, help="tokens of the single request for http_overhead")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--single-pairs", type=int, default=2, help="single-request pairs (server, API) per round")
    ap.add_argument("--stream-interval", type=float, default=None, help="the server's --stream-interval (default: serve's own)")
    args = ap.parse_args()

    extra = [] if args.stream_interval is None else ["--stream-interval", str(args.stream_interval)]
    proc, url = start_server(["serve", "--port", "0", "--log-level", "warning", *extra])
    try:
        lm = ts.load(None, backend="llamacpp")
        clients = [openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) for _ in PROMPTS]
        client = clients[0]
        one(client, PROMPTS[0], 4, 0)  # warm-up: first forward passes, tokenizer tables
        api_decode_speed(lm, PROMPTS[0], 4)
        ratios, ttfts, overheads, sdk_overheads, failed, n_requests, same = [], [], [], [], 0, 0, []
        speeds: dict[str, list[float]] = {"server": [], "api": []}
        reqs = [(p, 100 + i) for i, p in enumerate(PROMPTS)]
        for r in range(args.rounds):
            wall8, res8, f8 = together(clients, reqs, args.tokens)
            seq = []
            t0 = time.perf_counter()
            for p, s in reqs:
                try:
                    seq.append(one(client, p, args.tokens, s))
                except Exception as e:  # noqa: BLE001
                    print(f"sequential request failed: {e}", flush=True)
                    failed += 1
            wall1 = time.perf_counter() - t0
            short = sum(1 for x in res8 + seq if x is not None and x["n"] != args.tokens)
            failed += f8 + short
            n_requests += 2 * len(reqs)
            n8 = sum(x["n"] for x in res8 if x)
            n1 = sum(x["n"] for x in seq)
            ratios.append((n8 / wall8) / (n1 / wall1))
            ttfts += [x["ttft"] * 1000 for x in res8 if x and x["ttft"] is not None]
            same.append([a["text"] for a in res8 if a] == [b["text"] for b in seq])  # seeded: alone == under load
            print(f"round {r}: 8 at once {n8 / wall8:.1f} tok/s, one at a time {n1 / wall1:.1f} tok/s, ratio {ratios[-1]:.2f}; "
                  f"same text alone and under load: {same[-1]}", flush=True)

            for k in range(args.single_pairs):  # the order alternates, so neither side always runs first
                api_first = (r + k) % 2 == 0
                direct = api_decode_speed(lm, PROMPTS[0], args.single_tokens) if api_first else 0.0
                served = raw(url, PROMPTS[0], args.single_tokens, 0)
                single = one(client, PROMPTS[0], args.single_tokens, 0)
                sdk = (single["n"] - 1) / (single["last"] - single["first"])
                if not api_first:
                    direct = api_decode_speed(lm, PROMPTS[0], args.single_tokens)
                overheads.append(served / direct)
                speeds["server"].append(served)
                speeds["api"].append(direct)
                sdk_overheads.append(sdk / direct)
                print(f"single request: server {served:.1f} tok/s (openai client {sdk:.1f}), Python API {direct:.1f} tok/s, "
                      f"ratio {overheads[-1]:.3f} ({sdk_overheads[-1]:.3f})", flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)

    out = {
        "failed": failed,
        "requests": n_requests,
        "throughput_8_vs_1": round(statistics.median(ratios), 3),
        "throughput_rounds": [round(x, 3) for x in ratios],
        "ttft_p50_ms": round(statistics.median(ttfts), 1),
        "ttft_p95_ms": round(sorted(ttfts)[int(0.95 * (len(ttfts) - 1))], 1),
        "http_overhead": round(statistics.median(overheads), 3),
        "http_overhead_rounds": [round(x, 3) for x in overheads],
        "http_overhead_openai_client": round(statistics.median(sdk_overheads), 3),
        "http_overhead_best": round(max(speeds["server"]) / max(speeds["api"]), 3),
        "same_text_under_load": all(same),
        "tokens": args.tokens,
        "stream_interval": STREAM_INTERVAL_S if args.stream_interval is None else args.stream_interval,
        "backend": "llamacpp",
        "threads": int(os.environ["TOKENSTEER_THREADS"]),
        "cpu": cpu_name(),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "python": sys.version.split()[0],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
