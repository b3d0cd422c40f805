"""TokenSelect in the server: ``serve --kv-select`` and a per-request ``tokensteer.kv_select``, on the
tiny random model through the openai client; checked as the CLI checks ``--kv-select``."""

from __future__ import annotations

import openai
import pytest
from typer.testing import CliRunner

import tokensteer as ts
from tokensteer.cli import app
from tokensteer.errors import UserError
from tokensteer.kvselect import parse_kv_select
from tokensteer.server import Settings, create_app
from tokensteer.server import kvselect as server_kv
from tokensteer.server.errors import APIError

from server_helpers import LiveServer

WORDS = "the cat sat on the mat and the dog ran to the park a quick brown fox jumps over the lazy dog ".split()
PROMPT = " ".join(WORDS[i % len(WORDS)] for i in range(150))
SPEC = "k=4,local=4,init=1,chunk=32,theta=0"  # a budget far below the prompt: selection changes the text


def reference(tiny_dir, spec: str | None) -> list[float]:
    """The chosen tokens' log-probabilities from the Python API (the random model's text repeats
    one word either way; its probabilities show which attention ran)."""
    lm = ts.load(str(tiny_dir), backend="torch", kv_select=spec)
    return ts.generate(lm, PROMPT, max_tokens=8, temperature=0, ignore_eos=True).logprobs


@pytest.fixture(scope="module")
def texts(tiny_dir) -> dict:
    return {"dense": reference(tiny_dir, None), "selected": reference(tiny_dir, SPEC)}


def complete(client, model: str, **extra):
    body = {"ignore_eos": True, **({"tokensteer": extra} if extra else {})}
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1, extra_body=body)
    return pytest.approx(r.choices[0].logprobs.token_logprobs, abs=1e-5)


def test_per_request_kv_select_matches_the_python_api(tiny_dir, texts):
    assert pytest.approx(texts["dense"], abs=1e-3) != texts["selected"]  # else the comparisons below could not fail
    lm = ts.load(str(tiny_dir), backend="torch")
    server = LiveServer(create_app(lm, Settings()))
    try:
        client = server.client()
        assert complete(client, lm.model_name) == texts["dense"]
        assert complete(client, lm.model_name, kv_select=SPEC) == texts["selected"]
        as_object = {"k": 4, "local": 4, "init": 1, "chunk": 32, "theta": 0.0}
        assert complete(client, lm.model_name, kv_select=as_object) == texts["selected"]
        assert complete(client, lm.model_name, kv_select=False) == texts["dense"]
        assert lm.kv_select is None  # a request's setting never changes the server's
        msgs = [{"role": "user", "content": PROMPT}]
        chat = client.chat.completions.create(model=lm.model_name, messages=msgs, max_tokens=4, extra_body={"tokensteer": {"kv_select": SPEC}})
        assert chat.choices[0].message.content is not None
        for bad, said in (("k=0", "k must be ≥ 1"), ("size=3", "unknown kv-select setting"), ({"k": "8"}, "kv_select")):
            with pytest.raises(openai.BadRequestError, match=said) as e:
                complete(client, lm.model_name, kv_select=bad)
            assert e.value.body["param"].startswith("tokensteer.kv_select")
    finally:
        server.stop()


def test_server_setting_is_the_default_and_off_turns_it_off(tiny_dir, texts):
    lm = ts.load(str(tiny_dir), backend="torch")
    server = LiveServer(create_app(lm, Settings(kv_select=parse_kv_select(SPEC))))
    try:
        client = server.client()
        assert lm.kv_select == parse_kv_select(SPEC)
        assert complete(client, lm.model_name) == texts["selected"]
        assert complete(client, lm.model_name, kv_select="off") == texts["dense"]
        assert complete(client, lm.model_name, kv_select=SPEC) == texts["selected"]
    finally:
        server.stop()


class NoSelect:
    """A loaded model whose backend cannot select KV entries (as llama.cpp)."""

    name, model_name, capabilities = "llamacpp", "m", frozenset()


def test_backends_without_kv_select_refuse_it():
    with pytest.raises(APIError, match="start it with --backend torch") as e:
        server_kv.request_setting("on", NoSelect())
    assert e.value.status == 400
    assert server_kv.request_setting("off", NoSelect()) is None
    with pytest.raises(UserError, match="torch backend only"):
        server_kv.server_setting(NoSelect(), parse_kv_select("on"))


def test_settings_beyond_the_limit_reuse_idle_engines_and_refuse_busy_ones(tiny_dir, monkeypatch):
    monkeypatch.setattr(server_kv, "MAX_SETTINGS", 1)
    lm = ts.load(str(tiny_dir), backend="torch")
    from tokensteer.engine import Engine

    engines = server_kv.Engines(lm, Engine(lm), 8, 8)
    try:
        first = engines.get("k=8")
        assert engines.get("k=8") is first and engines.get("off") is engines.default  # the server's own setting
        with first.hold():
            handle = first.submit([PROMPT], ts.SamplingConfig(max_tokens=2))
            with pytest.raises(APIError, match="kv_select settings are running") as e:
                engines.get("k=16")
            assert e.value.status == 429
        handle.result()
        second = engines.get("k=16")  # the first is idle now: closed to make room
        assert second is not first and engines.get("k=8") is not first
    finally:
        engines.close()
        engines.default.close()


runner = CliRunner()


def test_serve_checks_kv_select_before_loading():
    r = runner.invoke(app, ["serve", "--backend", "llamacpp", "--kv-select"])
    assert r.exit_code == 2 and "torch backend only" in r.output
    r = runner.invoke(app, ["serve", "--kv-select", "k=0", "--port", "0"])
    assert r.exit_code == 2 and "k must be ≥ 1" in r.output and "Traceback" not in r.output
