"""The eval framework: method registry, tasks, a tiny end-to-end run with cache and report, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import tokensteer.eval.runner as runner
from tokensteer.cli import app
from tokensteer.errors import UserError
from tokensteer.eval import Item, Method, get_task, make_method, register, run
from tokensteer.eval.methods import read_spec
from toy_controls import BanToken
from tokensteer.hooks import Control
from tokensteer.sampling import SamplingConfig

CFG = dict(batch_size=4)


class BanMethod(Method):
    def __init__(self, arg):
        super().__init__("ban")
        self.arg = arg
        self._controls = None

    def controls(self, lm, task, item):
        if self._controls is None:
            self._controls = [BanToken(int(self.arg))]
        return self._controls


register("bantest", lambda arg: BanMethod(arg or "0"))


def test_eval_registry_builds_methods():
    assert type(make_method("none")).__name__ == "NoControl"
    m = make_method("prompt")
    task = get_task("sentiment-negative")
    assert m.prompt(task, Item("The bus")) == "The following is a very negative review.\n\nThe bus"
    assert make_method("none").prompt(task, Item("The bus")) == "The bus"
    assert make_method("bantest:7").name == "bantest:7" and make_method("bantest:7").arg == "7"
    with pytest.raises(UserError, match="unknown method"):
        make_method("nosuch")
    with pytest.raises(UserError, match="takes no argument"):
        make_method("none:x")


def test_eval_plugin_kinds_fail_clearly_or_load():
    for kind in ("formula", "steer", "constraints"):
        try:
            m = make_method(f"{kind}:x")
        except UserError as e:
            assert kind in str(e) or "x" in str(e)  # not installed yet, or the plug-in rejects the arg
        else:
            assert isinstance(m, Method)


def test_eval_read_spec(tmp_path):
    (tmp_path / "s.yaml").write_text("words: 5\nend: sea\n")
    (tmp_path / "s.json").write_text('{"words": 5}')
    assert read_spec(str(tmp_path / "s.yaml")) == {"words": 5, "end": "sea"}
    assert read_spec(str(tmp_path / "s.json")) == {"words": 5}
    assert read_spec("positive") == "positive"
    with pytest.raises(UserError, match="does not exist"):
        read_spec(str(tmp_path / "missing.yaml"))


def test_eval_user_prompt_files(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("The shop\nThe lake\n")
    assert [i.prompt for i in get_task("detox").items(plain)] == ["The shop", "The lake"]
    with pytest.raises(UserError, match="lacks words, end_word"):
        get_task("count").items(plain)
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"prompt": "The", "words": "five", "end_word": "sea"}\n')
    with pytest.raises(UserError, match="positive integer"):
        get_task("count").items(bad)
    with pytest.raises(UserError, match="does not exist"):
        get_task("count").items(tmp_path / "nope.jsonl")


def test_eval_end_to_end_tiny(tiny, tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kw = dict(n=3, samples=2, out=out, lm=tiny, model=str(tiny_dir), **CFG)
    run("sentiment-positive", ["none"], **kw)
    first = [json.loads(line) for line in (out / "cache" / "samples.jsonl").read_text().splitlines()]
    ids = [t for s in first for t in s["token_ids"]]
    banned = max(set(ids), key=ids.count)  # the token the plain model uses most
    methods = ["none", "prompt", f"bantest:{banned}"]
    res = run("sentiment-positive", methods, **kw)
    assert set(res["methods"]) == set(methods)
    for m in res["methods"].values():
        assert m["n"] == 6 and 0.0 <= m["success_rate"] <= 1.0
        for key in ("perplexity", "distinct_2", "tok_s", "calls_per_token", "sentiment"):
            assert m[key] is not None
    assert json.loads((out / "results.json").read_text()) == res
    samples = [json.loads(line) for line in (out / "cache" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 18 and len({s["seed"] for s in samples}) == 18
    assert [s for s in samples if s["method"] == "none"] == first  # reused, not regenerated
    assert all(banned not in s["token_ids"] for s in samples if s["method"] == methods[2])
    html = (out / "report.html").read_text()
    assert all(name in html for name in res["methods"]) and "data:image/png;base64," in html
    assert (out / "success_vs_perplexity.png").stat().st_size > 1000

    # re-running (re-scoring) never regenerates: generation would raise
    def no_generation(*a, **k):
        raise AssertionError("regenerated a cached sample")

    monkeypatch.setattr(runner, "_generate", no_generation)
    again = run("sentiment-positive", methods, **kw)
    assert {k: v["success_rate"] for k, v in again["methods"].items()} == {k: v["success_rate"] for k, v in res["methods"].items()}


def test_eval_seeds_are_deterministic(tiny, tiny_dir, tmp_path):
    a = run("count", ["none"], n=4, out=tmp_path / "a", lm=tiny, model=str(tiny_dir), report=False, **CFG)
    b = run("count", ["none"], n=4, out=tmp_path / "b", lm=tiny, model=str(tiny_dir), report=False, **CFG)
    ta = (tmp_path / "a" / "cache" / "scored-count.jsonl").read_text()
    assert ta == (tmp_path / "b" / "cache" / "scored-count.jsonl").read_text()
    assert a["methods"]["none"]["success_rate"] == b["methods"]["none"]["success_rate"]
    c = run("count", ["none"], n=4, out=tmp_path / "c", lm=tiny, model=str(tiny_dir), report=False, seed=7, **CFG)
    assert (tmp_path / "c" / "cache" / "scored-count.jsonl").read_text() != ta
    assert c["task"] == "count"


def test_eval_sample_text_does_not_depend_on_the_other_methods(tiny, tiny_dir, tmp_path):
    """A method's batches are its own, so each `none` sample's text is the same whether or not another
    method (`prompt`, also without controls) is in the run (the cache key promises it)."""
    kw = dict(n=3, samples=2, lm=tiny, model=str(tiny_dir), report=False, batch_size=4,
              sampling=SamplingConfig(max_tokens=10, temperature=1.5))
    run("count", ["none"], out=tmp_path / "a", **kw)
    run("count", ["prompt", "none"], out=tmp_path / "b", **kw)

    def texts(folder):
        recs = [json.loads(line) for line in (folder / "cache" / "samples.jsonl").read_text().splitlines()]
        return {(r["item"], r["k"]): r["text"] for r in recs if r["method"] == "none"}

    a, b = texts(tmp_path / "a"), texts(tmp_path / "b")
    assert len(a) == 6 and a == b


def test_units_run_in_batches_of_one_method_and_control_list():
    from tokensteer.eval.generation import Unit, plan_batches

    units = [Unit(m, i, 0, None, "p", i, f"{m}{i}") for i in range(3) for m in ("none", "formula")]
    shared = [object()]  # one control list (stateful) shared by every unit of "formula"
    batches = plan_batches(units, lambda u: [] if u.method == "none" else shared, batch_size=2)
    got = [(b.method, [u.index for u in b.units]) for b in batches]
    assert got == [("none", [0, 1]), ("formula", [0, 1]), ("none", [2]), ("formula", [2])]


def test_eval_every_task_runs_on_tiny(tiny, tiny_dir, tmp_path):
    for task in ("sentiment-negative", "detox", "topic", "keywords"):
        res = run(task, ["none", "prompt"], n=2, samples=2, out=tmp_path / task, lm=tiny, model=str(tiny_dir), report=False, **CFG)
        assert res["methods"]["prompt"]["n"] == 4
    assert {"expected_max_toxicity", "toxicity_probability"} <= set(json.loads((tmp_path / "detox" / "results.json").read_text())["methods"]["none"])


def test_eval_sweep_and_dose_response(tiny, tiny_dir, tmp_path):
    register("temp", lambda arg: _Temp(arg))
    res = run("sentiment-positive", ["none", "temp:{strength}"], n=2, sweep="strength=0,5", out=tmp_path, lm=tiny, model=str(tiny_dir), **CFG)
    assert list(res["methods"]) == ["none", "temp:0", "temp:5"]
    assert res["sweep"]["series"] == {"temp:{strength}": [["0", "temp:0"], ["5", "temp:5"]]}
    assert (tmp_path / "dose_response.png").is_file()
    with pytest.raises(UserError, match="no method has a parameter"):
        run("sentiment-positive", ["none"], n=1, sweep="strength=1,2", out=tmp_path / "x", lm=tiny)
    with pytest.raises(UserError, match="--sweep must look like"):
        run("sentiment-positive", ["none"], n=1, sweep="strength", out=tmp_path / "x", lm=tiny)


class _Scale(Control):
    stages = frozenset({"rewrite"})

    def __init__(self, s: float) -> None:
        self.s = s

    def logprobs(self, state, lp):
        return torch.log_softmax(lp * (1 + self.s), dim=-1)


class _Temp(Method):
    def __init__(self, arg):
        super().__init__("temp")
        self.c = [_Scale(float(arg))]

    def controls(self, lm, task, item):
        return self.c


def test_eval_cli_on_tiny(tiny_dir, tmp_path):
    r = CliRunner().invoke(
        app, ["eval", "--task", "keywords", "-m", "none", "-m", "prompt", "--n", "2", "--model", str(tiny_dir), "--backend", "torch", "--out", str(tmp_path)]
    )
    assert r.exit_code == 0, r.output
    assert set(json.loads((tmp_path / "results.json").read_text())["methods"]) == {"none", "prompt"}
    bad = CliRunner().invoke(app, ["eval", "--task", "nosuch", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown task" in bad.output
    listing = CliRunner().invoke(app, ["eval", "--list"])
    assert listing.exit_code == 0 and "detox" in listing.output and "steer" in listing.output


def test_eval_workers_split_the_work(tiny_dir, tmp_path):
    res = run("count", ["none"], n=4, out=tmp_path, model=str(tiny_dir), backend="torch", workers=2, batch_size=2, report=False)
    recs = [json.loads(line) for line in (tmp_path / "cache" / "samples.jsonl").read_text().splitlines()]
    assert res["methods"]["none"]["n"] == 4 and len(recs) == 4


# ---- regressions found by fuzzing (session 7) ---------------------------------------------------

def test_eval_prompt_files_with_bom_and_unicode_line_separators(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\ufeffThe weather\r\nA day\n", encoding="utf-8")
    assert [it.prompt for it in get_task("sentiment-positive").items(f)] == ["The weather", "A day"]
    g = tmp_path / "c.jsonl"  # a BOM must not turn the first JSONL line into a plain-text prompt
    g.write_text("\ufeff" + json.dumps({"prompt": "The sea\u2028was", "words": 3, "end_word": "calm"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (it,) = get_task("count").items(g)
    assert it.prompt == "The sea\u2028was" and it.fields == {"words": 3, "end_word": "calm"}


def test_eval_cache_keeps_texts_with_unicode_line_separators(tmp_path):
    from tokensteer.eval.cache import SampleCache

    c = SampleCache(tmp_path)
    for i, text in enumerate(["a\u2028b", "c\x85d", "e\u2029f"]):
        c.put({"key": str(i), "text": text, "seconds": 0.1, "tokens": 2, "steps": 2, "calls": 3})
    c.save()
    assert {k: r["text"] for k, r in SampleCache(tmp_path).records.items()} == {"0": "a\u2028b", "1": "c\x85d", "2": "e\u2029f"}


def test_eval_summary_with_a_metric_only_some_items_have():
    rows_a = [{"item": 0, "k": 0, "success": True, "words": 3, "sentences_ok": 1.0}, {"item": 1, "k": 0, "success": False, "words": 2}]
    for rows in (rows_a, rows_a[::-1]):  # whichever item comes first
        out = get_task("count").summarize(rows)
        assert out["sentences_ok"] == 1.0 and out["words"] == 2.5 and out["success_rate"] == 0.5


def test_eval_dose_response_plot_with_non_numeric_sweep_values(tmp_path):
    from tokensteer.eval.report import plot_dose_response

    m = {"success_rate": 0.5, "perplexity": 3.0}
    results = {"task": "t", "methods": {"formula:M": m, "formula:M*2": m},
               "sweep": {"param": "f", "values": ["M", "M*2"], "series": {"formula:{f}": [["M", "formula:M"], ["M*2", "formula:M*2"]]}}}
    assert plot_dose_response(results, tmp_path / "d.png").stat().st_size > 1000


def test_eval_damaged_cache_records_are_regenerated_not_fatal(tiny, tiny_dir, tmp_path):
    kw = dict(n=2, lm=tiny, model=str(tiny_dir), report=False, **CFG)
    good = run("count", ["none"], out=tmp_path, **kw)
    path = tmp_path / "cache" / "samples.jsonl"
    lines = path.read_text().split("\n")
    rec = json.loads(lines[0])
    for bad in ({k: v for k, v in rec.items() if k != "text"}, rec | {"text": 5}, rec | {"key": [1]},
                rec | {"seconds": "x"}, rec | {"perplexity": "x"}):
        path.write_text("\n".join([json.dumps(bad)] + lines[1:]))
        again = run("count", ["none"], out=tmp_path, **kw)["methods"]["none"]
        assert {k: v for k, v in again.items() if k != "tok_s"} == {k: v for k, v in good["methods"]["none"].items() if k != "tok_s"}
    path.write_bytes(b"\xff\xfe garbage\n" + "\n".join(lines[1:]).encode())
    assert run("count", ["none"], out=tmp_path, **kw)["methods"]["none"]["n"] == 2


@pytest.mark.model
def test_eval_reads_the_uncontrolled_samples_perplexity_off_their_generation(tmp_path, monkeypatch):
    """Samples the uncontrolled model generated on their item's own prompt get their perplexity
    from the log-probabilities their tokens were drawn with, the number the scorer gives each text
    alone; only the others (here the prompt method's) are scored again."""
    import tokensteer as ts
    from tokensteer.eval import scorers

    lm = ts.load(None, backend="llamacpp")
    scored: list[str] = []
    real = scorers.perplexity
    monkeypatch.setattr(scorers, "perplexity", lambda m, ps, texts, bs=16: scored.extend(ps) or real(m, ps, texts, bs))
    try:
        run("sentiment-positive", ["none", "prompt"], n=4, samples=1, out=tmp_path / "r", lm=lm, report=False)
        samples = [json.loads(line) for line in (tmp_path / "r" / "cache" / "samples.jsonl").read_text().splitlines()]
        assert all(s["perplexity"] is not None for s in samples if s["text"])
        none = [s for s in samples if s["method"] == "none"]
        if not lm.generation_scores:  # llama.cpp's own kernels: every sample is scored
            assert len(scored) == 8
            return
        assert 4 <= len(scored) <= 5  # the prompt method's four; a none text that does not re-tokenize to itself is rare
        assert [s["perplexity"] for s in none] == pytest.approx([real(lm, [s["prompt"]], [s["text"]])[0] for s in none], rel=1e-4)
    finally:
        lm.close()
