"""The CLI turns user mistakes into one line on stderr and exit code 2, and runs on a local model."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from tokensteer.cli import app

runner = CliRunner()


def run(*args: str, stdin: str | None = None):
    return runner.invoke(app, list(args), input=stdin)


def assert_user_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_generate_json_on_a_local_model(tiny_dir):
    r = run("generate", "the cat", "--model", str(tiny_dir), "-n", "5", "--json", "--top-logprobs", "2")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["backend"] == "torch" and out["finish_reason"] in {"length", "eos"}
    assert len(out["tokens"]) <= 5 and all(len(t["top"]) == 2 for t in out["tokens"])
    assert set(out["timing"]) == {"prefill_s", "decode_s", "tok_s"}


def test_prompt_from_stdin(tiny_dir):
    r = run("generate", "-", "--model", str(tiny_dir), "-n", "3", "--json", stdin="the dog")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["generate", ""], "empty"),
        (["generate", "x", "-n", "-1"], "--max-tokens (-n) must be ≥ 0"),
        (["generate", "x", "--temperature", "-1"], "temperature"),
        (["generate", "x", "--top-p", "1.5"], "top-p"),
        (["generate", "x", "--model", "/no/such/model"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, fragment):
    assert_user_error(run(*args), fragment)


def test_a_user_error_is_exactly_one_line_on_stderr():
    r = run("generate", "x", "--model", "/no/such/model")  # a progress line ran before it (and once left a blank line)
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), repr(r.stderr)


HELP_PAGES = [[], ["generate"], ["models"], ["eval"], ["steer"], ["formula"],
              *(["steer", c] for c in ("train", "search", "info", "export", "import")), ["formula", "check"], ["formula", "recipes"]]


@pytest.mark.parametrize("page", HELP_PAGES, ids=" ".join)
def test_help_shows_no_type_after_flags(page):
    r = runner.invoke(app, [*page, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "--help" in r.output and "<bool>" not in r.output
    if page == ["generate"]:
        assert "<int>" in r.output  # options that take a value keep their type


def help_text(*page: str) -> str:
    r = runner.invoke(app, [*page, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    return r.output


def test_help_teaches_the_steer_spec_and_the_doses_that_work():
    gen = help_text("generate")
    assert all(s in gen for s in ("VEC:STRENGTH", ":at=generated|prompt|all", ":layers=", ":mode=gcav", ":guard=P", "--steer pos.safetensors:0.1"))
    assert all(ex in gen for ex in ("--formula positive --trace", "--sentences 2", "--regex '[0-9]{6}'", "--grammar answer.lark"))
    ev = help_text("eval")
    assert "steer:PATH[@STRENGTH]" in ev and "strength=0,0.05,0.1" in ev and "0,2,4" not in ev
    assert "[default: \\n]" in ev  # the newline default on one line, as it is typed
    steer = help_text("steer")
    assert "pos.safetensors:0.1" in steer and "llama-cli -m MODEL.gguf --control-vector pos.gguf" in steer
    assert "llama-cli -m MODEL.gguf --control-vector pos.gguf" in help_text("steer", "export")
    assert "Examples:" in help_text("steer", "search") and "--prompts 16 --tokens 16" in help_text("steer", "search")
    assert "tokensteer steer info pos.safetensors" in help_text("steer", "info")
    assert "tokensteer steer import pos.gguf --out" in help_text("steer", "import")


def test_formula_help_lists_the_guides():
    from tokensteer.formula.guides import GUIDES

    out = " ".join(help_text("formula").split())
    assert f"an offline guide: {', '.join(GUIDES)}" in out


def test_not_a_model_folder(tmp_path):
    assert_user_error(run("generate", "x", "--model", str(tmp_path)), "no config.json")


def test_non_causal_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    assert_user_error(run("generate", "x", "--model", str(tmp_path)), "not a causal language model")


def test_corrupt_weights(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file at all")
    assert_user_error(run("generate", "x", "--model", str(broken)), "cannot load model")


def test_bad_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"JUNKJUNK")
    assert_user_error(run("generate", "x", "--model", str(f)), "not a valid GGUF")


def test_a_regex_cut_by_max_tokens_is_reported(tiny_dir):
    """No silent half-matches: the text ends at --max-tokens before 40 digits, so the CLI says so."""
    for extra in ((), ("--json",), ("--no-stream",)):
        r = run("generate", "the cat", "--model", str(tiny_dir), "-n", "3", "--regex", r"\d{40}", *extra)
        assert r.exit_code == 0, r.output
        assert "ended the text before it matched the regex; raise --max-tokens" in r.stderr
    done = run("generate", "the cat", "--model", str(tiny_dir), "-n", "3", "--regex", r"\d")
    assert done.exit_code == 0 and "warning" not in done.stderr


def test_tilde_of_an_unknown_user_is_one_line():
    r = run("generate", "hi", "--model", "~no_such_user_xyz/model")
    assert_user_error(r, "cannot expand '~'")
    r = run("generate", "hi", "--json-schema", "~no_such_user_xyz/schema.json")
    assert_user_error(r, "cannot expand '~'")


def test_models_lists_the_caches_including_formula_heads(tmp_path):
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "m.head-0.gguf").write_bytes(b"x" * (3 << 20))
    r = runner.invoke(app, ["models"], env={"TOKENSTEER_HOME": str(tmp_path)})
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "formula heads" in out and "1 file, 3 MB" in out


@pytest.mark.parametrize("row", ["Q8_0 output layer for llama.cpp", "matrix products and GEGLU of llama.cpp's blocks"])
def test_models_says_whether_each_kernel_runs(tmp_path, monkeypatch, row):
    from tokensteer.backends.llamacpp import native

    monkeypatch.setenv("TOKENSTEER_NO_NATIVE", "1")
    native.load.cache_clear()
    try:
        r = runner.invoke(app, ["models"], env={"TOKENSTEER_HOME": str(tmp_path)})
    finally:
        native.load.cache_clear()
    assert r.exit_code == 0, r.output
    assert f"{row}: off (TOKENSTEER_NO_NATIVE is set)" in " ".join(r.output.split())
