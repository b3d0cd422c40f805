"""`tokensteer eval --ray` and `tokensteer serve --ray` on a local Ray cluster the tests start
(4 logical CPUs on whatever cores there are, a small object store, no dashboard): the Ray run
writes what the in-process run writes; a dead eval worker's units run elsewhere and the run says
so; the Ray Serve deployment answers the openai client as `tokensteer serve` does, and keeps
answering when one of its two replicas is killed."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import ray
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

import tokensteer as ts
from tokensteer.cli import app
from tokensteer.errors import UserError
from tokensteer.eval.runner import run
from tokensteer.scale.cluster import connected
from tokensteer.scale.eval import ACTOR_PREFIX, RERUN_STAGE, pack
from tokensteer.scale.serve import APP_NAME, ReplicaConfig, deployment_options, parse_autoscale
from tokensteer.server import Settings
from tokensteer.steering import save_vector, train_vector
from tokensteer.steering.pairs import Pair, PairSet

PROMPT = "the cat sat on"
EVAL = dict(n=4, samples=3, backend="torch", batch_size=2, report=False, seed=5)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20, namespace="tokensteer", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def vector(tiny, tmp_path_factory):
    """A steering vector file, so one method of the eval runs with controls (its own batches)."""
    path = tmp_path_factory.mktemp("vec") / "kind.safetensors"
    pairs = PairSet("toy", (Pair("good great happy kind", "bad awful sad rude"), Pair("a happy day", "a sad day")), "test")
    save_vector(train_vector(tiny, pairs, "diffmean", layers=[1]), path)
    return path


@pytest.fixture(scope="module")
def methods(vector):
    return ["none", f"steer:{vector}@4"]


@pytest.fixture(scope="module")
def in_process(tiny_dir, methods, tmp_path_factory):
    """The reference: the same evaluation run in this process."""
    out = tmp_path_factory.mktemp("eval-local")
    res = run("count", methods, out=out, model=str(tiny_dir), **EVAL)
    return out, res


def texts(out: Path) -> dict[str, str]:
    recs = [json.loads(line) for line in (out / "cache" / "samples.jsonl").read_text().splitlines()]
    return {r["key"]: r["text"] for r in recs}


PPL = ("perplexity", "perplexity_median")


def same_results(a: dict, b: dict) -> bool:
    """Equal but for timings (and the Ray report); perplexities up to rounding: each sample's is read
    off its generation, whose float sums depend on the threads of the process that generated it."""
    def strip(r):
        return {k: ({m: {x: y for x, y in v.items() if x not in ("tok_s", *PPL)} for m, v in r[k].items()} if k == "methods" else r[k])
                for k in r if k not in ("seconds", "date", "ray")}
    ppl = [[v[x] for v in r["methods"].values() for x in PPL] for r in (a, b)]
    return strip(a) == strip(b) and close(*ppl)


def same_scores(a: Path, b: Path) -> bool:
    """The same scored records (``same_results``' rounding allowed in perplexities)."""
    recs = [[json.loads(line) for line in (out / "cache" / "scored-count.jsonl").read_text().splitlines()] for out in (a, b)]
    ppl = [[r.pop("perplexity") for r in rs] for rs in recs]
    return recs[0] == recs[1] and close(*ppl)


def close(xs: list, ys: list) -> bool:
    """Equal lists of numbers or None, numbers up to a relative 1e-5."""
    return len(xs) == len(ys) and all(x == y if x is None or y is None else math.isclose(x, y, rel_tol=1e-5) for x, y in zip(xs, ys))


# ---- eval -----------------------------------------------------------------------------------

def test_eval_ray_cli_writes_what_the_in_process_run_writes(cluster, tiny_dir, methods, in_process, tmp_path):
    ref_out, ref = in_process
    args = ["eval", "--task", "count", "--n", "4", "--samples", "3", "--seed", "5", "--batch-size", "2", "--backend", "torch",
            "--model", str(tiny_dir), "--out", str(tmp_path), "--no-report", "--ray", "--address", cluster, "--workers", "2"]
    for m in methods:
        args += ["--method", m]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["ray"]["workers"] == 2 and res["ray"]["workers_died"] == 0 and res["ray"]["units_rerun"] == 0
    assert texts(tmp_path) == texts(ref_out) and len(texts(tmp_path)) == 24
    assert same_scores(tmp_path, ref_out)
    assert same_results(res, ref)


def test_eval_ray_reruns_the_units_of_a_worker_that_dies(cluster, tiny_dir, methods, in_process, tmp_path):
    ref_out, ref = in_process
    seen: list[tuple[str, int, int]] = []

    def progress(stage: str, done: int, total: int) -> None:
        seen.append((stage, done, total))
        if stage == "generating" and done > 0 and not any(s == "killed" for s, _, _ in seen):
            victim = sorted(n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX))[0]
            ray.kill(ray.get_actor(victim))  # the worker process ends at once, mid-job
            seen.append(("killed", 0, 0))

    res = run("count", methods, out=tmp_path, model=str(tiny_dir), ray=True, workers=2, progress=progress, **EVAL)
    assert res["ray"]["workers_died"] == 1 and res["ray"]["units_rerun"] > 0
    reruns = [(d, t) for s, d, t in seen if s == RERUN_STAGE]
    assert reruns and reruns[-1] == (res["ray"]["units_rerun"],) * 2  # the run said so, and finished them
    assert texts(tmp_path) == texts(ref_out)
    assert same_results(res, ref)
    assert not [n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]  # workers gone after the run


