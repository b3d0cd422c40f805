"""Chat messages as one prompt: the model's own chat template when its tokenizer has one (a
Hugging Face folder's ``chat_template``, a GGUF's ``tokenizer.chat_template``), else the plain
template below, which a base model continues naturally.

Plain template (one line per message; the reply is cut at the next ``\\nUser:``)::

    System: {system text}
    User: {user text}
    Assistant: {assistant text}
    User: {user text}
    Assistant:
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Sequence

from tokensteer.errors import UserError

if TYPE_CHECKING:
    from tokensteer.backends.base import Backend

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = "\nUser:"


def template_of(lm: Backend) -> str | None:
    """The chat template the model ships with, or None."""
    hf = getattr(lm.tokenizer, "hf", None)
    if hf is not None:
        return getattr(hf, "chat_template", None) or None
    model = getattr(lm, "model", None)
    if model is None:
        return None
    try:
        import llama_cpp
    except ImportError:
        return None
    size = 1 << 16
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(model, b"tokenizer.chat_template", buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", errors="replace") or None
        size = n + 1


def plain(messages: Sequence[dict]) -> str:
    lines = [f"{ROLES[m['role']]}: {m['content']}" for m in messages]
    if messages[-1]["role"] == "assistant":  # continue the assistant's unfinished turn
        return "\n".join(lines)
    return "\n".join(lines + ["Assistant:"])


def render(template: str, messages: Sequence[dict], bos: str, eos: str) -> str:
    """A Jinja chat template in a sandbox, as transformers renders one."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        raise UserError(f"the model's chat template refused these messages: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=True, bos_token=bos, eos_token=eos)
    except TemplateError as e:
        raise UserError(f"the model's chat template failed on these messages: {e}") from None


def chat_prompt(lm: Backend, messages: Sequence[dict]) -> tuple[str, tuple[str, ...]]:
    """The prompt for ``messages`` ({"role", "content"} with text content) and the stop strings the
    template needs (the plain template stops at the next user turn; a real template ends its turn
    with an end-of-turn token the model's EOS set holds)."""
    template = template_of(lm)
    if template is None:
        return plain(messages), (PLAIN_STOP,)
    tok = lm.tokenizer
    hf = getattr(tok, "hf", None)
    bos = (hf.bos_token if hf is not None else tok.token_text(tok.bos_id) if tok.bos_id is not None else "") or ""
    eos_id = min(tok.eos_ids) if tok.eos_ids else None
    eos = (hf.eos_token if hf is not None else tok.token_text(eos_id) if eos_id is not None else "") or ""
    text = render(template, messages, bos, eos)
    if bos and text.startswith(bos):  # encode adds the BOS token itself
        text = text[len(bos):]
    return text, ()
