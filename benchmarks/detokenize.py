"""The engine's incremental detokeniser against decoding every generated id at each token.

On the bundled model's llama.cpp vocabulary, a text of ``--tokens`` ids is pushed one id at a time
(a stop string set, as a request with ``stop`` has) through ``Detokenizer`` and through the
whole-sequence decode it replaced; both must give the same text. Reports milliseconds per token
over the last 10 % of the ids (where the old cost grew largest) and over all ids.

    .venv/bin/python benchmarks/detokenize.py [--tokens 4096]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import tokensteer as ts
from tokensteer.engine.events import Detokenizer
from common import cpu_name


class WholeDecode(Detokenizer):
    """The previous detokeniser: the whole sequence decoded at every push, same hold-back rules."""

    def text_of(self, ids):
        return self.tok.decode(ids, skip_special=self.skip_special)


def run(d, ids: list[int]) -> tuple[str, list[float]]:
    out, times = [], []
    for n in range(1, len(ids) + 1):
        t0 = time.perf_counter()
        out.append(d.push(ids[:n], n == len(ids))[0])
        times.append(time.perf_counter() - t0)
    return "".join(out), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    tok = ts.load(None, backend="llamacpp").tokenizer
    para = "Grüße aus Köln — the committee met on Tuesday to discuss 東京 and the budget. "
    ids = tok.encode(para * (args.tokens // 10 + 1), add_bos=False)[: args.tokens]
    stops = ["\n\n", "THE END"]
    tok.decode(ids)  # untimed: the vocabulary caches each id's bytes on first use
    new_text, new_t = run(Detokenizer(tok, stops), ids)
    old_text, old_t = run(WholeDecode(tok, stops), ids)
    tail = max(1, len(ids) // 10)
    out = {
        "tokens": len(ids),
        "same_text": new_text == old_text,
        "incremental_ms_per_token_last10pct": round(sum(new_t[-tail:]) / tail * 1000, 4),
        "whole_ms_per_token_last10pct": round(sum(old_t[-tail:]) / tail * 1000, 4),
        "incremental_total_s": round(sum(new_t), 3),
        "whole_total_s": round(sum(old_t), 3),
        "cpu": cpu_name(),
        "python": sys.version.split()[0],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
