"""Contrast pairs: a JSONL file of ``{"positive": ..., "negative": ...}`` or a set shipped with tokensteer.

A pair set carries a hash of its exact content, so a vector file can say what it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources

from tokensteer.errors import UserError
from tokensteer.files import jsonl_lines

MIN_PAIRS = 2


@dataclass(frozen=True)
class Pair:
    """One contrast: the same content with and without the attribute."""

    positive: str
    negative: str


@dataclass(frozen=True)
class PairSet:
    """Pairs plus where they came from and a content hash (for provenance)."""

    name: str
    pairs: tuple[Pair, ...]
    source: str

    @property
    def sha256(self) -> str:
        """Hash of the pairs themselves (order-sensitive), independent of file formatting."""
        h = hashlib.sha256()
        for p in self.pairs:
            h.update(json.dumps([p.positive, p.negative], ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()

    def split(self, held_out: float = 0.25) -> tuple["PairSet", "PairSet"]:
        """Deterministic train / held-out split: every k-th pair is held out."""
        n = len(self.pairs)
        k = max(2, round(1 / held_out)) if held_out > 0 else n + 1
        test = tuple(p for i, p in enumerate(self.pairs) if i % k == k - 1)
        train = tuple(p for i, p in enumerate(self.pairs) if i % k != k - 1)
        return PairSet(self.name, train, self.source), PairSet(self.name + ":held-out", test, self.source)


def shipped_names() -> list[str]:
    """Names of the pair sets bundled with the package."""
    folder = resources.files("tokensteer") / "data" / "pairs"
    return sorted(p.name[: -len(".jsonl")] for p in folder.iterdir() if p.name.endswith(".jsonl"))


def parse_jsonl(text: str, source: str) -> list[Pair]:
    """Parse JSONL pair lines (``files.jsonl_lines``); mistakes name the line."""
    pairs = []
    for i, obj in jsonl_lines(text, source):
        if not isinstance(obj, dict) or not isinstance(obj.get("positive"), str) or not isinstance(obj.get("negative"), str):
            raise UserError(f'{source} line {i}: expected {{"positive": "...", "negative": "..."}} with two strings')
        if not obj["positive"].strip() or not obj["negative"].strip():
            raise UserError(f"{source} line {i}: a pair has an empty side")
        pairs.append(Pair(obj["positive"], obj["negative"]))
    return pairs


def load_pairs(spec: str) -> PairSet:
    """Load ``spec``: a path to a JSONL file, or the name of a shipped set (see ``shipped_names``)."""
    from tokensteer.steering.vecfile import expand

    path = expand(spec)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{spec} is not UTF-8 text") from None
        name, source = path.stem, str(path)
    elif spec in shipped_names():
        text = (resources.files("tokensteer") / "data" / "pairs" / f"{spec}.jsonl").read_text(encoding="utf-8")
        name, source = spec, f"tokensteer:{spec}"
    else:
        raise UserError(
            f"no pair file or shipped pair set named {spec!r}; give a JSONL file of "
            f'{{"positive": ..., "negative": ...}} lines or one of: {", ".join(shipped_names())}'
        )
    pairs = parse_jsonl(text, source)
    if len(pairs) < MIN_PAIRS:
        raise UserError(f"{source} has {len(pairs)} pair(s); training needs at least {MIN_PAIRS}")
    return PairSet(name, tuple(pairs), source)
