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
        (["generate", "x", "-n", "-1"], "max tokens"),
        (["generate", "x", "--temperature", "-1"], "temperature"),
        (["generate", "x", "--top-p", "1.5"], "top-p"),
        (["generate", "x", "--model", "/no/such/model"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, fragment):
    assert_user_error(run(*args), fragment)


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
