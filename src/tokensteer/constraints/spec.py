"""A constraint request as one value (from CLI flags or a YAML/JSON spec), checked for mistakes and
contradictions before any decoding starts, then built into Controls for a loaded model.

Spec keys (YAML/JSON): ban, require, require_within, words, sentences, end_word, regex,
json_schema (a file path or an inline schema), grammar (a .lark/.gbnf file), script, script_soft,
vocab (a file path or a list of words); fast_forward (default true: feed a grammar's fixed text
in one forward pass); plan (``smc``, the default, or ``mask``: how word counts and end words are
met, see ``tokensteer.constraints.smc``) and particles (how many texts the plan weighs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokensteer.errors import UserError

KEYS = (
    "ban", "require", "require_within", "words", "sentences", "end_word", "regex",
    "json_schema", "grammar", "script", "script_soft", "vocab",
)  # fmt: skip
#: options that say how constraints are met, not what they are
OPTIONS = ("fast_forward", "plan", "particles")
#: how word counts and end words are met
PLANS = ("smc", "mask")


@dataclass
class ConstraintSpec:
    """Every hard constraint a request can ask for; empty means none."""

    ban: list[str] = field(default_factory=list)
    require: list[str] = field(default_factory=list)
    require_within: int | None = None
    words: int | None = None
    sentences: int | None = None
    end_word: str | None = None
    regex: str | None = None
    json_schema: Any = None  # a parsed schema
    grammar: str | None = None  # Lark text
    script: list[str] = field(default_factory=list)
    script_soft: float | None = None
    vocab: list[str] | None = None
    fast_forward: bool = True  # a grammar's fixed text goes to the model in one pass (hook 7)
    plan: str = "smc"  # word counts and end words: "smc" plans whole texts, "mask" masks token by token
    particles: int = 8  # texts the plan weighs per prompt

    def empty(self) -> bool:
        return not any(getattr(self, k) not in (None, [], ()) for k in KEYS)


def _list(v: Any, key: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return list(v)
    raise UserError(f"constraint {key!r} must be a word or a list of words, got {v!r}")


def _int(v: Any, key: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"constraint {key!r} must be a whole number, got {v!r}")
    return v


def from_mapping(d: dict) -> ConstraintSpec:
    """Build a spec from a YAML/JSON mapping (file paths are read here)."""
    from tokensteer.constraints.grammar import check_schema, read_grammar, read_schema
    from tokensteer.constraints.wordlist import read_wordlist

    if not isinstance(d, dict):
        raise UserError(f"a constraints spec must be a mapping of {', '.join(KEYS)}; got {type(d).__name__}")
    d = {("require" if k == "keywords" else k): v for k, v in d.items()}
    unknown = sorted(set(d) - set(KEYS) - set(OPTIONS))
    if unknown:
        raise UserError(f"unknown constraint {unknown[0]!r}; known: {', '.join(KEYS)}")
    schema = d.get("json_schema")
    if isinstance(schema, str):
        schema = read_schema(schema)
    elif schema is not None:
        check_schema(schema)
    vocab = d.get("vocab")
    if isinstance(vocab, str):
        vocab = read_wordlist(vocab)
    elif vocab is not None:
        vocab = _list(vocab, "vocab")
    soft = d.get("script_soft")
    if soft is not None and (isinstance(soft, bool) or not isinstance(soft, (int, float))):
        raise UserError(f"constraint 'script_soft' must be a number between 0 and 1, got {soft!r}")
    end = d.get("end_word")
    if end is not None and not isinstance(end, str):
        raise UserError(f"constraint 'end_word' must be a word, got {end!r}")
    regex = d.get("regex")
    if regex is not None and not isinstance(regex, str):
        raise UserError(f"constraint 'regex' must be a string, got {regex!r}")
    grammar = d.get("grammar")
    ff = d.get("fast_forward", True)
    if not isinstance(ff, bool):
        raise UserError(f"'fast_forward' must be true or false, got {ff!r}")
    plan = d.get("plan", "smc")
    if plan not in PLANS:
        raise UserError(f"'plan' must be one of {', '.join(PLANS)}, got {plan!r}")
    particles = d.get("particles", 8)
    if isinstance(particles, bool) or not isinstance(particles, int) or not 1 <= particles <= 256:
        raise UserError(f"'particles' must be a whole number from 1 to 256, got {particles!r}")
    return ConstraintSpec(
        ban=_list(d.get("ban"), "ban"),
        require=_list(d.get("require"), "require"),
        require_within=_int(d.get("require_within"), "require_within"),
        words=_int(d.get("words"), "words"),
        sentences=_int(d.get("sentences"), "sentences"),
        end_word=end,
        regex=regex,
        json_schema=schema,
        grammar=read_grammar(grammar) if grammar is not None else None,
        script=_list(d.get("script"), "script"),
        script_soft=float(soft) if soft is not None else None,
        vocab=vocab,
        fast_forward=ff,
        plan=plan,
        particles=particles,
    )


def check(spec: ConstraintSpec) -> None:
    """Raise UserError for mistakes and contradictions that need no model."""
    from tokensteer.constraints.banned import normalize_phrase
    from tokensteer.constraints.grammar import grammar_for
    from tokensteer.constraints.keywords import found

    for name in ("words", "sentences", "require_within"):
        v = getattr(spec, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    for w in spec.ban:
        if not normalize_phrase(w):
            raise UserError("a banned word is empty; give the word or phrase to ban")
    for w in spec.require:
        if not normalize_phrase(w):
            raise UserError("a required word is empty; give the word to require")
    if spec.end_word is not None and (not spec.end_word.strip() or len(spec.end_word.split()) != 1):
        raise UserError(f"--end-word must be one word without spaces, got {spec.end_word!r}")
    if spec.end_word is not None:
        from tokensteer.constraints.counts import has_letter

        if not has_letter(spec.end_word.encode("utf-8")):
            raise UserError(f"--end-word must hold a letter or digit to count as a word, got {spec.end_word!r}")
    needed = [("required word", w) for w in spec.require]
    if spec.end_word:
        needed.append(("end word", spec.end_word.strip()))
    for what, w in needed:
        for b in spec.ban:
            if found(b, w):
                raise UserError(f"the {what} {w!r} is banned (--ban {b!r}): the constraints contradict each other")
    n_kw = sum(len(normalize_phrase(w).split()) for w in spec.require)
    end_extra = 1 if spec.end_word and spec.end_word.strip().lower() not in {normalize_phrase(w).lower() for w in spec.require} else 0
    if spec.words is not None and spec.words < n_kw + end_extra:
        raise UserError(
            f"--words {spec.words} is too few for the required words ({n_kw}) and the end word ({end_extra})"
        )
    if spec.require_within is not None:
        if not spec.require:
            raise UserError("--require-within needs at least one --require word")
        if spec.require_within < n_kw:
            raise UserError(f"the required words need {n_kw} words but must appear within {spec.require_within}")
    if spec.words is not None and spec.sentences is not None and spec.words < spec.sentences:
        raise UserError(f"--words {spec.words} cannot make {spec.sentences} sentences (each needs a word)")
    if spec.sentences is not None and spec.end_word and spec.end_word.strip()[-1] not in ".!?":
        raise UserError("--end-word and --sentences contradict: the text must end with the end word and with . ! or ?")
    if spec.script_soft is not None and not spec.script:
        raise UserError("--script-soft needs --script to say which scripts to prefer")
    if spec.script_soft is not None and not 0 <= spec.script_soft < 1:  # 0: other scripts banned, as without it
        raise UserError(f"--script-soft must be a factor between 0 and 1 (e.g. 0.1), got {spec.script_soft:g}")
    if spec.regex == "":
        raise UserError("--regex is empty; give a pattern the whole output must match, e.g. --regex '[A-Z][a-z]+'")
    kinds = [spec.regex is not None, spec.json_schema is not None, spec.grammar is not None]
    if sum(kinds) > 1:
        raise UserError("give only one of --regex, --json-schema and --grammar")
    if spec.json_schema is not None:
        from tokensteer.constraints.grammar import check_schema

        check_schema(spec.json_schema)
    if sum(kinds) == 1:
        grammar_for(spec.regex, spec.json_schema, spec.grammar)
    if spec.script:
        from tokensteer.constraints.script import ALWAYS, script_names

        names = script_names(spec.script)
        if spec.script_soft is None:
            import regex

            ok = regex.compile("[" + "".join(rf"\p{{Script={s}}}" for s in (*names, *ALWAYS)) + "]*")
            for what, w in needed:
                if not ok.fullmatch(w):
                    raise UserError(f"the {what} {w!r} is not written in {', '.join(names)} (--script)")
    if spec.vocab is not None:
        from tokensteer.constraints.wordlist import is_letter, split_runs

        listed = {w.strip().lower().encode() for w in spec.vocab}
        for what, w in needed:
            for is_word, run in split_runs(w.lower().encode("utf-8")):
                if is_word and run not in listed:
                    raise UserError(f"the {what} {w!r} is not in the word list (--vocab)")
        del is_letter


def build(lm, spec: ConstraintSpec) -> list:
    """Check ``spec`` and build one combined Control for ``lm`` (an empty list for no constraints)."""
    from tokensteer.constraints.base import AllOf
    from tokensteer.constraints.vocab import token_table

    check(spec)
    if spec.empty():
        return []
    table = token_table(lm.tokenizer)
    if spec.plan == "smc" and (spec.words is not None or spec.end_word):
        from tokensteer.constraints.smc import SMCPlanner

        return [SMCPlanner(lambda: AllOf(parts(lm, spec, table), table), spec.particles)]
    return [AllOf(parts(lm, spec, table), table)]


def parts(lm, spec: ConstraintSpec, table) -> list:
    """One Control per kind of constraint in ``spec`` (already checked)."""
    tok = lm.tokenizer
    parts = []
    if spec.ban:
        from tokensteer.constraints.banned import BannedWords

        parts.append(BannedWords(table, spec.ban))
    if spec.words is not None or spec.end_word:
        from tokensteer.constraints.counts import ExactWords

        parts.append(ExactWords(table, spec.words, spec.end_word))
    if spec.sentences is not None:
        from tokensteer.constraints.counts import ExactSentences

        parts.append(ExactSentences(table, spec.sentences))
    if spec.require:
        from tokensteer.constraints.keywords import RequiredWords

        within = spec.require_within
        if spec.words is not None:  # the end word takes the last place unless it is a keyword
            last = spec.words - (1 if spec.end_word and spec.end_word.lower() not in {k.lower() for k in spec.require} else 0)
            within = min(within or last, last)
        parts.append(RequiredWords(tok, table, spec.require, within))
    if spec.script:
        from tokensteer.constraints.script import ScriptOnly, ScriptPreference

        parts.append(ScriptPreference(table, spec.script, spec.script_soft) if spec.script_soft else ScriptOnly(table, spec.script))
    if spec.vocab is not None:
        from tokensteer.constraints.wordlist import WordList

        parts.append(WordList(table, spec.vocab))
    if spec.regex is not None or spec.json_schema is not None or spec.grammar is not None:
        from tokensteer.constraints.grammar import Grammar, grammar_for

        label = "regex" if spec.regex is not None else "JSON schema" if spec.json_schema is not None else "grammar"
        from tokensteer.constraints.regexplan import schema_regex

        grammar = grammar_for(spec.regex, spec.json_schema, spec.grammar)
        plan = spec.regex if spec.regex is not None else schema_regex(spec.json_schema) if spec.json_schema is not None else None
        parts.append(Grammar(tok, table, grammar, label, spec.fast_forward, regex=plan))
    return parts
