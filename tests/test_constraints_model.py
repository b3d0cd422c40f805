"""Constraints on the real bundled Gemma tokenizer and model (word starts, byte fallback, JSON)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import tokensteer
from tokensteer.constraints import ConstraintSpec, build
from tokensteer.constraints.vocab import token_table
from tokensteer.eval.scorers import count_check
from tokensteer.sampling import SamplingConfig

pytestmark = pytest.mark.model


def test_gemma_token_bytes_mark_word_starts_and_byte_fallback(bundled):
    tok = bundled.tokenizer
    table = token_table(tok)
    assert table.size == tok.vocab_size == 262144
    ids = tok.encode(" hello world", add_bos=False)
    assert table.tokens[ids[0]].startswith(b" ") and b"".join(table.tokens[i] for i in ids) == b" hello world"
    byte_c3 = tok.hf.convert_tokens_to_ids("<0xC3>")
    assert table.tokens[byte_c3] == b"\xc3"
    assert all(not table.tokens[i] for i in tok.eos_ids)


def test_gemma_count_end_word_and_ban_hold(bundled):
    spec = ConstraintSpec(words=7, end_word="sea", ban=["the"])
    prompts = ["The fisherman looked at", "On Sunday morning we walked to"]
    gs = tokensteer.generate(bundled, prompts, SamplingConfig(max_tokens=30, temperature=0.8, seed=2), build(bundled, spec))
    for g in gs:
        assert count_check(g.text, 7, "sea")["success"], g.text
        assert re.search(r"(?<!\w)the(?!\w)", g.text.lower()) is None, g.text


def test_gemma_json_schema_output_validates(bundled):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    g = tokensteer.generate(bundled, "A person as JSON:", SamplingConfig(max_tokens=40, seed=0), build(bundled, ConstraintSpec(json_schema=schema)))
    jsonschema.validate(json.loads(g.text), schema)
