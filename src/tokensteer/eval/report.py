"""The eval report: a self-contained report.html (tables, embedded matplotlib plots, examples) plus PNGs.

Plots: success rate against perplexity, one point per method (up and left is better); with a
sweep, dose-response curves of success and perplexity against the swept parameter.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Sequence

from tokensteer.files import atomic_write

COLUMNS = [
    ("n", "samples"),
    ("success_rate", "success"),
    ("perplexity", "perplexity"),
    ("distinct_2", "distinct-2"),
    ("tok_s", "tok/s"),
    ("calls_per_token", "calls/token"),
]
SKIP = {"n", "items", "success_rate", "perplexity", "distinct_2", "tok_s", "calls_per_token"}


def fmt(v: Any) -> str:
    """A number as the table shows it."""
    if v is None:
        return "–"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_success_vs_ppl(results: dict, path: Path) -> Path:
    """Scatter of success rate against mean perplexity, one labelled point per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for name, m in results["methods"].items():
        x = m.get("perplexity") or float("nan")
        ax.scatter([x], [m["success_rate"]], s=50)
        ax.annotate(name, (x, m["success_rate"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("perplexity under the uncontrolled model (lower = more fluent)")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.03, 1.03)
    ax.margins(x=0.25)  # room for the labels
    ax.set_title(f"{results['task']}: success vs fluency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_dose_response(results: dict, path: Path) -> Path | None:
    """Success and perplexity against the swept parameter, one line per swept method."""
    sweep = results.get("sweep")
    if not sweep or not sweep.get("series"):
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    numeric = all(_is_number(v) for pts in sweep["series"].values() for v, _ in pts)
    labels = list(dict.fromkeys(v for pts in sweep["series"].values() for v, _ in pts))
    for base, pts in sweep["series"].items():
        # numbers on a numeric axis; other values (recipe names, formulas) as evenly spaced categories
        xs = [float(v) if numeric else labels.index(v) for v, _ in pts]
        ms = [results["methods"][name] for _, name in pts]
        a1.plot(xs, [m["success_rate"] for m in ms], marker="o", label=base)
        a2.plot(xs, [m.get("perplexity") or float("nan") for m in ms], marker="o", label=base)
    for ax, lab in ((a1, "success rate"), (a2, "perplexity")):
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        ax.set_xlabel(sweep["param"])
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    a1.set_ylim(-0.03, 1.03)
    a1.legend(fontsize=7)
    fig.suptitle(f"{results['task']}: dose-response")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _is_number(v: str) -> bool:
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


RATIOS = [("perplexity", "ppl ÷ none"), ("perplexity_median", "median ppl ÷ none"), ("distinct_2", "distinct-2 ÷ none")]


def ratios(results: dict) -> dict[str, dict[str, float | None]]:
    """Each method's mean and median perplexity and distinct-2 over the ``none`` method's (the
    uncontrolled text); empty when the run has no ``none``."""
    base = results["methods"].get("none")
    if not base:
        return {}
    out = {}
    for name, m in results["methods"].items():
        out[name] = {h: (m[k] / base[k] if m.get(k) is not None and base.get(k) else None) for k, h in RATIOS}
    return out


def _table(results: dict) -> str:
    methods = results["methods"]
    extra = sorted({k for m in methods.values() for k in m if k not in SKIP})
    rel = ratios(results)
    rel_heads = [h for _, h in RATIOS] if rel else []
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["method", *(h for _, h in COLUMNS), *rel_heads, *extra])
    rows = []
    for name, m in methods.items():
        cells = [f"<td><code>{html.escape(name)}</code></td>"]
        cells += [f"<td>{fmt(m.get(k))}</td>" for k, _ in COLUMNS]
        cells += [f"<td>{fmt(rel[name][h])}</td>" for h in rel_heads]
        cells += [f"<td>{fmt(m.get(k))}</td>" for k in extra]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _examples(scored: Sequence[dict], methods: Sequence[str], per_method: int = 3) -> str:
    parts = []
    for name in methods:
        ex = [r for r in scored if r["method"] == name][:per_method]
        lis = "".join(
            f"<li><span class=p>{html.escape(r['prompt'])}</span><b>{html.escape(r['text']) or '<i>(empty)</i>'}</b>"
            f" <small>{'✓' if r.get('success') else '✗'}</small></li>"
            for r in ex
        )
        parts.append(f"<h3><code>{html.escape(name)}</code></h3><ul>{lis}</ul>")
    return "".join(parts)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}
.p{color:#777;white-space:pre-wrap}li{margin:.4em 0}small{color:#555}dl{font-size:14px}dt{font-weight:bold}"""


def render_html(results: dict, images: Sequence[Path], scored: Sequence[dict] = ()) -> str:
    """The report as one HTML string, plots embedded as data URIs."""
    s = results.get("sampling", {})
    meta = {
        "task": results["task"],
        "what success means": results.get("description", ""),
        "prompts": f"{results.get('prompts')} ({results.get('n_prompts')} prompts × {results.get('samples_per_prompt')} samples)",
        "model": f"{results.get('model')} on {results.get('backend')}",
        "sampling": ", ".join(f"{k}={v}" for k, v in s.items() if k in ("temperature", "top_p", "max_tokens", "stop")),
        "seed / batch size": f"{results.get('seed')} / {results.get('batch_size')}",
        "date": results.get("date", ""),
    }
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in meta.items())
    body = [
        f"<h1>tokensteer eval: {html.escape(results['task'])}</h1>",
        f"<dl>{dl}</dl>",
        "<h2>Results</h2>",
        _table(results),
        "<p><small>perplexity: mean over non-empty continuations, of the continuation given the item's prompt "
        "under the uncontrolled model; distinct-2: unique word bigrams / all bigrams over all samples; "
        "tok/s: generated tokens per second of batched generation; calls/token: model evaluations "
        "(forward calls × rows per prompt) per token of a batch's longest sample.</small></p>",
        "<h2>Plots</h2>",
        *(_img(p) for p in images),
    ]
    if scored:
        body += ["<h2>Examples</h2>", _examples(scored, list(results["methods"]))]
    return f"<!doctype html><html><head><meta charset=utf-8><title>tokensteer eval {html.escape(results['task'])}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"


def write_report(results: dict, out: str | Path, scored: Sequence[dict] = ()) -> Path:
    """Write OUT/success_vs_perplexity.png, OUT/dose_response.png (sweeps) and OUT/report.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = [plot_success_vs_ppl(results, out / "success_vs_perplexity.png")]
    dr = plot_dose_response(results, out / "dose_response.png")
    if dr:
        images.append(dr)
    path = out / "report.html"
    atomic_write(path, render_html(results, images, scored))
    return path
