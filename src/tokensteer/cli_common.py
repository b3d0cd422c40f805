"""What every ``tokensteer`` sub-command shares: the stderr console, one-line user errors, progress
lines, loading a model, reading a prompt from stdin and shell escapes. Sub-command modules import
from here, never from ``tokensteer.cli``, so the command line has no import cycle.
"""

from __future__ import annotations

import re
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape

from tokensteer.errors import UserError

err = Console(stderr=True)


def fail(msg: str) -> None:
    """Print a user error as one line and exit 2 (the message is plain text, never rich markup)."""
    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn UserError (and a file the user may not read or write) into a one-line message with exit code 2."""
    try:
        yield
    except UserError as e:
        fail(str(e))
    except PermissionError as e:
        fail(f"permission denied: {e.filename or e}; check the file's and its folder's permissions")
    except OSError as e:  # a read-only file system, a full disk, a path through /proc ...
        if e.filename is None:
            raise
        fail(f"cannot use {e.filename}: {e.strerror or e}")


@contextmanager
def spinner(label: str) -> Iterator:
    """A progress line with elapsed time for long steps whose length we cannot know in advance.

    Off when stderr is not a terminal: it would show nothing there and rich ends it with a blank line."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    cols = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*cols, console=err, transient=True, disable=not err.is_interactive) as p:
        task = p.add_task(label, total=None)
        yield lambda msg: p.update(task, description=msg)


def load_model(model: Optional[str], backend: str, dtype: str, needs: frozenset[str] = frozenset()):
    """Load with a progress line; user errors become exit code 2."""
    import tokensteer

    with user_errors(), spinner("loading model") as say:
        t = time.perf_counter()
        lm = tokensteer.load(model, backend=backend, dtype=dtype, progress=say, needs=needs)
    err.print(f"[dim]loaded {escape(lm.model_name)} on {lm.name} in {time.perf_counter() - t:.1f} s[/]", highlight=False)
    return lm


MAX_STDIN_CHARS = 1_000_000  # far beyond any model's context; the cap stops `generate - < /dev/zero`


def read_stdin_prompt() -> str:
    """The prompt from stdin, read up to MAX_STDIN_CHARS; more is a UserError, not an endless read."""
    text = sys.stdin.read(MAX_STDIN_CHARS + 1)
    if len(text) > MAX_STDIN_CHARS:
        raise UserError(f"the prompt on stdin is longer than {MAX_STDIN_CHARS:,} characters, far beyond the model's context; give less text")
    return text


def unescape(text: str) -> str:
    """Turn the escapes a shell passes literally (\\n, \\t, \\r, \\\\) into the characters, for --stop."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)