def test_ray_options_without_ray_are_user_errors(tiny_dir):
    r = CliRunner().invoke(app, ["eval", "--task", "count", "--address", "127.0.0.1:1"])
    assert r.exit_code == 2 and "--address needs --ray" in r.output
    r = CliRunner().invoke(app, ["serve", "--replicas", "2", "--port", "0"])
    assert r.exit_code == 2 and "need --ray" in r.output
    r = CliRunner().invoke(app, ["serve", "--ray", "--replicas", "2", "--autoscale", "1,2", "--port", "0"])
    assert r.exit_code == 2 and "not both" in r.output


def test_a_cluster_the_command_starts_runs_its_workers_at_normal_priority(monkeypatch):
    """Ray starts workers at nice 15, where any other work on the machine starves the replicas."""
    seen: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with connected() as owned:
        assert owned
    assert seen["address"] == "local" and seen["_system_config"]["worker_niceness"] == 0
    seen.clear()
    with connected("10.0.0.1:6379"):
        pass
    assert seen["address"] == "10.0.0.1:6379" and "_system_config" not in seen  # a joined cluster keeps its own settings


@given(st.integers(-3, 6), st.integers(-3, 6))
def test_autoscale_spec_parses_or_is_one_user_error(lo, hi):
    try:
        got = parse_autoscale(f"{lo}, {hi}")
    except UserError:
        assert lo < 0 or hi < max(1, lo)
    else:
        assert got == (lo, hi) and 0 <= lo <= hi and hi >= 1


def test_pack_keeps_controlled_batches_whole_and_gives_every_worker_a_job():
    from tokensteer.eval.generation import Batch, Unit

    def unit(i):
        return Unit("m", i, 0, None, "p", i, str(i))

    ctl = [object()]
    batches = [Batch("none", [unit(i)]) for i in range(5)] + [Batch("steer", [unit(5), unit(6)], ctl)]
    jobs = pack(batches, batch_size=16, workers=2)
    assert [[[u.index for u in b.units] for b in j.batches] for j in jobs] == [[[5, 6]], [[0, 1, 2]], [[3, 4]]]
    assert all(not b.controls for j in jobs for b in j.batches)  # rebuilt on the worker from the method spec
    assert [j.units for j in pack(batches, batch_size=2, workers=1)] == [2, 2, 2, 1]
    # one full batch of plain units (what the eval plans) is cut so that both workers get half
    whole = [Batch("none", [unit(i) for i in range(16)]), Batch("prompt", [unit(16), unit(17)])]
    assert [[(b.method, len(b.units)) for b in j.batches] for j in pack(whole, batch_size=16, workers=2)] == [
        [("none", 9)], [("none", 7), ("prompt", 2)]]


def test_deployment_options_fixed_or_autoscaled():
    cfg = ReplicaConfig(None, "torch", "float32", Settings(max_batch_rows=8), cpus=2)
    fixed = deployment_options(cfg, 3, None)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2}
    assert fixed["max_ongoing_requests"] == fixed["max_queued_requests"] == cfg.settings.limits.max_concurrent
    auto = deployment_options(cfg, None, (0, 4))["autoscaling_config"]
    assert auto == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1, "target_ongoing_requests": 8}


# ---- serve ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(cluster, tiny_dir, tmp_path_factory):
    """`tokensteer serve --ray` with 2 replicas of the tiny model, joining the tests' cluster."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    exe = Path(sys.executable).with_name("tokensteer")
    cmd = [str(exe), "serve", "--ray", "--address", cluster, "--replicas", "2", "--model", str(tiny_dir), "--backend", "torch",
           "--port", str(port), "--log-level", "warning"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    t = time.monotonic()
    while True:
        assert proc.poll() is None, f"serve --ray exited: {log.read_text()[-3000:]}"
        assert time.monotonic() - t < 240, f"serve --ray did not come up: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(1)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_serve_ray_answers_the_openai_client_as_serve_does(served, tiny):
    c = client(served)
    assert [m.id for m in c.models.list().data] == [tiny.model_name]
    r = c.completions.create(model=tiny.model_name, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=7)
    assert r.choices[0].text == ts.generate(tiny, PROMPT, max_tokens=10, temperature=1.0, seed=7).text
    chunks = list(c.completions.create(model=tiny.model_name, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=7, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    chat = c.chat.completions.create(model=tiny.model_name, messages=[{"role": "user", "content": "hello"}], max_tokens=5, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    with urllib.request.urlopen(served + "/", timeout=30) as page:  # the playground too
        assert b"<html" in page.read().lower()


def replicas() -> list[str]:
    return sorted(n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                  if n["namespace"] == "serve" and "REPLICA" in n["name"].upper() and APP_NAME in n["name"])


def test_serve_ray_keeps_answering_when_a_replica_dies(served, tiny):
    """Requests stream one after another (one client: two at once would share a batch, which is
    not what this tests) while one of the two replicas is killed."""
    names = replicas()
    assert len(names) == 2, names
    c = client(served)
    log: list[tuple[float, bool]] = []
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            try:
                chunks = list(c.completions.create(model=tiny.model_name, prompt=PROMPT, max_tokens=60, temperature=1.0, stream=True))
                log.append((time.monotonic(), chunks[-1].choices[0].finish_reason is not None))
            except openai.APIError:  # a stream cut by the replica's death, or a request that reached it as it died
                log.append((time.monotonic(), False))

    th = threading.Thread(target=stream)
    th.start()
    try:
        while sum(ok for _, ok in log) < 3:
            time.sleep(0.02)
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        killed = time.monotonic()
        while sum(ok for t, ok in log if t > killed) < 8 and time.monotonic() - killed < 90:
            time.sleep(0.05)
    finally:
        stop.set()
        th.join(90)
    after = [ok for t, ok in log if t > killed]
    assert sum(after) >= 8, log  # the service went on answering
    assert after.count(False) <= 1, log  # at most the request in flight on the killed replica failed
    assert after[-1], log
