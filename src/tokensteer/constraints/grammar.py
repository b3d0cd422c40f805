"""Regex, JSON Schema and Lark/GBNF grammars through llguidance (a real, fast grammar engine).

llguidance needs its own view of the vocabulary (an ``LLTokenizer``). We build it from the cached
per-token bytes (``vocab.py``) plus the backend tokenizer's ``encode``, so the same code serves the
torch backend and llama.cpp (whose vocabulary gives the same bytes through ``token_bytes``). It
takes a few seconds at 262k tokens and is kept per tokenizer for the life of the process. Each row
has an ``LLMatcher``; its int32 bitmask is unpacked into the loop's bool mask each step.
"""

from __future__ import annotations

import functools
import json
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokensteer.backends.base import Tokenizer
from tokensteer.constraints.base import Constraint
from tokensteer.constraints.regexplan import RegexPlan, RowPlans
from tokensteer.constraints.vocab import TokenTable
from tokensteer.errors import UserError, existing_file

if TYPE_CHECKING:
    from tokensteer.engine.state import LoopState

#: compact JSON (no free whitespace, which lets a model pad forever); a schema's x-guidance overrides it
JSON_OPTIONS = {"whitespace_flexible": False}
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokensteer-grammar")

_lltokenizers: "weakref.WeakKeyDictionary[Tokenizer, Any]" = weakref.WeakKeyDictionary()


class _Vocab:
    """What ``llguidance.TokenizerWrapper`` reads: token bytes, EOS/BOS, special ids, an encoder."""

    def __init__(self, tok: Tokenizer, table: TokenTable) -> None:
        self.tok = tok
        self.eos_token_id = table.eos_ids[0] if table.eos_ids else 0
        self.bos_token_id = tok.bos_id
        # llguidance marks special tokens with a leading 0xFF byte, so grammar text never matches them
        self.tokens = [t if t else b"\xff<special_%d>" % i for i, t in enumerate(table.tokens)]
        self.special_token_ids = [i for i, t in enumerate(table.tokens) if not t]

    def __call__(self, data: bytes) -> list[int]:
        return self.tok.encode(data.decode("utf-8", errors="replace"), add_bos=False)


def lltokenizer(tok: Tokenizer, table: TokenTable):
    """The llguidance tokenizer for ``tok``, built once per process."""
    import llguidance

    llt = _lltokenizers.get(tok)
    if llt is None:
        llt = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_Vocab(tok, table)), n_vocab=table.size, eos_token=table.eos_ids or None
        )
        _lltokenizers[tok] = llt
    return llt


def grammar_for(regex: str | None = None, schema: Any = None, lark: str | None = None) -> str:
    """An llguidance grammar from exactly one of a regex, a JSON Schema (dict) or a Lark grammar;
    raises UserError with llguidance's message when it is invalid."""
    from llguidance import LLMatcher

    given = [k for k, v in (("--regex", regex), ("--json-schema", schema), ("--grammar", lark)) if v is not None]
    if len(given) != 1:
        raise UserError(f"give one of --regex, --json-schema, --grammar, not {' and '.join(given) or 'none'}")
    try:
        if regex is not None:
            grammar, what = LLMatcher.grammar_from_regex(regex), f"regex {regex!r}"
        elif schema is not None:
            grammar, what = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS), "JSON schema"
        else:
            grammar, what = LLMatcher.grammar_from_lark(lark), "grammar"
    except ValueError as e:
        raise UserError(f"invalid {'JSON schema' if schema is not None else 'grammar'}: {e}") from e
    error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if error:
        raise UserError(f"invalid {what}: {_one_line(messages[0]) if messages else 'llguidance rejected it'}")
    check_satisfiable(grammar, what)
    return grammar


@functools.cache
def _byte_lltokenizer():
    """An llguidance tokenizer whose tokens are the 256 bytes plus EOS: any text can be spelled in
    it, so what a grammar refuses here, no model's vocabulary can satisfy either."""
    import llguidance

    class Bytes:
        eos_token_id, bos_token_id = 256, None
        tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]
        special_token_ids = [256]

        def __call__(self, data: bytes) -> list[int]:
            return list(data)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Bytes()), n_vocab=257, eos_token=256)


