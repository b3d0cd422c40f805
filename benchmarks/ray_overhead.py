"""What the Ray path costs on one machine, against the in-process path, on the bundled model.

* ``eval_ratio``: wall time of ``tokensteer.eval.run`` with ``ray=True`` (a local Ray cluster, one
  actor per CPU, each loading the model) ÷ the same run in-process (fresh caches, same seed; both
  load the model inside the run); ``eval_ratio_with_start`` adds the time to start the cluster;
  ``eval_same_texts``: both runs wrote the same samples.
* ``serve_ratio``: one streaming request's decode speed (tokens after the first, per second, as the
  client receives them; ``ignore_eos``) through ``tokensteer serve`` ÷ through
  ``tokensteer serve --ray --replica-cpus C`` (one replica with as many threads as the plain
  server uses), both running at once, requests alternating; ``serve_e2e_ratio`` the same for
  whole-request tokens per second (first token included).

    .venv/bin/python benchmarks/ray_overhead.py [--n 8] [--samples 2] [--tokens 64] [--rounds 4]
        [--serve-only] [--haproxy] [--per-token]

``--haproxy`` starts the Ray cluster with ``RAY_SERVE_ENABLE_HA_PROXY=1`` (Ray Serve's HAProxy
ingress: HTTP goes from HAProxy straight to the replica instead of through the Python proxy).
``serve --ray`` runs with its default ``--stream-interval`` (a write may carry several tokens);
``--per-token`` adds a third server, ``serve --ray --stream-interval 0`` (one write per token),
measured in the same rounds (``serve_ratio_per_token``).

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import ray

from tokensteer.eval.runner import run
from tokensteer.scale.cluster import LOCAL_OBJECT_STORE_BYTES, LOCAL_SYSTEM_CONFIG

from common import cpu_name, start_server  # noqa: E402

PROMPT = "The history of the printing press begins in"
MODEL = "gemma-3-270m"


def eval_rounds(args) -> dict:
    kw = dict(n=args.n, samples=args.samples, report=False, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run(args.task, ["none"], out=Path(tmp) / "local", **kw)
        local = time.perf_counter() - t
        t = time.perf_counter()
        ray.init(include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG)
        start = time.perf_counter() - t
        try:
            t = time.perf_counter()
            res = run(args.task, ["none"], out=Path(tmp) / "ray", ray=True, **kw)
            on_ray = time.perf_counter() - t
        finally:
            ray.shutdown()
        texts = [{json.loads(x)["key"]: json.loads(x)["text"] for x in (Path(tmp) / d / "cache" / "samples.jsonl").read_text().splitlines()}
                 for d in ("local", "ray")]
    return {"eval_local_s": round(local, 2), "eval_ray_s": round(on_ray, 2), "ray_start_s": round(start, 2),
            "eval_ratio": round(on_ray / local, 3), "eval_ratio_with_start": round((on_ray + start) / local, 3),
            "eval_same_texts": texts[0] == texts[1], "eval_ray_workers": res["ray"]["workers"]}


def one(url: str, tokens: int) -> tuple[float, float]:
    """One streaming request read with the standard library: (decode tok/s, whole-request tok/s)."""
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0.8, "seed": 1, "stream": True,
                       "ignore_eos": True}).encode()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp, times = conn.getresponse(), []
    for line in resp:
        if line.startswith(b"data: {"):
            times.append(time.perf_counter() - t0)
    conn.close()
    assert len(times) == tokens, f"{url}: {len(times)} of {tokens} tokens"
    return (len(times) - 1) / (times[-1] - times[0]), len(times) / times[-1]


#: Ray's memory monitor reads the whole machine's memory: on a shared machine other programs' use
#: would make it kill the replicas mid-run
RAY_ENV = {"RAY_memory_monitor_refresh_ms": "0"}


def serve_rounds(args) -> dict:
    cpus = len(os.sched_getaffinity(0))
    env = {**RAY_ENV, **({"RAY_SERVE_ENABLE_HA_PROXY": "1"} if args.haproxy else {})}
    plain, plain_url = start_server(["serve", "--port", "0", "--log-level", "warning"])
    on_ray, ray_url = start_server(["serve", "--ray", "--port", "0", "--replica-cpus", str(cpus), "--log-level", "warning"], env)
    servers = [("plain", plain, plain_url), ("ray", on_ray, ray_url)]
    if args.per_token:
        p, u = start_server(["serve", "--ray", "--port", "0", "--replica-cpus", str(cpus), "--log-level", "warning", "--stream-interval", "0"], env)
        servers.append(("ray_per_token", p, u))
    try:
        for _, _, url in servers:
            one(url, 8)  # warm-up
        rows = []
        for r in range(args.rounds):
            order = [(name, url) for name, _, url in servers][:: 1 if r % 2 == 0 else -1]
            got = {name: one(url, args.tokens) for name, url in order}
            rows.append(got)
            print(f"round {r}: " + ", ".join(f"{name} {v[0]:.2f} tok/s" for name, v in got.items()), flush=True)
    finally:
        for _, p, _ in servers:
            p.send_signal(signal.SIGINT)
        for _, p, _ in servers:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    med = {k: [statistics.median(r[name][k] for r in rows) for name in ("plain", "ray")] for k in (0, 1)}
    out = {"serve_plain_tok_s": round(med[0][0], 2), "serve_ray_tok_s": round(med[0][1], 2), "serve_ratio": round(med[0][0] / med[0][1], 3),
           "serve_e2e_ratio": round(med[1][0] / med[1][1], 3), "serve_rounds": [round(r["plain"][0] / r["ray"][0], 3) for r in rows],
           "replica_cpus": cpus, "haproxy": args.haproxy}
    if args.per_token:
        per = [statistics.median(r["ray_per_token"][k] for r in rows) for k in (0, 1)]
        out.update({"serve_ray_per_token_tok_s": round(per[0], 2), "serve_ratio_per_token": round(med[0][0] / per[0], 3),
                    "serve_e2e_ratio_per_token": round(med[1][0] / per[1], 3),
                    "serve_rounds_per_token": [round(r["plain"][0] / r["ray_per_token"][0], 3) for r in rows]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sentiment-positive")
    ap.add_argument("--n", type=int, default=8, help="prompts in the eval")
    ap.add_argument("--samples", type=int, default=2, help="samples per prompt in the eval")
    ap.add_argument("--tokens", type=int, default=64, help="tokens of the served request")
    ap.add_argument("--rounds", type=int, default=4, help="served requests per server")
    ap.add_argument("--serve-only", action="store_true", help="skip the eval comparison")
    ap.add_argument("--haproxy", action="store_true", help="serve --ray through Ray Serve's HAProxy ingress")
    ap.add_argument("--per-token", action="store_true", help="also serve --ray --stream-interval 0 (one write per token)")
    args = ap.parse_args()
    out = {"cpu": cpu_name(), "load_before": round(os.getloadavg()[0], 2)}
    if not args.serve_only:
        out.update(eval_rounds(args))
    out.update(serve_rounds(args))
    out["load_after"] = round(os.getloadavg()[0], 2)
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
