"""Writing files whole or not at all, shared by every module that saves something."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

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
