"""Other local models in a formula (``M(model="path")``): loaded once, checked to share the tokenizer."""

from __future__ import annotations

from tokensteer.backends.base import Backend
from tokensteer.errors import UserError

_OTHERS: dict[tuple[int, str], Backend] = {}  # (id of the loaded model, path): the other model


def load_other(lm: Backend, path: str) -> Backend:
    """Load another local model once per process, on the same kind of backend, same tokenizer."""
    key = (id(lm), path)
    if key not in _OTHERS:
        import tokensteer

        other = tokensteer.load(path, backend=lm.name)
        why = tokenizer_mismatch(lm, other)
        if why:
            raise UserError(f"the model {path} cannot be combined with {lm.model_name} token by token: {why}; "
                            "combine them byte by byte with --byte-level (tokensteer.bytes)")
        _OTHERS[key] = other
    return _OTHERS[key]


def tokenizer_mismatch(a: Backend, b: Backend) -> str | None:
    """Why two models' tokenizers differ (formulas mix distributions token by token), or None."""
    ta, tb = a.tokenizer, b.tokenizer
    probes = ["Hello, world! The café's naïve résumé: 1234 ünïcödé — 東京 😀", "  def f(x):\n\treturn x"]
    for s in probes:
        if ta.encode(s) != tb.encode(s):
            return "their tokenizers split text differently (every term must share one vocabulary)"
    n = min(ta.vocab_size, tb.vocab_size)
    step = max(1, n // 500)
    for i in range(0, n, step):
        if ta.token_text(i) != tb.token_text(i):
            return f"token {i} is {ta.token_text(i)!r} in one and {tb.token_text(i)!r} in the other"
    return None
