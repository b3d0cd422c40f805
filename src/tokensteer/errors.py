"""The one exception type that means "the user asked for something impossible"; the CLI prints it."""

from __future__ import annotations

import tempfile
from pathlib import Path


class UserError(ValueError):
    """A mistake in the user's input: shown as one line, exit code 2, never a traceback."""


def expand(path: str | Path) -> Path:
    """``path`` with ``~`` expanded; ``~name`` of an unknown user is a UserError (pathlib raises RuntimeError)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise UserError(f"{str(path)!r}: cannot expand '~' (no such user or home folder)") from None


def existing_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path when it names a readable file; else a UserError saying it is missing or a folder."""
    p = expand(path)
    if str(path).strip() and p.is_dir():  # "" would be the current folder
        raise UserError(f"{what} {str(path)!r} is a folder; give a file")
    if not p.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist")
    return p


def check_can_write(path: str | Path, flag: str) -> None:
    """Raise a UserError unless files can be created where ``path`` will be written: the nearest
    existing folder on its way is probed with a temporary file, so a read-only file system, a
    missing permission or a place like /proc fails at once, before any model loads."""
    p = expand(path)
    here = next((q for q in (p, *p.parents) if q.is_dir()), None)
    if here is None:
        return
    try:
        tempfile.TemporaryFile(dir=here).close()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create files in {here} ({e.strerror or e})") from None