def check_satisfiable(grammar: str, what: str) -> None:
    """Refuse, before any decoding, a grammar no text can match from its start: a rule defined only
    by itself (``start: start "a"``), a schema that refers only to itself (``{"$ref": "#"}``), or
    contradictory bounds. llguidance reports these as an error once it computes the first mask."""
    from llguidance import LLMatcher

    m = LLMatcher(_byte_lltokenizer(), grammar, log_level=0)
    if not m.is_error():
        m.compute_bitmask()
    if m.is_error():
        why = matcher_error(m)
        if why == NO_EXTENSION:
            why = "no text matches it (a rule or reference that never reaches plain text)"
        raise UserError(f"the {what} can never be satisfied: {why}; nothing could be generated")


NO_EXTENSION = "no text it allows can follow"


def matcher_error(m) -> str:
    """An llguidance matcher's error on one line (it appends its whole state to some errors)."""
    msg = (m.get_error() or "").strip().splitlines()
    first = msg[0] if msg else "llguidance stopped"
    return NO_EXTENSION if first.startswith("NoExtension") else first


def _one_line(msg: str) -> str:
    """llguidance's multi-line report (source excerpt, caret, ``error: ...``) as its first line and the error."""
    lines = [line.strip() for line in msg.strip().splitlines() if line.strip()]
    detail = next((line[len("error:"):].strip() for line in lines[1:] if line.startswith("error:")), None)
    return f"{lines[0]} {detail}" if lines and detail else (lines[0] if lines else msg)


def read_schema(path: str) -> dict:
    """Load a JSON Schema file, with clear errors for a missing or unparsable file."""
    p = existing_file(path, "JSON schema file")
    try:
        schema = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse JSON schema {path!r}: {e}") from e
    check_schema(schema, path)
    return schema


def check_schema(schema: Any, where: str = "the JSON schema") -> None:
    """Raise UserError unless ``schema`` is a valid JSON Schema (checked with ``jsonschema``)."""
    if not isinstance(schema, (dict, bool)):
        raise UserError(f"{where} must be a JSON object, got {type(schema).__name__}")
    try:
        import jsonschema
    except ImportError:
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise UserError(f"{where} is not a valid JSON Schema: {e.message}") from e


