"""The ``tokensteer`` request object as the CLI's ``RequestControls``, with the server's safety
rules on top: steering vectors are names looked up in the ``--vectors`` folder, and nothing a
client sends can make the server read a file (no ``M(model=…)`` terms, no schema, grammar or word-list
paths; R terms read a store named from the ``--stores`` folder, see ``server.retrieve``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from tokensteer.controls import RequestControls, build_controls
from tokensteer.errors import UserError
from tokensteer.server import retrieve
from tokensteer.server.errors import APIError
from tokensteer.server.limits import Limits
from tokensteer.server.named import NamedEntries
from tokensteer.server.retrieve import Stores
from tokensteer.server.schemas import SteerItem, TokensteerExtra

if TYPE_CHECKING:
    from tokensteer.backends.base import Backend
    from tokensteer.hooks import Control

VECTOR_SUFFIXES = (".safetensors", ".gguf")
LAYERS = re.compile(r"^\s*\d{1,4}(\s*-\s*\d{1,4})?(\s*,\s*\d{1,4}(\s*-\s*\d{1,4})?)*\s*$")


class Vectors(NamedEntries):
    """The steering vectors a client may name: ``.safetensors`` and ``.gguf`` files of ``--vectors``."""

    suffixes, what, flag, code = VECTOR_SUFFIXES, "steering vector", "--vectors", "unknown_vector"


def steer_spec(item: SteerItem, path: Path, param: str) -> str:
    """The CLI's ``--steer`` string for one item, so it is checked exactly as the CLI checks it."""
    parts = [str(path)]
    if item.strength is not None:
        parts.append(repr(float(item.strength)))
    if item.layers is not None:
        layers = ",".join(str(i) for i in item.layers) if isinstance(item.layers, list) else item.layers
        if not LAYERS.match(layers):
            raise APIError(400, f"layers must be a list of layer numbers or a string like \"6-8\" or \"5,7\", got {item.layers!r}", param=f"{param}.layers")
        parts.append("layers=" + layers.replace(" ", ""))
    for key in ("at", "mode", "guard"):
        v = getattr(item, key)
        if v is not None:
            parts.append(f"{key}={v!r}" if key == "guard" else f"{key}={v}")
    return ":".join(parts)


def check_formula(text: str, limits: Limits) -> None:
    """Refuse formulas that would read files or take too many batch rows."""
    from tokensteer.formula import parse
    from tokensteer.formula.ast import Model, Retrieve
    from tokensteer.formula.check import any_node

    param = "tokensteer.formula"
    if len(text) > limits.max_formula_chars:
        raise APIError(400, f"the formula has {len(text)} characters, above this server's limit of {limits.max_formula_chars} "
                       "(tokensteer serve --max-formula-chars)", param=param, code="formula_too_large")
    root = parse(text).root
    if any_node(root, lambda n: isinstance(n, Model) and n.model is not None):
        raise APIError(400, "M(model=…) terms load another model from a path, which the server never does for a client; "
                       "use terms on the loaded model", param=param, code="unsupported_formula")
    prefixes: set[str] = set()
    passages: set[Retrieve] = set()  # R terms: k rows each (their documents: server.retrieve)

    def note(n: object) -> bool:
        if isinstance(n, Model) and n.prefix:
            prefixes.add(n.prefix)
        elif isinstance(n, Retrieve):
            passages.add(n)
        return False

    any_node(root, note)
    rows = len(prefixes) + sum(n.k for n in passages)
    if rows > limits.max_formula_rows:
        raise APIError(400, f"the formula has {rows} conditioning texts{' and passages' * bool(passages)}, above this server's limit of {limits.max_formula_rows} "
                       "(tokensteer serve --max-formula-rows)", param=param, code="formula_too_large")


def request_controls(extra: TokensteerExtra | None, schema: object, vectors: Vectors, limits: Limits, stores: Stores | None = None) -> RequestControls:
    """The CLI's RequestControls for a request's ``tokensteer`` object, plus a ``response_format``
    JSON schema (``schema``, None when there is none)."""
    extra = extra or TokensteerExtra()
    c = extra.constraints
    if extra.trace and extra.formula is None:
        raise APIError(400, "tokensteer.trace shows a formula's terms; add tokensteer.formula", param="tokensteer.trace")
    if extra.formula is not None:
        check_formula(extra.formula, limits)
    steer = [steer_spec(s, vectors.resolve(s.vector, f"tokensteer.steer.{i}.vector"), f"tokensteer.steer.{i}") for i, s in enumerate(extra.steer)]
    if schema is not None and c is not None and c.json_schema is not None:
        raise APIError(400, "give the JSON schema once: in response_format or in tokensteer.constraints.json_schema", param="response_format")
    req = RequestControls(formula=extra.formula, trace=extra.trace, steer=steer)
    if c is not None:
        req.ban, req.require, req.words, req.end_word, req.regex = c.ban, c.require, c.words, c.end_word, c.regex
        req.json_schema, req.script = c.json_schema, c.script
        req.script_soft, req.sentences, req.require_within = c.script_soft, c.sentences, c.require_within
        req.vocab, req.fast_forward = c.vocab, c.fast_forward
        if isinstance(req.ban, str):
            req.ban = [req.ban]
        if isinstance(req.require, str):
            req.require = [req.require]
        if isinstance(req.script, str):
            req.script = [req.script]
    if schema is not None:
        req.json_schema = schema
    retrieve.apply(extra, req, stores or Stores(None), limits)
    return req


def build(lm: Backend, req: RequestControls) -> list[Control]:
    """Check and build the controls as ``tokensteer generate`` does; the loaded backend must have
    every capability they need (the server cannot switch backends per request)."""
    retrieve.open_docs(req)
    needs = req.required_capabilities()
    missing = needs - lm.capabilities
    if missing:
        raise UserError(f"these controls need {', '.join(sorted(missing))}, which the {lm.name} backend this server runs lacks; "
                        "start the server with --backend torch")
    if req.has_constraints():
        from tokensteer.constraints import check, spec_from_request

        check(spec_from_request(req))
    return build_controls(lm, req)
