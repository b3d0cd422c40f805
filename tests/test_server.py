"""`tokensteer serve` on the tiny random model, through the official openai client and raw HTTP:
completions, chat, streaming, logprobs, n, the tokensteer controls, auth, metrics, cancellation."""

from __future__ import annotations

import json
import re
import socket
import time

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

import tokensteer as ts
from tokensteer.controls import RequestControls, build_controls
from tokensteer.engine import engine_for
from tokensteer.server import Settings, create_app
from tokensteer.server.chat import PLAIN_STOP, chat_prompt
from tokensteer.steering import save_vector, train_vector
from tokensteer.steering.pairs import Pair, PairSet

from server_helpers import LiveServer, fields_of, sse_frames

PROMPT = "the cat sat on"


@pytest.fixture(scope="module")
def vectors(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vectors")
    pairs = PairSet("toy", (Pair("good great happy kind", "bad awful sad rude"), Pair("a happy day", "a sad day"),
                            Pair("the kind dog", "the rude dog"), Pair("hello good world", "hello bad world")), "test")
    save_vector(train_vector(tiny, pairs, "diffmean", layers=[1]), folder / "kind.safetensors")
    return folder


@pytest.fixture(scope="module")
def live(tiny, vectors):
    server = LiveServer(create_app(tiny, Settings(vectors=str(vectors)), engine=engine_for(tiny)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return live.client()


def api(tiny, prompt, controls=(), **kw):
    return ts.generate(tiny, prompt, controls=controls, **kw)


def test_models_and_health(live, client, tiny):
    assert [m.id for m in client.models.list().data] == [tiny.model_name]
    assert client.models.retrieve(tiny.model_name).id == tiny.model_name
    status, body = live.get("/health")
    assert status == 200 and body["status"] == "ok"


def test_completion_is_the_python_api_text_and_openai_shaped(live, client, tiny):
    r = client.completions.create(model=tiny.model_name, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=7)
    g = api(tiny, PROMPT, max_tokens=10, temperature=1.0, seed=7)
    assert r.choices[0].text == g.text
    assert r.choices[0].finish_reason == ("length" if g.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == g.prompt_tokens and r.usage.completion_tokens == len(g.tokens)
    status, raw = live.post("/v1/completions", {"model": tiny.model_name, "prompt": PROMPT, "max_tokens": 4, "logprobs": 2})
    assert status == 200 and fields_of(raw, Completion) == []


def test_logprobs_follow_openai_shapes(client, tiny):
    r = client.completions.create(model=tiny.model_name, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the chosen token is the best
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    c = client.chat.completions.create(model=tiny.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 2 and bytes(e.bytes).decode("utf-8", "replace") == e.token


def test_stream_gives_the_same_text_and_ends_with_done(live, client, tiny):
    body = {"model": tiny.model_name, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.2, "seed": 3}
    full = client.completions.create(**body)
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    status, raw = live.post("/v1/completions", {**body, "stream": True})
    frames = sse_frames(raw)
    assert status == 200 and frames[-1] == "[DONE]"
    assert all(fields_of(json.loads(f), Completion) == [] for f in frames[:-1])


def test_n_choices_use_the_cli_seed_first(client, tiny):
    r = client.completions.create(model=tiny.model_name, prompt=PROMPT, max_tokens=12, temperature=2.0, seed=11, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.choices[0].text == api(tiny, PROMPT, max_tokens=12, temperature=2.0, seed=11).text
    assert len({c.text for c in r.choices}) > 1
    two = client.completions.create(model=tiny.model_name, prompt=[PROMPT, "a quick brown"], max_tokens=8, temperature=2.0, seed=5, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    alone = client.completions.create(model=tiny.model_name, prompt="a quick brown", max_tokens=8, temperature=2.0, seed=5)
    assert two.choices[2].text == alone.choices[0].text


def test_chat_plain_template_stream_and_shapes(live, client, tiny):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    prompt, stops = chat_prompt(tiny, msgs)
    assert prompt == "System: be brief\nUser: hello\nAssistant:" and stops == (PLAIN_STOP,)
    full = client.chat.completions.create(model=tiny.model_name, messages=msgs, max_tokens=10, seed=2)
    g = api(tiny, prompt, max_tokens=10, temperature=1.0, seed=2, stop=[PLAIN_STOP])
    assert full.choices[0].message.content == g.text.lstrip() and full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=tiny.model_name, messages=msgs, max_tokens=10, seed=2, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    status, raw = live.post("/v1/chat/completions", {"model": tiny.model_name, "messages": msgs, "max_tokens": 3, "logprobs": True, "top_logprobs": 1})
    assert status == 200 and fields_of(raw, ChatCompletion) == []
    status, raw = live.post("/v1/chat/completions", {"model": tiny.model_name, "messages": msgs, "max_tokens": 3, "stream": True})
    assert all(fields_of(json.loads(f), ChatCompletionChunk) == [] for f in sse_frames(raw)[:-1])


def test_chat_uses_the_tokenizers_template_when_it_has_one(tiny):
    hf = tiny.tokenizer.hf
    before = hf.chat_template
    hf.chat_template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    try:
        assert chat_prompt(tiny, [{"role": "user", "content": "hi"}]) == ("<user>hi<assistant>", ())
    finally:
        hf.chat_template = before


def test_formula_with_trace_matches_the_api(client, tiny):
    formula = 'M + 2*(M("good happy ") - M("bad sad "))'
    r = client.completions.create(model=tiny.model_name, prompt=PROMPT, max_tokens=8, temperature=0.9, seed=4,
                                  extra_body={"tokensteer": {"formula": formula, "trace": True}})
    g = api(tiny, PROMPT, build_controls(tiny, RequestControls(formula=formula, trace=True)), max_tokens=8, temperature=0.9, seed=4)
    assert r.choices[0].text == g.text
    trace = r.choices[0].model_extra["tokensteer"]["trace"]
    assert [t["token"] for t in trace] == g.tokens
    assert [t["term"] for t in trace[0]["terms"]] == ["M", 'M("good happy ")', 'M("bad sad ")']
    plain = client.completions.create(model=tiny.model_name, prompt=PROMPT, max_tokens=8, temperature=0.9, seed=4)
    assert plain.choices[0].text == api(tiny, PROMPT, max_tokens=8, temperature=0.9, seed=4).text


def test_streamed_trace_rides_on_each_token(client, tiny):
    chunks = list(client.completions.create(model=tiny.model_name, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1, stream=True,
                                            extra_body={"tokensteer": {"formula": "M + M(\"good \")", "trace": True}}))
    traced = [c.choices[0].model_extra["tokensteer"]["trace"] for c in chunks if c.choices and c.choices[0].logprobs]
    assert len(traced) == 5 and all(len(t["terms"]) == 2 for t in traced)


def test_regex_constraint(client, tiny):
    r = client.completions.create(model=tiny.model_name, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=1,
                                  extra_body={"tokensteer": {"constraints": {"regex": "[ab]{3}"}}})
    assert re.fullmatch("[ab]{3}", r.choices[0].text)


def test_json_schema_response_format_is_valid_json(client, tiny):
    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}}, "required": ["ok", "n"],
              "additionalProperties": False}
    r = client.chat.completions.create(model=tiny.model_name, messages=[{"role": "user", "content": "json please"}], max_tokens=40, seed=0,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_steering_vector_by_name_matches_the_cli_spec(client, tiny, vectors):
    body = dict(model=tiny.model_name, prompt=PROMPT, max_tokens=8, temperature=0)
    steered = client.completions.create(**body, extra_body={"tokensteer": {"steer": [{"vector": "kind", "strength": 0.8, "layers": [1]}]}})
    spec = f"{vectors / 'kind.safetensors'}:0.8:layers=1"
    g = api(tiny, PROMPT, build_controls(tiny, RequestControls(steer=[spec])), max_tokens=8, temperature=0)
    assert steered.choices[0].text == g.text
    assert steered.choices[0].text != client.completions.create(**body).choices[0].text


def test_api_key_guards_v1_routes(tiny):
    server = LiveServer(create_app(tiny, Settings(api_key="s3cret"), engine=engine_for(tiny)))
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            server.client(api_key="wrong").models.list()
        assert e.value.body["code"] == "invalid_api_key"
        status, body = server.post("/v1/completions", {"model": tiny.model_name, "prompt": "x"})
        assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
        assert server.post("/tokenize", {"prompt": "x"})[0] == 401
        assert server.client(api_key="s3cret").completions.create(model=tiny.model_name, prompt=PROMPT, max_tokens=2).choices
        assert server.get("/health")[0] == 200 and server.get("/metrics")[0] == 200
    finally:
        server.stop()


def test_tokenize_round_trip(live, tiny):
    status, body = live.post("/tokenize", {"prompt": PROMPT, "return_token_strs": True})
    assert status == 200 and body["tokens"] == tiny.tokenizer.encode(PROMPT) and body["count"] == len(body["tokens"])
    status, back = live.post("/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == PROMPT


def test_metrics_count_requests_tokens_and_ttft(live, client, tiny):
    client.completions.create(model=tiny.model_name, prompt=PROMPT, max_tokens=3)
    status, text = live.get("/metrics")
    assert status == 200
    assert re.search(r'tokensteer_requests_total\{route="/v1/completions",status="200"\} [1-9]', text)
    assert re.search(r'tokensteer_tokens_total\{kind="completion"\} [1-9]', text)
    assert re.search(r"tokensteer_time_to_first_token_seconds_count [1-9]", text)
    for gauge in ("tokensteer_batch_rows", "tokensteer_requests_waiting", "tokensteer_requests_running"):
        assert re.search(rf"^{gauge} \d", text, re.M)


def wait_idle(engine, timeout=10.0) -> dict:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        s = engine.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["rows"] == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(f"the engine still runs: {engine.stats()}")


def test_client_that_hangs_up_cancels_its_stream(live, client, tiny):
    eng = live.ctx.engine
    before = eng.stats().get("tokens", 0)
    stream = client.completions.create(model=tiny.model_name, prompt=PROMPT, max_tokens=500, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    after = wait_idle(eng)
    assert after.get("tokens", 0) - before < 500
    assert live.ctx.gate.active == 0
    assert client.completions.create(model=tiny.model_name, prompt=PROMPT, max_tokens=2).choices


def test_client_that_hangs_up_cancels_a_plain_request(live, tiny):
    eng = live.ctx.engine
    before = eng.stats().get("tokens", 0)
    body = json.dumps({"model": tiny.model_name, "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", live.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    t = time.monotonic()
    while eng.stats()["running"] == 0 and time.monotonic() - t < 10:
        time.sleep(0.02)
    s.close()
    after = wait_idle(eng)
    assert after.get("tokens", 0) - before < 500


def test_byte_level_through_the_server(client, tiny):
    """``"byte_level": true`` samples byte by byte: the same text as ts.generate(byte_level=True)."""
    kw = dict(max_tokens=6, temperature=1.0, seed=5)
    want = ts.generate(tiny, "the ca", byte_level=True, **kw).text
    got = client.completions.create(model=tiny.model_name, prompt="the ca", extra_body={"tokensteer": {"byte_level": True}}, **kw)
    assert got.choices[0].text == want
    with pytest.raises(openai.BadRequestError, match="logprobs are per token"):
        client.completions.create(model=tiny.model_name, prompt="the ca", logprobs=2, extra_body={"tokensteer": {"byte_level": True}}, **kw)
