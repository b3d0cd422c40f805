"""Documents for retrieval: a folder of ``.txt``/``.md`` files, one such file, or a JSONL file with a
``text`` field (and optional ``id``, ``title``) per line. Every problem a user can cause (a missing or
empty folder, a file that is not UTF-8 or cannot be read, a bad JSONL line) is one UserError.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tokensteer.errors import UserError, expand
from tokensteer.files import jsonl_lines

TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Document:
    """One document: a stable id (file path or JSONL ``id``), a title to show, and its text."""

    id: str
    title: str
    text: str


def load_documents(path: str | Path) -> list[Document]:
    """Read every document under ``path`` (sorted by id, so the order never depends on the disk)."""
    p = expand(path)
    if not p.exists():
        raise UserError(f"documents {str(path)!r} do not exist; give a folder of .txt/.md files or a .jsonl file")
    if p.is_dir():
        docs = _folder(p, str(path))
    elif p.suffix.lower() == ".jsonl":
        docs = _jsonl(p, str(path))
    elif p.suffix.lower() in TEXT_SUFFIXES:
        docs = [_text_file(p, p.name)]
    else:
        raise UserError(f"documents {str(path)!r}: give a folder of .txt/.md files, one .txt/.md file or a .jsonl file")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise UserError(f"documents {str(path)!r} hold no text (every file or line is empty)")
    return docs


def _folder(root: Path, shown: str) -> list[Document]:
    try:
        files = sorted(f for f in root.rglob("*") if f.suffix.lower() in TEXT_SUFFIXES and f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(root).parts))
    except OSError as e:
        raise UserError(f"cannot list the documents folder {shown!r}: {e.strerror or e}") from None
    if not files:
        raise UserError(f"the documents folder {shown!r} has no .txt or .md files")
    return [_text_file(f, f.relative_to(root).as_posix()) for f in files]


def _read(f: Path, shown: str) -> str:
    try:
        return f.read_text("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise UserError(f"document {shown!r} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read document {shown!r}: {e.strerror or e}") from None


def _text_file(f: Path, doc_id: str) -> Document:
    text = _read(f, str(f))
    heading = next((ln.lstrip("#").strip() for ln in text.splitlines() if ln.startswith("# ")), "")
    return Document(doc_id, heading or f.stem, text)


def _jsonl(f: Path, shown: str) -> list[Document]:
    docs, seen = [], set()
    for n, obj in jsonl_lines(_read(f, shown), shown):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f'{shown} line {n}: each line needs a string "text" field (and optionally "id", "title")')
        doc_id = str(obj.get("id", n))
        if doc_id in seen:
            raise UserError(f"{shown} line {n}: the id {doc_id!r} is used twice")
        seen.add(doc_id)
        title = obj.get("title")
        docs.append(Document(doc_id, str(title) if title is not None else doc_id, obj["text"]))
    return docs


def fingerprint(docs: list[Document], *settings: object) -> str:
    """A hash of every document's id, title and text and of ``settings`` (chunking, model): an index
    built under another fingerprint is stale."""
    h = hashlib.sha256(json.dumps([str(s) for s in settings]).encode())
    for d in docs:
        h.update(json.dumps([d.id, d.title, d.text], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()
