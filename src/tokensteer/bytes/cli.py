"""``tokensteer generate --byte-level``: the command's byte-level path (the flags it can honour,
printing, the --json layout)."""

from __future__ import annotations

import json
import sys

import typer

from tokensteer.controls import RequestControls
from tokensteer.errors import UserError
from tokensteer.sampling import SamplingConfig


def refuse_token_controls(req: RequestControls) -> None:
    """Byte-level generation runs formulas only; every other control acts on tokens."""
    given = [
        ("--steer", bool(req.steer)),
        ("constraints (--ban, --require, --words, --regex, --json-schema, --grammar, ...)", req.has_constraints()),
        ("--trace", req.trace),
        ("--speculate", bool(req.speculate)),
        ("--docs / --retrieve", req.docs is not None or req.retrieve is not None),
    ]
    for flag, on in given:
        if on:
            raise UserError(f"{flag} works on tokens and cannot be combined with --byte-level")
    if req.formula is not None:
        from tokensteer.bytes.ensemble import check_bytes_formula
        from tokensteer.formula import parse

        check_bytes_formula(parse(req.formula))


def symbol(s: int) -> dict:
    from tokensteer.bytes.utf8 import END

    return {"byte": None, "end": True} if s == END else {"byte": s}


def as_json(lm, g) -> dict:
    """The --json object of a ByteGeneration: characters, each with its bytes' log-probabilities."""
    chars, k = [], 0
    for c, lp in zip(g.chars, g.char_logprobs):
        n = len(c.encode("utf-8"))
        parts = [
            {**symbol(b), "logprob": blp, "top": [{**symbol(s), "logprob": v} for s, v in top]}
            for b, blp, top in zip(g.tokens[k : k + n], g.logprobs[k : k + n], g.top_logprobs[k : k + n])
        ]
        chars.append({"text": c, "logprob": lp, "bytes": parts})
        k += n
    return {
        "text": g.text,
        "finish_reason": g.finish_reason,
        "model": lm.model_name,
        "backend": g.backend,
        "byte_level": True,
        "prompt_bytes": g.prompt_tokens,
        "chars": chars,
        "forward_passes": g.forward_passes,
        "forward_passes_per_byte": g.forward_passes / max(1, len(g.tokens)),
        "timing": {"prefill_s": g.prefill_s, "decode_s": g.decode_s, "bytes_s": g.bytes_s},
    }


def generate_command(
    prompt: str, cfg: SamplingConfig, req: RequestControls, model: str | None, backend: str, dtype: str, stream: bool, json_out: bool
) -> None:
    """Run ``generate --byte-level`` (``max_tokens`` counts characters)."""
    from tokensteer.bytes.generate import generate_bytes, stream_bytes
    from tokensteer.bytes.utf8 import END
    from tokensteer.cli_common import err, load_model, user_errors

    with user_errors():
        refuse_token_controls(req)
        if cfg.repetition_penalty != 1.0:
            raise UserError("--repetition-penalty works on tokens and cannot be combined with --byte-level")
    lm = load_model(model, backend, dtype)
    with user_errors():
        if json_out or not stream:
            g = generate_bytes(lm, prompt, cfg, req.formula)
            typer.echo(json.dumps(as_json(lm, g), ensure_ascii=False) if json_out else g.text)
            if not json_out:
                summary(err, g.finish_reason, len(g.chars), len(g.tokens), g.bytes_s)
            return
        chars = n = 0
        first = last = None
        reason = "length"
        for ev in stream_bytes(lm, prompt, cfg, req.formula):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            chars += len(ev.text)
            n += ev.token != END
            first = ev.t if first is None else first
            last, reason = ev.t, ev.finish_reason or reason
        sys.stdout.write("\n")
        span = (last or 0.0) - (first or 0.0)
        summary(err, reason, chars, n, (n - 1) / span if n > 1 and span > 0 else 0.0)


def summary(err, reason: str, chars: int, n_bytes: int, bytes_s: float) -> None:
    err.print(f"[dim]{chars} characters ({n_bytes} bytes), {reason}, {bytes_s:.1f} bytes/s[/]", highlight=False)
