"""Bad requests to `tokensteer serve`: each is a 4xx with OpenAI's error object, nothing a client
sends makes the server read a path, a 5xx never carries a traceback, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokensteer.engine import TokenEvent, engine_for
from tokensteer.errors import UserError
from tokensteer.server import Limits, Settings, create_app
from tokensteer.server.errors import APIError
from tokensteer.server.routes.common import stream
from tokensteer.server.schemas import CompletionRequest, parse

from server_helpers import LiveServer, sse_frames

LIMITS = Limits(max_body_bytes=64_000, max_prompt_tokens=64, max_tokens=200, max_n=4, max_formula_chars=200, max_formula_rows=2, max_concurrent=8)


@pytest.fixture(scope="module")
def live(tiny, tmp_path_factory):
    vectors = tmp_path_factory.mktemp("vectors")
    server = LiveServer(create_app(tiny, Settings(vectors=str(vectors), limits=LIMITS), engine=engine_for(tiny)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def good(tiny):
    return {"model": tiny.model_name, "prompt": "the cat", "max_tokens": 3}


def refused(live, body, status=400, path="/v1/completions") -> dict:
    """POST ``body``; check the status and the error object's shape, and that the server still serves."""
    got, resp = live.post(path, body)
    assert got == status, resp
    err = resp["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "\n" not in err["message"] and "Traceback" not in err["message"]
    return err


@pytest.fixture(autouse=True)
def still_serving(request, live, good):
    yield
    status, body = live.post("/v1/completions", good)
    assert status == 200 and body["choices"][0]["text"] is not None


@pytest.mark.parametrize("raw, code", [(b"{not json", "invalid_json"), (b"", "invalid_json"), (b"[1, 2]", "invalid_json"),
                                       (b"\xff\xfe", "invalid_json"), (b"[" * 100_00 + b"]" * 100_00, "invalid_json")])
def test_malformed_bodies(live, raw, code):
    got, resp = live.post("/v1/completions", raw)
    assert got == 400 and resp["error"]["code"] == code


@pytest.mark.parametrize("patch, param", [
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"n": True}, "n"),
    ({"prompt": 42}, "prompt"),
    ({"stop": [1]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"tokensteer": {"formula": "M", "bogus": 1}}, "tokensteer.bogus"),
    ({"tokensteer": {"constraints": {"words": "seven"}}}, "tokensteer.constraints.words"),
    ({"tokensteer": {"constraints": {"grammar": "/etc/passwd"}}}, "tokensteer.constraints.grammar"),
    ({"tokensteer": {"constraints": {"json_schema": "/etc/passwd"}}}, "tokensteer.constraints.json_schema"),
    ({"tokensteer": {"constraints": {"vocab": "/etc/passwd"}}}, "tokensteer.constraints.vocab"),
    ({"tokensteer": {"steer": [{"vector": "x", "strength": "lots"}]}}, "tokensteer.steer.0.strength"),
])
def test_wrong_types_and_unknown_fields(live, good, patch, param):
    assert refused(live, {**good, **patch})["param"] == param


def test_missing_fields(live, good):
    assert refused(live, {"model": good["model"]})["param"] == "prompt"
    assert refused(live, {"model": good["model"], "messages": []}, path="/v1/chat/completions")["param"] == "messages"


@pytest.mark.parametrize("vector", ["../kind", "/etc/passwd", "..", "kind/../../x", "~/.ssh/id_rsa", "nope"])
def test_vector_names_never_become_paths(live, good, vector):
    err = refused(live, {**good, "tokensteer": {"steer": [{"vector": vector}]}})
    assert err["code"] == "unknown_vector" and err["param"] == "tokensteer.steer.0.vector"


@pytest.mark.parametrize("formula, code", [
    ('M + M(model="/etc")', "unsupported_formula"),
    ("R(k=2)", "unsupported_formula"),
    ("M + " * 60 + "M", "formula_too_large"),
    ('M + M("a") + M("b") + M("c")', "formula_too_large"),
    ("M + (", None),
    ("M - 2*M", None),
])
def test_formula_mistakes(live, good, formula, code):
    err = refused(live, {**good, "tokensteer": {"formula": formula}})
    assert err["code"] == code and err["param"] in ("tokensteer.formula", None)


def test_constraint_mistakes(live, good):
    assert "banned" in refused(live, {**good, "tokensteer": {"constraints": {"ban": ["cat"], "require": ["cat"]}}})["message"]
    assert refused(live, {**good, "tokensteer": {"trace": True}})["param"] == "tokensteer.trace"
    schema = {"type": "object"}
    body = {"model": good["model"], "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
            "tokensteer": {"constraints": {"json_schema": schema}}}
    assert refused(live, body, path="/v1/chat/completions")["param"] == "response_format"


