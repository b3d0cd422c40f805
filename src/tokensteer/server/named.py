"""Entries of one server-side folder that clients name (steering vectors, document stores): a
name is looked up among the folder's entries, never joined to a path, and errors name entries,
never server paths."""

from __future__ import annotations

from pathlib import Path

from tokensteer.server.errors import APIError


class NamedEntries:
    """Files with one of ``suffixes`` (and, with ``folders``, sub-folders) directly inside one
    folder, by name with or without the suffix. Listed again on every lookup, so entries added
    while the server runs are found."""

    suffixes: tuple[str, ...] = ()
    folders = False
    what = "entry"  # e.g. "steering vector", for messages
    flag = ""  # the serve option that gives the folder
    code = "unknown_entry"

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder).expanduser().resolve() if folder else None

    def names(self) -> dict[str, Path]:
        if self.folder is None or not self.folder.is_dir():
            return {}
        out: dict[str, Path] = {}
        for p in sorted(self.folder.iterdir()):
            if p.name.startswith("."):
                continue
            if self.folders and p.is_dir():
                out.setdefault(p.name, p)
            elif p.is_file() and p.suffix.lower() in self.suffixes:
                out.setdefault(p.stem, p)
                out.setdefault(p.name, p)
        return out

    def listing(self) -> list[str]:
        """Each entry once, by its short name."""
        return sorted({p.stem if p.is_file() else p.name for p in self.names().values()})

    def resolve(self, name: str, param: str) -> Path:
        found = self.names().get(name)
        if found is None:
            if self.folder is None:
                raise APIError(400, f"this server has no {self.what}s (start it with tokensteer serve {self.flag} DIR)", param=param, code=self.code)
            known = ", ".join(self.listing()) or "none"
            raise APIError(400, f"unknown {self.what} {name!r}: {self.what}s are named from the server's folder, never by path; known: {known}",
                           param=param, code=self.code)
        return found
