"""`tokensteer serve` with no flags on the real bundled model (llama.cpp): it prints the playground's
URL, gives the CLI's text for the same seed and controls, and keeps JSON-schema output valid."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import openai
import pytest
from typer.testing import CliRunner

from tokensteer.cli import app

pytestmark = pytest.mark.model

PROMPT = "The day was"


@pytest.fixture(scope="module")
def served():
    """`tokensteer serve --port 0` (every other flag left out) as a subprocess; its URL from its output."""
    proc = subprocess.Popen([sys.executable, "-m", "tokensteer.cli", "serve", "--port", "0", "--log-level", "warning"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, "TOKENSTEER_API_KEY": ""})
    url, seen, t = None, [], time.monotonic()
    while url is None and time.monotonic() - t < 300:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        m = re.search(r"playground: (http://127\.0\.0\.1:\d+)/", line)
        url = m.group(1) if m else None
    assert url, "".join(seen)
    yield url
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served + "/v1", api_key="none", max_retries=0, timeout=300)


def test_serves_the_bundled_model_on_localhost(client):
    assert [m.id for m in client.models.list().data] == ["gemma-3-270m"]


def test_same_seed_and_controls_give_the_cli_text(client):
    r = client.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=20, temperature=1.0, seed=3,
                                  extra_body={"tokensteer": {"formula": "positive"}})
    cli = CliRunner().invoke(app, ["generate", PROMPT, "--backend", "llamacpp", "-n", "20", "-t", "1", "--seed", "3",
                                   "--formula", "positive", "--no-stream"])
    assert cli.exit_code == 0, cli.output
    assert r.choices[0].text == cli.stdout.rstrip("\n")
    banned = client.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=20, temperature=1.0, seed=3,
                                       extra_body={"tokensteer": {"constraints": {"ban": ["wedding", "special"]}}})
    assert not {"wedding", "special"} & set(re.findall(r"\w+", banned.choices[0].text.lower()))


def test_json_schema_output_is_valid(client):
    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                               "pet": {"enum": ["cat", "dog", "none"]}},
              "required": ["name", "age", "pet"], "additionalProperties": False}
    r = client.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=60,
                                       temperature=0.7, seed=1, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    out = json.loads(r.choices[0].message.content)
    jsonschema.validate(out, schema)
    for seed in range(3):  # any object: valid JSON once it ends, but max_tokens may cut it (finish_reason "length"), as with OpenAI
        r = client.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "Any JSON object."}], max_tokens=60, seed=seed,
                                           response_format={"type": "json_object"})
        text = r.choices[0].message.content
        assert text.startswith("{")
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