def read_grammar(path: str) -> str:
    """A Lark grammar file (``.lark``) or a GBNF one (``.gbnf``, converted by llguidance)."""
    p = existing_file(path, "grammar file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"grammar file {path!r} is not UTF-8 text") from None
    if p.suffix.lower() == ".gbnf":
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            text = gbnf_to_lark(text)
        except Exception as e:  # the converter raises plain exceptions on syntax errors
            raise UserError(f"cannot convert GBNF grammar {path!r}: {e}") from e
    return text


def regex_plan(regex: str, table: TokenTable, encode=None) -> RegexPlan | None:
    """The regex's budget plan, or None when its DFA cannot be built here (too big, or syntax that
    interegular does not know, such as ``\\p{L}``): llguidance alone then decides, as for Lark grammars."""
    def build() -> RegexPlan | None:
        try:
            return RegexPlan(regex, table, encode)
        except Exception:  # interegular raises many kinds of errors for syntax it does not support
            return None

    plans = table.memo("regexplans", dict)  # per tokenizer, reused by later requests
    key = (regex, encode is not None)
    if key not in plans:
        if len(plans) >= 16:  # a long-lived process meeting many patterns keeps the newest
            del plans[next(iter(plans))]
        plans[key] = build()
    return plans[key]


class Grammar(Constraint):
    """The text must match an llguidance grammar; EOS only when the grammar accepts."""

    stages = frozenset({"mask", "accept", "force"})

    def __init__(
        self, tok: Tokenizer, table: TokenTable, grammar: str, label: str = "grammar", fast_forward: bool = True,
        regex: str | None = None,
    ) -> None:
        super().__init__(table)
        self.grammar, self.label, self.fast_forward = grammar, label, fast_forward
        if not fast_forward:
            self.stages = self.stages - {"force"}
        self.llt = lltokenizer(tok, table)
        self.words = (table.size + 31) // 32
        self.pending: list[Future | None] = []  # per row: the next mask, being computed by _POOL
        self.plan = regex_plan(regex, table, lambda text: tok.encode(text, add_bos=False)) if regex is not None else None
        self.rows: RowPlans | None = None

    def __repr__(self) -> str:
        return f"Grammar({self.label})"

    def reset(self, state: LoopState) -> None:
        from llguidance import LLMatcher

        for fut in self.pending:  # masks a previous call started and never used
            if fut is not None:
                fut.result()

        first = LLMatcher(self.llt, self.grammar, log_level=0)
        if first.is_error():
            raise UserError(f"invalid {self.label}: {matcher_error(first)}")
        self.matchers = [first] + [first.deep_copy() for _ in range(state.batch_size - 1)]
        self.bitmask = np.zeros((state.batch_size, self.words), dtype=np.int32)
        self.pending = [None] * state.batch_size
        opening = first.compute_ff_tokens() if self.fast_forward else []
        self.ff: list[list[int]] = [list(opening) for _ in range(state.batch_size)]
        self.rows = RowPlans(self.plan, state.batch_size) if self.plan is not None else None

    @staticmethod
    def _compute(m, row: np.ndarray) -> None:
        m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def allowed(self, state: LoopState, b: int) -> torch.Tensor:
        m, fut = self.matchers[b], self.pending[b]
        if fut is not None:  # wait before touching the matcher: the worker may still hold it
            self.pending[b] = None
            fut.result()
        if m.is_error():
            raise UserError(f"the {self.label} cannot continue: {matcher_error(m)}")
        if fut is None:
            self._compute(m, self.bitmask[b])
            if m.is_error():  # the text so far has no continuation the grammar allows
                raise UserError(f"the {self.label} cannot continue: {matcher_error(m)}")
        bits = np.unpackbits(self.bitmask[b].view(np.uint8), bitorder="little")[: self.table.size]
        allowed = torch.from_numpy(bits).view(torch.bool)
        keep = self.rows.allowed(b, self.steps_left(state)) if self.rows is not None else None
        if keep is not None and bool((narrowed := allowed & keep).any()):
            return narrowed  # a regex near the end of the budget: only tokens that leave room to finish
        return allowed

    def on_token(self, state: LoopState, tokens: torch.Tensor) -> None:
        # The next mask depends only on the text so far: start computing it now, so llguidance
        # works while the model runs its forward pass (both release the GIL).
        for b, t in enumerate(tokens.tolist()):
            if not state.finished[b]:
                if self.rows is not None and t not in self.table.eos_ids:
                    self.rows.feed(b, self.table.tokens[t] if 0 <= t < self.table.size else b"")
                m = self.matchers[b]
                m.consume_token(t)
                if not m.is_error() and not m.is_stopped():
                    # llguidance's fast-forward tokens: the grammar's fixed text from here, in its
                    # canonical tokenization (a microsecond; the matcher is not busy yet)
                    self.ff[b] = m.compute_ff_tokens() if self.fast_forward else []
                    self.pending[b] = _POOL.submit(self._compute, m, self.bitmask[b])
                else:
                    self.ff[b] = []

    def forced(self, state: LoopState) -> list[list[int]]:
        """``force``: the grammar's fixed text after the last token (e.g. ``","age":`` in a schema)."""
        out, self.ff = self.ff, [[] for _ in range(state.batch_size)]
        if self.rows is not None and state.max_tokens is not None:
            # forced tokens skip the mask: none may fall in the last steps, where a regex's plan chooses
            free = max(0, state.max_tokens - state.confirmed - self.plan.longest)
            out = [ff[:free] if self.rows.planned(b) else ff for b, ff in enumerate(out)]
        return out

    def accepting(self, b: int) -> bool:
        fut = self.pending[b]
        if fut is not None:
            fut.result()
        return self.matchers[b].is_accepting()

    def unfinished(self, b: int) -> str | None:
        """The label (``regex``, ``JSON schema``, ``grammar``) unless row b's text is complete."""
        if b >= len(getattr(self, "matchers", ())):
            return None
        return None if self.accepting(b) or self.matchers[b].is_stopped() else self.label
