"""``tokensteer steer ...``: train, search, inspect, export and import steering vectors."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from tokensteer.errors import UserError, existing_file

app = typer.Typer(
    help="""Steering vectors: train from contrast pairs, pick layer and strength automatically, share with llama.cpp.

Examples:

  tokensteer steer train --pairs sentiment --out pos.safetensors

  tokensteer steer search pos.safetensors

  tokensteer generate "The hotel was" --steer pos.safetensors:0.1

  tokensteer steer export pos.safetensors --gguf pos.gguf   (then: llama-cli -m MODEL.gguf --control-vector pos.gguf)
""",
    no_args_is_help=True,
    add_completion=False,
)

DEFAULT_GUARD = 0.8  # the search's guard unless --guard says otherwise: unguarded doses that stay coherent miss the success target
DEFAULT_AIM = 1.3  # the search's --aim: below the --factor budget, as prompts the search never saw tend to cost more perplexity
MODEL_HELP = "Local Hugging Face model folder or .gguf file (default: bundled Gemma 3 270M)."


def _check_out(out: Path, flag: str, inputs: tuple = (), gguf: bool | None = False) -> None:
    """Before any work: refuse an output that is a folder, of the wrong kind (``gguf``: must it be
    .gguf? None: any) or one of the inputs, which writing would clobber."""
    from tokensteer.steering.vecfile import check_writable, expand

    out = expand(out)  # the writers expand "~" as the readers do
    check_writable(out, flag)
    if gguf is not None and (out.suffix.lower() == ".gguf") != gguf:
        raise UserError(f"{flag} {out}: " + ("a llama.cpp control vector is written to a .gguf file" if gguf else
                        "vector files are .safetensors; make a llama.cpp GGUF with `tokensteer steer export`"))
    for i in inputs:
        if expand(i).is_file() and expand(i).resolve() == out.resolve():
            raise UserError(f"{flag} {out} is also the input file; write to a new file so the input is kept")


def _load(model: Optional[str]):
    from tokensteer.backends.base import HIDDEN_STATES
    from tokensteer.cli_common import load_model

    return load_model(model, "torch", "float32", frozenset({HIDDEN_STATES}))


@app.command()
def train(
    pairs: str = typer.Option(..., help="JSONL file of {\"positive\": ..., \"negative\": ...} lines, or a shipped set: sentiment, formality, french."),
    out: Path = typer.Option(..., help="Where to write the vector (.safetensors)."),
    method: str = typer.Option("diffmean", help="diffmean (CAA mean difference), pca (pair-centred, sign-fixed) or probe (logistic probe)."),
    layers: str = typer.Option("auto", help="auto (best held-out separability in the middle layers), a range a-b, or a list 5,7."),
    read: str = typer.Option("mean", help="Token positions read from each text: mean (all but BOS) or last."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
) -> None:
    """Train a steering vector from contrast pairs (the residual stream is read on the torch backend).

    Examples:

      tokensteer steer train --pairs sentiment --out pos.safetensors

      tokensteer steer train --pairs my_pairs.jsonl --out formal.safetensors --method pca --layers 6-8
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tokensteer.cli_common import err, user_errors
    from tokensteer.steering.pairs import load_pairs
    from tokensteer.steering.train import METHODS, READS, parse_layers, train_vector
    from tokensteer.steering.vecfile import save_vector

    with user_errors():
        _check_out(out, "--out", (pairs,))
        if method not in METHODS:  # mistakes fail before the model loads
            raise UserError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
        if read not in READS:
            raise UserError(f"unknown --read {read!r}; choose one of {', '.join(READS)}")
        ps = load_pairs(pairs)
    lm = _load(model)
    with user_errors():
        chosen = parse_layers(layers, lm.n_layers)
        t0 = time.perf_counter()
        cols = (TextColumn("reading hidden states"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*cols, console=err, transient=True, disable=not err.is_interactive) as p:  # off a terminal: nothing, not a blank line
            task = p.add_task("read", total=2 * len(ps.pairs))
            vec = train_vector(lm, ps, method, chosen, read, progress=lambda d, n: p.update(task, completed=d))
        save_vector(vec, out)
    rec = vec.meta["recommended"]
    err.print(
        f"[green]wrote[/] {escape(str(out))}: {len(ps.pairs)} pairs, method {method}, {time.perf_counter() - t0:.1f} s; "
        f"recommended layers {rec['layers']} at strength {rec['strength']} (run `tokensteer steer search {escape(str(out))}` to tune it)",
        highlight=False,
    )


@app.command()
def search(
    vec: Path = typer.Argument(..., help="Vector file to tune (updated in place)."),
    factor: float = typer.Option(1.5, help="Perplexity budget: steered text's perplexity as a multiple of the uncontrolled text's (bounds --confidence's bootstrap bound)."),
    aim: float = typer.Option(DEFAULT_AIM, help="The perplexity ratio a dose's estimate may reach on the search prompts (at most --factor; below it to leave a margin for other prompts)."),
    kl_max: float = typer.Option(2.0, help="Allowed mean KL(steered ‖ base) in nats per token."),
    min_distinct: float = typer.Option(0.6, help="Least distinct-2 of steered text, as a fraction of the uncontrolled text's: rejects doses whose text repeats itself, which perplexity misses (0 turns it off)."),
    layers: str = typer.Option("auto", help="auto (rank by held-out separability, try the best few), or a-b / list."),
    max_strength: float = typer.Option(2.0, help="Largest strength to try."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Where to save the dose–response plot (default VEC with .curve.png)."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    backend: str = typer.Option("auto", help="auto, torch or llamacpp (sentiment vectors scored by VADER can search on the fast llamacpp backend)."),
    prompts: int = typer.Option(48, help="How many of the built-in neutral search prompts (varied kinds of text, held out from the eval suite's) to continue per dose."),
    tokens: int = typer.Option(32, help="Tokens generated per continuation (the eval suite's default is 32)."),
    bisect_steps: int = typer.Option(3, help="Bisection steps after the doubling phase."),
    layer_trials: int = typer.Option(1, help="With --layers auto: how many of the best separated layers get a short strength search on 24 prompts, the best dose within the budget choosing the layer (1: the best separated, no trials)."),
    confidence: float = typer.Option(0.5, help="A dose passes when this one-sided bootstrap bound of its perplexity ratio is ≤ --factor (0.5: the plain estimate, so --aim decides)."),
    positions: str = typer.Option("all", help="Positions steered: all, prompt or generated."),
    guard: float = typer.Option(DEFAULT_GUARD, help="Sample only within the unsteered model's top-p nucleus: stronger doses stay fluent on prompts the search never saw, each token costs a second forward. Saved with the recommendation; 0 searches without a guard."),
) -> None:
    """Pick layer and strength automatically and save the dose–response curve in the file and a plot.

    The attribute is scored by VADER for sentiment vectors and by the vector's own probe otherwise.
    Coherence is the eval suite's perplexity of the steered text over the uncontrolled text's, on
    neutral prompts that are not the eval's: at most --aim, a margin below the --factor budget for
    prompts the search never saw; the KL from the unsteered model and the text's distinct-2
    (repetition) are bounded as well. The layer is the best separated by the training's held-out
    probe (--layer-trials N: the best dose within the budget among the N best).
    By default it searches with a guard (sampling within the unsteered model's top-0.8), which is
    saved with the recommendation, so `--steer VEC` and `steer:VEC` apply it too.

    Examples:

      tokensteer steer search pos.safetensors --factor 1.5

      tokensteer steer search pos.safetensors --guard 0   (no guard: plain decoding cost, weaker doses)

      tokensteer steer search pos.safetensors --prompts 16 --tokens 16   (quicker, noisier)
    """
    from tokensteer.cli_common import err, spinner, user_errors
    from tokensteer.steering import search as S
    from tokensteer.steering.train import parse_layers
    from tokensteer.steering.vecfile import load_vector, save_vector

    from tokensteer.backends.base import HIDDEN_STATES, RESIDUAL_ADD, RESIDUAL_FN
    from tokensteer.cli_common import load_model
    from tokensteer.steering.apply import POSITIONS

    with user_errors():
        v = load_vector(vec)
        if positions not in POSITIONS:
            raise UserError(f"unknown --positions {positions!r}; choose one of {', '.join(POSITIONS)}")
        if vec.suffix.lower() == ".gguf":
            raise UserError(f"search updates the vector file in place; import the GGUF first: tokensteer steer import {vec} --out VEC.safetensors")
        _check_out(plot_path or vec.with_suffix(".curve.png"), "--plot", (vec,), gguf=None)
        for flag, x in (("--factor", factor), ("--aim", aim), ("--kl-max", kl_max), ("--max-strength", max_strength)):
            if not 0 < x < float("inf"):
                raise UserError(f"{flag} must be a finite number > 0, got {x}")
        for flag, x, least in (("--tokens", tokens, 1), ("--layer-trials", layer_trials, 1), ("--bisect-steps", bisect_steps, 0)):
            if x < least:
                raise UserError(f"{flag} must be ≥ {least}, got {x}")
        if not 2 <= prompts <= len(S.SEARCH_PROMPTS):
            raise UserError(f"--prompts must be between 2 and {len(S.SEARCH_PROMPTS)}, got {prompts}")
        if not 0 <= min_distinct <= 1:
            raise UserError(f"--min-distinct is a fraction of the uncontrolled text's distinct-2, between 0 and 1; got {min_distinct}")
        if not 0 < confidence < 1:
            raise UserError(f"--confidence must be between 0 and 1, got {confidence}")
        if not (math.isfinite(guard) and 0 <= guard <= 1):
            raise UserError(f"--guard is a top-p in (0, 1], or 0 for none; got {guard}")
        guard = guard or None
    vader = v.meta.get("pairs", {}).get("name") == "sentiment"
    needs = {RESIDUAL_ADD if positions == "all" else RESIDUAL_FN} | (set() if vader else {HIDDEN_STATES})
    lm = load_model(model, backend, "float32", frozenset(needs))
    with user_errors(), spinner("searching") as say:
        from tokensteer.sampling import SamplingConfig

        cfg = SamplingConfig(max_tokens=tokens, temperature=1.0, top_p=0.9, stop=("\n",), seed=1234)
        res = S.search(lm, v, factor=factor, aim=aim, kl_max=kl_max, n_layer_trials=layer_trials, min_distinct=min_distinct, layers=parse_layers(layers, lm.n_layers),
                       prompts=S.SEARCH_PROMPTS[:prompts], cfg=cfg, bisect_steps=bisect_steps,
                       confidence=confidence, positions=positions, guard=guard,
                       max_strength=max_strength, say=lambda m: (say(m), err.print(f"[dim]{m}[/]", highlight=False)))
        S.record(v, res)
        save_vector(v, vec)
        png = S.plot(res, plot_path or vec.with_suffix(".curve.png"))
    err.print(f"[green]chosen[/] layers {res.layers}, strength {res.strength:.3g}{f', guard {guard:g}' if guard else ''}; curve saved in {escape(str(vec))} and {escape(str(png))}", highlight=False, soft_wrap=True)


@app.command()
def info(vec: Path = typer.Argument(..., help="Vector file (.safetensors or .gguf).")) -> None:
    """Show a vector's provenance: model, method, pairs, recommended layers and strength.

    Example:

      tokensteer steer info pos.safetensors
    """
    from tokensteer.cli_common import user_errors
    from tokensteer.steering.vecfile import load_vector

    with user_errors():
        v = load_vector(vec)
    m = {k: v.meta.get(k) for k in ("format_version", "model", "units", "method", "pairs", "layer_convention", "created")}
    rec = dict(v.meta.get("recommended", {}))
    rec.pop("curve", None)
    rec.pop("layer_trials", None)
    typer.echo(json.dumps({**m, "layers": v.layers, "recommended": rec}, indent=1, ensure_ascii=False))


@app.command()
def export(
    vec: Path = typer.Argument(..., help="Vector file to export."),
    gguf: Path = typer.Option(..., help="Output llama.cpp control-vector GGUF."),
    strength: Optional[float] = typer.Option(None, help="Strength folded into the tensors (default: the file's recommendation)."),
    layers: Optional[str] = typer.Option(None, help="Layers to export (default: the recommended ones); 0 is impossible in llama.cpp."),
) -> None:
    """Export to llama.cpp's control-vector GGUF (direction.N = strength × vector of layer N).

    Example:

      tokensteer steer export pos.safetensors --gguf pos.gguf && llama-cli -m MODEL.gguf --control-vector pos.gguf
    """
    from tokensteer.cli_common import err, user_errors
    from tokensteer.steering.gguf_io import export_gguf
    from tokensteer.steering.train import parse_layers
    from tokensteer.steering.vecfile import load_vector

    with user_errors():
        _check_out(gguf, "--gguf", (vec,), gguf=True)
        v = load_vector(vec)
        n = v.meta.get("model", {}).get("n_layers", max(v.layers) + 1)
        out = export_gguf(v, gguf, strength, parse_layers(layers, n) if layers else None)
    err.print(f"[green]wrote[/] {escape(str(out))}", highlight=False)


@app.command("import")
def import_(
    gguf: Path = typer.Argument(..., help="A control-vector GGUF (from tokensteer, llama.cpp's cvector-generator or repeng)."),
    out: Path = typer.Option(..., help="Output vector file (.safetensors)."),
) -> None:
    """Import a llama.cpp / repeng control-vector GGUF (foreign vectors keep raw units: strength 1 = as llama.cpp adds them).

    Example:

      tokensteer steer import pos.gguf --out pos2.safetensors
    """
    from tokensteer.cli_common import err, user_errors
    from tokensteer.steering.gguf_io import import_gguf
    from tokensteer.steering.vecfile import expand, save_vector

    with user_errors():
        if gguf.suffix.lower() != ".gguf":
            raise UserError(f"{gguf} is not a .gguf file")
        existing_file(expand(gguf), "control-vector file")
        _check_out(out, "--out", (gguf,))
        save_vector(import_gguf(gguf), out)
    err.print(f"[green]wrote[/] {escape(str(out))}", highlight=False)
