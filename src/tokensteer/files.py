"""Reading and writing files, shared by every module that loads or saves something: whole-or-nothing
writes, JSONL lines."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from tokensteer.errors import UserError

Content = Union[str, bytes, Callable[[str], None]]


def atomic_write(path: str | os.PathLike, content: Content, *, suffix: str = ".part", user_error: bool = True) -> None:
    """Write ``content`` (text, bytes, or ``write(tmp_path)`` that fills a file) to ``path`` through a
    temporary file beside it and ``os.replace``, so readers never see half a file.

    A failed write leaves any old file intact; with ``user_error`` an OSError (read-only file system,
    full disk, no permission) becomes one UserError. ``suffix`` is the temporary file's ending (some
    writers, like ``numpy.savez``, add their own unless it is theirs). The file is made 0644, as
    results and caches are meant to be shared.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        if callable(content):
            os.close(fd)
            content(tmp)
        else:
            with os.fdopen(fd, "w" if isinstance(content, str) else "wb", **({"encoding": "utf-8"} if isinstance(content, str) else {})) as f:
                f.write(content)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        if not user_error:
            raise
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def drop_written_pages(path: str | os.PathLike) -> None:
    """Flush a file just written and drop its pages from the page cache: pages a write leaves behind
    come back in small pieces, while pages read through readahead come in large ones, which
    llama.cpp (it maps weight files) streams faster."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def jsonl_lines(text: str, source: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of JSONL ``text``; a leading byte-order
    mark is skipped, and a line that is not JSON is a UserError naming ``source`` and the line.

    Lines end at ``\n`` only (JSONL's rule): ``str.splitlines`` would also cut a string at the
    U+2028, U+2029 or U+0085 that ``json.dumps(..., ensure_ascii=False)`` leaves unescaped."""
    for n, line in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{source} line {n}: invalid JSON ({e.msg})") from None
