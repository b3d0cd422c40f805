"""Backends behind the decode loop, and the choice between them.

``torch`` runs any local Hugging Face model (or GGUF through transformers) with every hook;
``llamacpp`` runs GGUF files (the bundled model included) faster but can only add
steering vectors; ``auto`` picks llamacpp when it is installed, can load the model and has every
capability the request needs, else torch. The llama.cpp settings (``TOKENSTEER_N_CTX``,
``TOKENSTEER_THREADS``) are checked whichever backend runs.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

from tokensteer.backends.base import HEAD_MIX, HIDDEN_STATES, LOAD_HF, RESIDUAL_ADD, RESIDUAL_FIRST, RESIDUAL_FN, Backend, Session, Tokenizer
from tokensteer.errors import UserError
from tokensteer.models import ModelSource, bundled_gguf, ensure_bundled

BACKENDS = ("auto", "torch", "llamacpp")
LLAMACPP_CAPABILITIES = frozenset({RESIDUAL_ADD, HEAD_MIX})  # mixing runs a head-only model, or mixes logits

#: what each capability lets a control do, for error messages
CAPABILITY_TEXT = {
    RESIDUAL_ADD: "add steering vectors",
    RESIDUAL_FN: "run per-row, per-position or non-additive residual edits",
    RESIDUAL_FIRST: "steer layer 0 (llama.cpp control vectors start at layer 1)",
    HIDDEN_STATES: "read hidden states (steering-vector training, probes)",
    LOAD_HF: "load a Hugging Face model folder (a formula's other model; give a .gguf file instead)",
    "kv_select": "select KV entries per step (TokenSelect runs in transformers' attention)",
}

Progress = Callable[[str], None]


def env_n_ctx() -> int | None:
    """``$TOKENSTEER_N_CTX`` (llama.cpp KV cells per session), None when unset; a bad value is a UserError."""
    return env_whole_number("TOKENSTEER_N_CTX", 64)


def env_threads() -> int | None:
    """``$TOKENSTEER_THREADS`` (llama.cpp threads), None when unset; a bad value is a UserError."""
    return env_whole_number("TOKENSTEER_THREADS", 1)


def env_whole_number(name: str, least: int) -> int | None:
    """The environment variable ``name`` as a whole number ≥ ``least``; None when unset or empty."""
    env = os.environ.get(name)
    if not env:
        return None
    if not env.strip().isdigit() or int(env) < least:
        raise UserError(f"{name} must be a whole number ≥ {least}, got {env!r}")
    return int(env)


def llamacpp_installed() -> bool:
    """True when llama-cpp-python can be imported."""
    return importlib.util.find_spec("llama_cpp") is not None


def _llamacpp_reason(source: ModelSource, dtype: str, needs: frozenset[str]) -> str | None:
    """Why the llamacpp backend cannot serve this request, or None if it can."""
    if not llamacpp_installed():
        return "llama-cpp-python is not installed (`make install` builds it, about 7 minutes)"
    missing = needs - LLAMACPP_CAPABILITIES
    if missing:
        what = ", ".join(CAPABILITY_TEXT.get(m, m) for m in sorted(missing))
        return f"the llamacpp backend cannot {what}"
    if source.kind != "gguf" and not source.bundled:
        return f"the llamacpp backend loads .gguf files and {source.path} is a Hugging Face folder"
    if dtype != "float32":
        return f"--dtype {dtype} applies to the torch backend only (llama.cpp uses the GGUF's own types)"
    return None


def choose_backend(source: ModelSource, name: str = "auto", dtype: str = "float32", needs: frozenset[str] = frozenset()) -> str:
    """The backend that will run: ``torch`` or ``llamacpp``; a UserError if the forced one cannot."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "torch":
        return "torch"
    why = _llamacpp_reason(source, dtype, needs)
    if why is None:
        return "llamacpp"
    if name == "llamacpp":
        raise UserError(f"{why}; use --backend torch or --backend auto")
    return "torch"


def load_backend(
    source: ModelSource,
    name: str = "auto",
    dtype: str = "float32",
    progress: Progress | None = None,
    needs: frozenset[str] = frozenset(),
) -> Backend:
    """Load ``source`` on the named backend (``auto``: the fastest one installed that can run it)."""
    env_n_ctx(), env_threads()  # bad settings are errors whichever backend runs
    if choose_backend(source, name, dtype, needs) == "llamacpp":
        from tokensteer.backends.llamacpp import LlamaCppBackend
        from tokensteer.backends.llamacpp.context import CannotLoad

        path = bundled_gguf(progress) if source.bundled else source.path
        if progress:
            progress(f"loading {source.name} in llama.cpp")
        try:
            return LlamaCppBackend.load(path, source.name)
        except CannotLoad:  # only an unloadable file; other errors (settings, memory) are the user's to see
            if name == "llamacpp":
                raise
            if progress:  # auto: llama.cpp may not know this architecture; transformers might
                progress("llama.cpp cannot load this GGUF; trying transformers")
    from tokensteer.backends.torch import TorchBackend

    if source.bundled:
        source = ModelSource("hf", ensure_bundled(progress), source.name, bundled=True)
    return TorchBackend.load(source, dtype)


__all__ = ["BACKENDS", "Backend", "Session", "Tokenizer", "choose_backend", "llamacpp_installed", "load_backend"]
