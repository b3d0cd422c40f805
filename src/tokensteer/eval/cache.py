"""The cache of generated samples: one JSONL file, rewritten atomically, so re-scoring never regenerates.

A sample's key hashes everything that decides its text: model, backend, method spec, the exact
prompt fed to the model, the item's fields, the sampling config and the sample's seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tokensteer.files import atomic_write


def sample_key(**parts: Any) -> str:
    """A stable hash of the parts that decide a sample's text."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def sample_seed(base: int, method: str, item: int, k: int) -> int:
    """The deterministic seed of sample ``k`` of item ``item`` under ``method``."""
    h = hashlib.sha256(f"{base}|{method}|{item}|{k}".encode()).hexdigest()
    return int(h[:12], 16)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _well_formed(rec: Any) -> bool:
    """A cached sample the runner can use: any other record (hand-edited, damaged) is regenerated."""
    return (
        isinstance(rec, dict) and isinstance(rec.get("key"), str) and isinstance(rec.get("text"), str)
        and all(_is_num(rec.get(k)) for k in ("seconds", "tokens", "steps", "calls"))
        and (rec.get("perplexity") is None or _is_num(rec["perplexity"]))
    )


class SampleCache:
    """Samples by key in ``DIR/samples.jsonl``; ``save`` rewrites the file atomically."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / "samples.jsonl"
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_bytes().split(b"\n"):  # not splitlines: texts may hold U+2028
                try:
                    rec = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue  # a torn or damaged line (e.g. from an older, non-atomic writer): regenerate that sample
                if _well_formed(rec):
                    self.records[rec["key"]] = rec

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def put(self, rec: dict[str, Any]) -> None:
        self.records[rec["key"]] = rec

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def save(self) -> None:
        atomic_write(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records.values()))
