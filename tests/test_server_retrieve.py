"""`tokensteer serve --stores DIR` and the ``retrieve`` field of the ``tokensteer`` object, through the
openai client: REPLUG over a store named from the server's folder gives the Python API's text, a
formula's R terms read the named store, and every mistake is a 400 naming a store, never a path."""

from __future__ import annotations

import json

import openai
import pytest
from typer.testing import CliRunner

import tokensteer as ts
from tokensteer.cli import app as cli_app
from tokensteer.controls import RequestControls, build_controls
from tokensteer.engine import engine_for
from tokensteer.server import Limits, Settings, create_app

from server_helpers import LiveServer

PASSAGES = ["the cat sat on the mat", "a quick brown fox jumps", "one two three four five", "good great happy kind"]
PROMPT = "the dog ran to the"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    (root / "kb.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(PASSAGES)))
    (root / "notes").mkdir()
    for i, t in enumerate(PASSAGES[:2]):
        (root / "notes" / f"n{i}.txt").write_text(t)
    (root / "broken.jsonl").write_text("{not json\n")
    (root / "ignored.csv").write_text("a,b\n")
    (root.parent / "outside.jsonl").write_text(json.dumps({"text": "secret outside the folder"}) + "\n")
    return root


@pytest.fixture(scope="module")
def live(tiny, stores):
    limits = Limits(max_formula_rows=4)
    server = LiveServer(create_app(tiny, Settings(stores=str(stores), limits=limits), engine=engine_for(tiny)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return live.client()


def python_api(tiny, req: RequestControls, prompt=PROMPT, **kw):
    return ts.generate(tiny, prompt, controls=build_controls(tiny, req), max_tokens=6, temperature=0, ignore_eos=True, **kw)


def completion(client, tiny, extra, prompt=PROMPT):
    return client.completions.create(model=tiny.model_name, prompt=prompt, max_tokens=6, temperature=0, logprobs=1,
                                     extra_body={"ignore_eos": True, "tokensteer": extra})


def same(r, g) -> bool:
    """The server's choice is the Python API's generation: text and each token's log-probability."""
    return r.choices[0].text == g.text and r.choices[0].logprobs.token_logprobs == pytest.approx(g.logprobs, abs=1e-4)


def test_retrieve_is_the_python_api_generation(client, tiny, stores):
    r = completion(client, tiny, {"retrieve": {"store": "kb", "k": 2, "tau": 0.5}})
    want = python_api(tiny, RequestControls(docs=str(stores / "kb.jsonl"), retrieve={"k": 2, "tau": 0.5}))
    plain = python_api(tiny, RequestControls())
    assert same(r, want) and not same(r, plain)  # the passages change the distribution
    assert r.usage.prompt_tokens == len(tiny.tokenizer.encode(PROMPT))  # the prompt's tokens, not a passage row's


def test_a_formulas_r_terms_read_the_named_store(client, tiny, stores):
    r = completion(client, tiny, {"formula": "R(k=1) - 0.3*M", "retrieve": {"store": "notes"}})
    want = python_api(tiny, RequestControls(formula="R(k=1) - 0.3*M", docs=str(stores / "notes")))
    assert same(r, want)
    r = completion(client, tiny, {"retrieve": {"store": "kb.jsonl"}})  # by file name too; k defaults to R's
    assert same(r, python_api(tiny, RequestControls(docs=str(stores / "kb.jsonl"), retrieve={"k": 4})))


def test_chat_takes_retrieve(client, tiny):
    r = client.chat.completions.create(model=tiny.model_name, messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
                                       temperature=0, extra_body={"tokensteer": {"retrieve": {"store": "kb", "k": 1}}})
    assert r.choices[0].message.content is not None


def test_options_list_the_stores(live):
    status, body = live.get("/v1/tokensteer/options")
    assert status == 200 and body["stores"] == ["broken", "kb", "notes"]


def refused(client, tiny, extra, status=400) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        completion(client, tiny, extra)
    assert e.value.status_code == status
    return e.value


@pytest.mark.parametrize("name", ["../outside", "../outside.jsonl", "/etc/passwd", "kb/../kb", "~/kb", ".", "ignored", "ignored.csv", "nope", ""])
def test_store_names_never_become_paths(client, tiny, stores, name):
    err = refused(client, tiny, {"retrieve": {"store": name, "k": 1}})
    assert err.code == "unknown_store" and err.param == "tokensteer.retrieve.store"
    assert "known: broken, kb, notes" in err.message and str(stores) not in err.message


@pytest.mark.parametrize("extra, param, code, fragment", [
    ({"formula": "R(k=2)"}, "tokensteer.formula", "unsupported_formula", "name it in tokensteer.retrieve.store (one of: broken, kb, notes)"),
    ({"formula": "M", "retrieve": {"store": "kb"}}, "tokensteer.retrieve", "invalid_value", "only R(…) terms read"),
    ({"formula": "R(k=2)", "retrieve": {"store": "kb", "k": 2}}, "tokensteer.retrieve", "invalid_value", "inside the formula"),
    ({"retrieve": {"store": "kb", "k": 0}}, "tokensteer.retrieve", "invalid_value", "whole number ≥ 1"),
    ({"retrieve": {"store": "kb", "tau": -1}}, "tokensteer.retrieve", "invalid_value", "tau"),
    ({"retrieve": {"store": "notes", "k": 3}}, "tokensteer.retrieve", "invalid_value", "the store 'notes' holds only 2; lower k"),
    ({"retrieve": {"store": "kb", "k": 5}}, "tokensteer.retrieve.k", "formula_too_large", "limit of 4 rows"),
    ({"formula": 'R(k=2) + M("a") + M("b") + M("c")', "retrieve": {"store": "kb"}}, "tokensteer.formula", "formula_too_large", "5 conditioning texts and passages"),
    ({"retrieve": {"store": "kb", "k": "2"}}, "tokensteer.retrieve.k", "invalid_type", "valid integer"),
    ({"retrieve": {"store": "kb", "path": "/etc"}}, "tokensteer.retrieve.path", "unknown_parameter", "unknown field"),
    ({"retrieve": {"k": 2}}, "tokensteer.retrieve.store", "missing_parameter", "is required"),
])
def test_retrieve_mistakes(client, tiny, stores, extra, param, code, fragment):
    err = refused(client, tiny, extra)
    assert err.param == param and err.code == code and fragment in err.message, err.message
    assert str(stores) not in err.message and "\n" not in err.message


def test_a_broken_store_is_the_servers_fault_and_names_no_path(client, tiny, stores):
    err = refused(client, tiny, {"retrieve": {"store": "broken", "k": 1}}, status=500)
    assert err.code == "store_unreadable" and "'broken'" in err.message and str(stores) not in err.message
    assert completion(client, tiny, {"retrieve": {"store": "kb", "k": 1}}).choices[0].text is not None  # still serving


def test_a_server_without_stores(tiny):
    server = LiveServer(create_app(tiny, Settings(), engine=engine_for(tiny)))
    try:
        err = refused(server.client(), tiny, {"retrieve": {"store": "kb", "k": 1}})
        assert err.code == "unknown_store" and "tokensteer serve --stores DIR" in err.message
        err = refused(server.client(), tiny, {"formula": "R(k=1)"})
        assert err.code == "unsupported_formula" and "this server has none" in err.message
    finally:
        server.stop()


def test_serve_refuses_a_missing_stores_folder(tmp_path):
    r = CliRunner().invoke(cli_app, ["serve", "--stores", str(tmp_path / "nope"), "--port", "0"])
    assert r.exit_code == 2 and "--stores" in r.output and "is not a folder" in r.output and "Traceback" not in r.output
