"""Every code block of README.md runs here, so the README cannot go stale.

```bash blocks run line by line: `tokensteer ...` through the CLI (typer's CliRunner, in one temporary
folder), `make TARGET` as a dry run (the set-up commands; running them would install or test
recursively), and `tokensteer serve` as a server on a free port that the next ```python block talks
to. ```python blocks run in one namespace, in the README's order, against the real bundled model.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SERVE_URL = "http://127.0.0.1:8000"  # what the README's client block connects to


def blocks() -> list[tuple[str, str, int]]:
    """(language, text, line of the opening fence) of each fenced block."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        out.append((m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1))
    return out


def commands(text: str) -> list[list[str]]:
    """The argv of each command of a shell block (backslash continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", text)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def test_the_readme_is_a_short_guide_whose_blocks_all_have_a_runner():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300
    found = blocks()
    assert found, "no code blocks found"
    for lang, text, line in found:
        assert lang in ("bash", "python"), f"README.md:{line}: no runner for ```{lang} blocks"
        if lang == "python":
            compile(text, f"README.md:{line}", "exec")
        else:
            for argv in commands(text):
                assert argv[0] in ("tokensteer", "make"), f"README.md:{line}: no runner for {argv[0]!r}"


def test_the_readme_has_a_section_with_an_example_for_each_capability():
    text = README.read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## ([^\n]+)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    for title in ("Set-up", "Quick start", "Generate", "Formulas", "Activation steering", "Hard constraints", "Evaluation", "Serve"):
        assert title in sections, f"README.md has no '## {title}' section"
        assert "```" in sections[title], f"README.md's '{title}' section has no example"
    assert "](benchmarks/RESULTS.md)" in text  # figures live there, not here


def test_the_readme_quotes_no_measured_figures():
    """Speeds and machines belong in benchmarks/RESULTS.md; the README only links to it."""
    text = README.read_text(encoding="utf-8")
    found = re.findall(r"tok/s|tokens/s|this CPU|this machine|\d\s?ms\b|\d(?:\.\d+)?\s?[x×]\b|\d\s?%|EPYC|Xeon", text)
    assert not found, found


def test_the_readme_links_to_files_that_exist():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links
    missing = [t for t in links if "://" not in t and not (ROOT / t).exists()]
    assert not missing, missing


def test_the_set_up_commands_are_make_targets():
    lines = [a for lang, text, _ in blocks() if lang == "bash" for a in commands(text) if a[0] == "make"]
    assert [a[1] for a in lines] == ["run", "test"]  # the two set-up commands
    for argv in lines:
        r = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


class Server:
    """`tokensteer serve` as a subprocess on a free port; its URL from its output."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        args = [a for a in argv[2:]]
        if "--port" in args:
            del args[args.index("--port") : args.index("--port") + 2]
        cmd = [sys.executable, "-m", "tokensteer.cli", "serve", *args, "--port", "0", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, cwd=cwd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "TOKENSTEER_API_KEY": ""})
        self.url, seen, t = None, [], time.monotonic()
        while self.url is None and time.monotonic() - t < 300:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            seen.append(line)
            m = re.search(r"playground: (http://127\.0\.0\.1:\d+)/", line)
            self.url = m.group(1) if m else None
        assert self.url, "".join(seen)
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe from filling

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.mark.model
def test_every_readme_block_runs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tokensteer.cli import app

    monkeypatch.chdir(tmp_path)  # files the examples write (pos.safetensors, runs/) land here
    runner, ns, server, ran = CliRunner(), {"__name__": "readme"}, None, 0
    try:
        for lang, text, line in blocks():
            if lang == "python":
                if SERVE_URL in text:
                    assert server is not None, f"README.md:{line}: talks to a server no block started"
                    text = text.replace(SERVE_URL, server.url)
                exec(compile(text, f"README.md:{line}", "exec"), ns)
                ran += 1
                continue
            for argv in commands(text):
                if argv[0] == "make":
                    continue  # test_the_set_up_commands_are_make_targets
                if argv[1] == "serve":
                    server = Server(argv, tmp_path)
                    continue
                r = runner.invoke(app, argv[1:])
                assert r.exit_code == 0, f"README.md:{line}: {shlex.join(argv)} failed:\n{r.output}{r.exception or ''}"
                ran += 1
    finally:
        if server is not None:
            server.stop()
    assert ran >= 20
    assert (tmp_path / "pos.safetensors").is_file() and (tmp_path / "runs" / "pos" / "results.json").is_file()