def test_limits(live, good, tiny):
    assert refused(live, {**good, "n": 1000})["code"] == "too_many_choices"
    assert refused(live, {**good, "prompt": ["a", "b", "c"], "n": 2})["code"] == "too_many_choices"
    assert refused(live, {**good, "max_tokens": 10_000})["code"] == "max_tokens_too_large"
    assert refused(live, {**good, "prompt": "the cat " * 200})["code"] == "context_length_exceeded"
    assert refused(live, {**good, "prompt": "x" * 70_000}, status=413)["code"] == "body_too_large"
    assert refused(live, {**good, "max_tokens": -1})["param"] == "max_tokens"
    assert refused(live, {**good, "temperature": -1})["message"].startswith("temperature must be")


def test_unsupported_openai_fields(live, good):
    assert refused(live, {**good, "echo": True})["param"] == "echo"
    assert refused(live, {**good, "logit_bias": {"1": 5}})["param"] == "logit_bias"
    assert refused(live, {**good, "presence_penalty": 0.5})["param"] == "presence_penalty"
    chat = {"model": good["model"], "messages": [{"role": "user", "content": "x"}]}
    assert refused(live, {**chat, "tools": [{"type": "function"}]}, path="/v1/chat/completions")["code"] == "unsupported_parameter"
    assert refused(live, {**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, path="/v1/chat/completions")


def test_model_routes_and_methods(live, good):
    assert refused(live, {**good, "model": "gpt-4"}, status=404)["code"] == "model_not_found"
    got, body = live.get("/v2/nothing")
    assert got == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    got, body = live.get("/v1/completions")
    assert got == 405 and body["error"]["message"]
    assert refused(live, {"tokens": [10**9]}, path="/detokenize")["param"] == "tokens"


def test_openai_client_raises_bad_request(live, good):
    with pytest.raises(openai.BadRequestError) as e:
        live.client().completions.create(model=good["model"], prompt="x", n=1000)
    assert e.value.body["code"] == "too_many_choices"


def test_server_error_has_no_traceback(live, good, monkeypatch):
    import tokensteer.server.run as run

    def boom(*a, **k):
        raise RuntimeError("secret internals at /srv/app.py line 3")

    monkeypatch.setattr(run, "build", boom)
    got, body = live.post("/v1/completions", good)
    assert got == 500 and body["error"]["type"] == "server_error"
    assert "secret" not in json.dumps(body) and "Traceback" not in json.dumps(body)


def test_busy_server_answers_429(tiny, good):
    server = LiveServer(create_app(tiny, Settings(limits=Limits(max_concurrent=1)), engine=engine_for(tiny)))
    try:
        client = server.client()
        long = client.completions.create(model=good["model"], prompt="the cat", max_tokens=400, stream=True, extra_body={"ignore_eos": True})
        next(iter(long))
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(**good)
        assert e.value.body["code"] == "too_many_requests"
        long.close()
    finally:
        server.stop()


class FakeJob:
    """A job whose events fail after one token: what a request that breaks mid-stream looks like."""

    def __init__(self, error: BaseException) -> None:
        self.error, self.closed = error, False

    async def events(self):
        yield TokenEvent(0, 5, "hi", -0.1)
        raise self.error

    async def batches(self):
        async for ev in self.events():
            yield [ev]

    def record(self, ev):
        return None

    def close(self):
        self.closed = True


@pytest.mark.parametrize("error, kind", [(UserError("the constraint cannot finish"), "invalid_request_error"), (RuntimeError("internal detail"), "server_error")])
def test_error_mid_stream_is_a_data_frame_then_done(error, kind):
    job = FakeJob(error)

    async def frames():
        return [f async for f in stream(job, [], lambda ev, tr: {"text": ev.text}, None)]

    out = sse_frames(b"".join(asyncio.run(frames())).decode())
    assert json.loads(out[0]) == {"text": "hi"}
    err = json.loads(out[1])["error"]
    assert err["type"] == kind and "internal detail" not in err["message"]
    assert out[-1] == "[DONE]" and job.closed


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
FIELDS = st.sampled_from(["model", "prompt", "max_tokens", "temperature", "n", "stop", "seed", "logprobs", "stream", "tokensteer", "top_k"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(FIELDS, JSONISH, max_size=6))
def test_any_json_object_parses_or_gives_one_400(body):
    try:
        parse(CompletionRequest, body)
    except APIError as e:
        assert e.status == 400 and e.message and "\n" not in e.message
