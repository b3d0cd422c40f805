"""User mistakes on every command: one line on stderr, exit code 2, no traceback, inputs never clobbered.

Each case here once crashed with a traceback, silently did something else, or overwrote a file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner
from conftest import deny_reading

from tokensteer.cli import app
from tokensteer.errors import UserError
from tokensteer.steering import export_gguf, save_vector, train_vector
from tokensteer.steering.pairs import Pair, PairSet

runner = CliRunner()
PAIRS = PairSet("toy", (Pair("good happy kind", "bad sad rude"), Pair("a great day", "an awful day"),
                        Pair("hello kind world", "hello rude world"), Pair("the cat is happy", "the cat is sad")), "test")
NOT_UTF8 = b"\xff\xfe not text\n"


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert fragment in result.output, result.output


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """A pairs file, a vector trained on the tiny model, its GGUF export and a truncated copy of it."""
    d = tmp_path_factory.mktemp("mistakes")
    (d / "pairs.jsonl").write_text("".join(json.dumps({"positive": p.positive, "negative": p.negative}) + "\n" for p in PAIRS.pairs))
    save_vector(train_vector(tiny, PAIRS, "diffmean", layers=[1]), d / "v.safetensors")
    from tokensteer.steering import load_vector

    export_gguf(load_vector(d / "v.safetensors"), d / "v.gguf", 0.5, [1])
    (d / "trunc.gguf").write_bytes((d / "v.gguf").read_bytes()[:200])
    (d / "bad.txt").write_bytes(NOT_UTF8)
    return d


# ---- generate: numbers, text and constraint values ----

@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--seed", str(10**24), "-t", "1"], "seed"),
        (["-t", "inf"], "temperature must be a finite number"),
        (["--repetition-penalty", "inf"], "repetition penalty must be a finite number"),
        (["--words", "0"], "--words must be at least 1"),
        (["--end-word", ""], "--end-word"),
        (["--regex", ""], "--regex is empty"),
        (["--grammar", ""], "grammar file '' does not exist"),
        (["--json-schema", "[/x].json"], "'[/x].json' does not exist"),  # shown literally, not as rich markup
    ],
)
def test_generate_bad_values_fail_before_decoding(tiny_dir, args, fragment):
    assert_user_error(run("generate", "hello", "--model", tiny_dir, "-n", "4", *args), fragment)


@pytest.mark.parametrize("dose", ["1e30", "-11", "inf"])
def test_absurd_steering_strength(tiny_dir, files, dose):
    r = run("generate", "hello", "--model", tiny_dir, "-n", "4", "--steer", f"{files / 'v.safetensors'}:{dose}")
    assert_user_error(r, "finite" if dose == "inf" else "out of range")


def test_more_tokens_than_the_context(tiny_dir):
    assert_user_error(run("generate", "hello", "--model", tiny_dir, "-n", "100000"), "lower max tokens (--max-tokens)")


def test_prompt_that_is_not_utf8(tiny_dir):
    # bytes that are not UTF-8 reach Python as lone surrogates (argv and stdin alike)
    assert_user_error(run("generate", "hi \udcff", "--model", tiny_dir, "-n", "2"), "not valid UTF-8")


@pytest.mark.parametrize("flag, n", [("--words", 50), ("--sentences", 9)])
def test_count_beyond_the_token_budget(tiny_dir, flag, n):
    assert_user_error(run("generate", "hello", "--model", tiny_dir, "-n", "4", flag, n), f"{flag} {n} needs at least {n} tokens")


@pytest.mark.parametrize("flag, name", [("--vocab", "bad.txt"), ("--grammar", "bad.lark")])
def test_constraint_files_that_are_not_utf8(tiny_dir, files, flag, name):
    (files / name).write_bytes(NOT_UTF8)
    assert_user_error(run("generate", "hello", "--model", tiny_dir, "-n", "4", flag, files / name), "is not UTF-8 text")


def test_unreadable_file_is_one_line(tiny_dir, files, monkeypatch):
    deny_reading(monkeypatch, "pairs.jsonl")
    r = run("steer", "train", "--pairs", files / "pairs.jsonl", "--out", files / "new.safetensors", "--model", tiny_dir)
    assert_user_error(r, "permission denied")


def test_truncated_gguf_model(files):
    assert_user_error(run("generate", "hi", "--model", files / "trunc.gguf", "--backend", "torch", "-n", "2"), "cannot load model")


# ---- steer train / export / import: outputs never clobber inputs ----

def test_train_output_mistakes_leave_the_input_alone(tiny_dir, files):
    pairs = files / "pairs.jsonl"
    before = pairs.read_bytes()
    train = ("steer", "train", "--pairs", pairs, "--model", tiny_dir, "--out")
    assert_user_error(run(*train, pairs), "is also the input file")
    assert pairs.read_bytes() == before
    assert_user_error(run(*train, files), "is a folder")
    assert_user_error(run(*train, files / "x.gguf"), "steer export")
    assert not (files / "x.gguf").exists()


def test_reversed_layer_range(tiny_dir, files):
    r = run("steer", "train", "--pairs", files / "pairs.jsonl", "--model", tiny_dir, "--out", files / "o.safetensors", "--layers", "1-0")
    assert_user_error(r, "runs backwards")


def test_export_mistakes(files):
    vec = files / "v.safetensors"
    before = vec.read_bytes()
    assert_user_error(run("steer", "export", vec, "--gguf", vec, "--layers", "1"), ".gguf")
    assert vec.read_bytes() == before
    assert_user_error(run("steer", "export", vec, "--gguf", files / "x.safetensors", "--layers", "1"), ".gguf")
    assert_user_error(run("steer", "export", vec, "--gguf", files, "--layers", "1"), "is a folder")
    assert_user_error(run("steer", "export", files / "v.gguf", "--gguf", files / "v.gguf", "--layers", "1"), "is also the input file")
    assert_user_error(run("steer", "export", vec, "--gguf", files / "nan.gguf", "--layers", "1", "--strength", "nan"), "finite")
    assert not (files / "nan.gguf").exists() and not (files / "x.safetensors").exists()


def test_import_mistakes(files):
    gguf = files / "v.gguf"
    before = gguf.read_bytes()
    assert_user_error(run("steer", "import", gguf, "--out", gguf), "steer export")
    assert gguf.read_bytes() == before
    assert_user_error(run("steer", "import", gguf, "--out", files), "is a folder")
    assert_user_error(run("steer", "import", files / "trunc.gguf", "--out", files / "t.safetensors"), "not a readable GGUF")


def _safetensors(path: Path, tensors: dict, meta) -> Path:
    """A hand-made safetensors file (zeros) with the given tensor shapes and tokensteer metadata."""
    hdr, off = {}, 0
    for name, shape in tensors.items():
        n = 4 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        hdr[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hdr["__metadata__"] = {"tokensteer": meta if isinstance(meta, str) else json.dumps(meta)}
    blob = json.dumps(hdr).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * off)
    return path


@pytest.mark.parametrize(
    "tensors, meta",
    [
        ({"layer.0": [2]}, {"format": "tokensteer-steering-vector", "format_version": "abc"}),
        ({"layer.0": [2]}, [1, 2]),
        ({"layer.x": [2]}, {"format": "tokensteer-steering-vector"}),
        ({"layer.0": [2, 2]}, {"format": "tokensteer-steering-vector"}),
        ({"layer.0": [2]}, {"format": "tokensteer-steering-vector", "model": "gemma", "recommended": "x"}),
    ],
)
def test_corrupt_vector_files(tmp_path, tensors, meta):
    path = _safetensors(tmp_path / "v.safetensors", tensors, meta)
    assert_user_error(run("steer", "info", path), "corrupt")


def test_vector_path_that_is_a_folder(tmp_path):
    assert_user_error(run("steer", "info", tmp_path), "is a folder")


# ---- steer search: every number and path checked before the (long) search ----

@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--factor", "-1"], "--factor must be a finite number > 0"),
        (["--kl-max", "nan"], "--kl-max must be a finite number > 0"),
        (["--max-strength", "0"], "--max-strength must be a finite number > 0"),
        (["--tokens", "0"], "--tokens must be ≥ 1"),
        (["--bisect-steps", "-1"], "--bisect-steps must be ≥ 0"),
        (["--layer-trials", "0"], "--layer-trials must be ≥ 1"),
    ],
)
def test_search_bad_numbers(tiny_dir, files, args, fragment):
    r = run("steer", "search", files / "v.safetensors", "--model", tiny_dir, "--backend", "torch", "--prompts", "2", "--tokens", "2", *args)
    assert_user_error(r, fragment)


def test_search_plot_path_mistakes(tiny_dir, files):
    vec = files / "v.safetensors"
    before = vec.read_bytes()
    common = ("steer", "search", vec, "--model", tiny_dir, "--backend", "torch", "--prompts", "2", "--tokens", "2",
              "--bisect-steps", "0", "--factor", "100", "--kl-max", "100", "--max-strength", "0.2", "--plot")
    assert_user_error(run(*common, vec), "is also the input file")
    assert_user_error(run(*common, files), "is a folder")
    assert vec.read_bytes() == before
    assert_user_error(run(*common[:2], files / "v.gguf", *common[3:-1]), "import the GGUF first")


def test_search_says_what_it_does_from_the_start(tiny_dir, files, tmp_path):
    """The unsteered baseline takes minutes on the real model: a line says so before it starts, also off a terminal."""
    vec = tmp_path / "v.safetensors"
    vec.write_bytes((files / "v.safetensors").read_bytes())
    r = run("steer", "search", vec, "--model", tiny_dir, "--backend", "torch", "--prompts", "2", "--tokens", "2",
            "--bisect-steps", "0", "--factor", "100", "--kl-max", "100", "--max-strength", "0.2")
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    steps = [next(i for i, line in enumerate(lines) if line.startswith(s))
             for s in ("loaded", "continuing 2 prompts without steering for the baseline", "layer 0: the best separated",
                       "searching the strength at layer", "strength 0.125:", "chosen")]
    assert steps == sorted(steps), lines


# ---- formula and eval ----

def test_deeply_nested_formula():
    assert_user_error(run("formula", "check", "(" * 2000 + "M" + ")" * 2000), "nests too deeply")


def test_eval_negative_max_tokens_names_the_flag(tiny_dir, tmp_path):
    r = run("eval", "--model", tiny_dir, "--task", "sentiment-positive", "--max-tokens", "-1", "--out", tmp_path / "ev")
    assert_user_error(r, "--max-tokens must be ≥ 0, got -1")


def test_eval_out_or_cache_is_a_file(tiny_dir, files):
    pairs = files / "pairs.jsonl"
    before = pairs.read_bytes()
    base = ("eval", "--model", tiny_dir, "--backend", "torch", "--task", "sentiment-positive", "--n", "1", "--max-tokens", "2", "-m", "none")
    assert_user_error(run(*base, "--out", pairs), "--out")
    assert_user_error(run(*base, "--out", files / "ev", "--cache", pairs), "--cache")
    assert pairs.read_bytes() == before


def test_eval_files_that_are_not_utf8(tiny_dir, files):
    base = ("eval", "--model", tiny_dir, "--backend", "torch", "--task", "sentiment-positive", "--n", "1", "--out", files / "ev")
    assert_user_error(run(*base, "--prompts", files / "bad.txt"), "not UTF-8")
    (files / "bin.yaml").write_bytes(NOT_UTF8)
    assert_user_error(run(*base, "-m", f"constraints:{files / 'bin.yaml'}"), "cannot parse method spec file")


def test_yaml_mistakes_are_one_line(tiny_dir, files):
    r = run("eval", "--model", tiny_dir, "--backend", "torch", "--task", "sentiment-positive", "--n", "1",
            "--out", files / "ev", "-m", "constraints:{ban: [")
    assert_user_error(r, "line 1, column 8")
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1, r.output


# ---- flags that were silently ignored or misread ----

@pytest.mark.parametrize("args, fragment", [(["--trace"], "add --formula"), (["--top-logprobs", "3"], "add --json")])
def test_flags_without_their_companion(tiny_dir, args, fragment):
    assert_user_error(run("generate", "hello", "--model", tiny_dir, "-n", "2", *args), fragment)


def test_stop_escapes_as_the_help_shows():
    from tokensteer.cli_common import unescape

    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb") == "a\tb" and unescape("\\\\n") == "\\n"
    assert unescape("plain é") == "plain é" and unescape(r"\q") == r"\q"


def test_eval_stop_escape_reaches_sampling(tiny_dir, tmp_path):
    r = run("eval", "--model", tiny_dir, "--backend", "torch", "--task", "sentiment-positive", "--n", "1",
            "--max-tokens", "2", "-m", "none", "--no-report", "--out", tmp_path / "ev", "--stop", r"\n\n")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["sampling"]["stop"] == ["\n\n"]


def test_missing_model_of_a_formula_term_names_the_term(tiny_dir):
    r = run("generate", "hello", "--model", tiny_dir, "-n", "2", "--formula", 'M + M(model="/no/such/model")')
    assert_user_error(r, 'the formula term M(model="/no/such/model") names a path that does not exist')
    assert "omit --model" not in r.output


def test_formula_weight_that_overflows_float32(tiny_dir):
    r = run("generate", "hello", "--model", tiny_dir, "-n", "2", "--formula", 'M + 1e300*M("a")')
    assert_user_error(r, "weights must be finite numbers of size at most")


def test_output_under_a_file_fails_before_any_work(tiny_dir, files):
    pairs, vec = files / "pairs.jsonl", files / "v.safetensors"
    before = vec.read_bytes()
    assert_user_error(run("steer", "train", "--pairs", pairs, "--model", tiny_dir, "--out", pairs / "x.safetensors"), "is a file, not a folder")
    assert_user_error(run("steer", "export", vec, "--layers", "1", "--gguf", pairs / "x.gguf"), "is a file, not a folder")
    r = run("steer", "search", vec, "--model", tiny_dir, "--backend", "torch", "--prompts", "2", "--tokens", "2", "--bisect-steps", "0",
            "--factor", "100", "--kl-max", "100", "--max-strength", "0.2", "--plot", pairs / "p.png")
    assert_user_error(r, "is a file, not a folder")
    assert vec.read_bytes() == before  # the search did not update the vector and then fail on the plot
    r = run("eval", "--model", tiny_dir, "--backend", "torch", "--task", "sentiment-positive", "--n", "1", "--max-tokens", "2",
            "-m", "none", "--out", pairs / "sub")
    assert_user_error(r, "is a file")


@pytest.mark.parametrize("args", [["models"], ["generate", "hi", "-n", "2"]])
def test_tokensteer_home_that_is_a_file(files, args):
    r = runner.invoke(app, args, env={"TOKENSTEER_HOME": str(files / "pairs.jsonl")})
    assert_user_error(r, "TOKENSTEER_HOME")


def test_a_folder_where_a_file_is_expected_is_named_as_such(tmp_path):
    from tokensteer.constraints.grammar import read_grammar, read_schema
    from tokensteer.constraints.wordlist import read_wordlist

    for read in (read_schema, read_grammar, read_wordlist):
        with pytest.raises(UserError, match="is a folder; give a file"):
            read(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        read_schema(str(tmp_path / "missing.json"))
