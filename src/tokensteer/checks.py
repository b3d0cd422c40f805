"""Checks at the Python entry points (``ts.generate``, ``ts.stream``): a wrong type there is a
one-line UserError naming the argument, not a TypeError or AttributeError from deep inside."""

from __future__ import annotations

from typing import Any

from tokensteer.errors import UserError
from tokensteer.hooks import Control
from tokensteer.sampling import SamplingConfig


def check_request(prompts: Any, cfg: Any, controls: Any) -> tuple[list[str], SamplingConfig, list[Control]]:
    """Validate and normalise a request: the prompt as a list of strings (one string is a batch of
    one), the SamplingConfig (None is the default one), the controls as a list of Controls."""
    return check_prompts(prompts), check_config(cfg), check_controls(controls)


def check_prompts(prompts: Any) -> list[str]:
    """A prompt string, or a non-empty list or tuple of them, each valid Unicode text."""
    if isinstance(prompts, str):
        plist = [prompts]
    elif isinstance(prompts, (list, tuple)):
        plist = list(prompts)
        if not plist:
            raise UserError("the list of prompts is empty; give a prompt string or a non-empty list of them")
    else:
        raise UserError(f"the prompt must be a string or a list of strings, got {_kind(prompts)}")
    for i, p in enumerate(plist):
        where = "the prompt" if isinstance(prompts, str) else f"prompt {i}"
        if not isinstance(p, str):
            raise UserError(f"{where} must be a string, got {_kind(p)}")
        try:
            p.encode("utf-8")
        except UnicodeError:
            raise UserError(f"{where} is not valid Unicode text (it holds lone surrogates)") from None
    return plist


def check_config(cfg: Any) -> SamplingConfig:
    """A SamplingConfig (checked when it was made); None means the defaults."""
    if cfg is None:
        return SamplingConfig()
    if not isinstance(cfg, SamplingConfig):
        raise UserError(
            f"cfg must be a tokensteer.SamplingConfig, got {_kind(cfg)}; or pass sampling options as keywords (max_tokens=32)"
        )
    return cfg


def check_controls(controls: Any) -> list[Control]:
    """A list or tuple of tokensteer Controls (None or empty: plain decoding)."""
    if controls is None:
        return []
    if isinstance(controls, Control):
        raise UserError("controls must be a list of Controls; wrap the one you have in a list: controls=[control]")
    if not isinstance(controls, (list, tuple)):
        raise UserError(f"controls must be a list of tokensteer Controls, got {_kind(controls)}")
    for i, c in enumerate(controls):
        if not isinstance(c, Control):
            raise UserError(
                f"controls[{i}] is {_kind(c)}, not a tokensteer Control (subclass tokensteer.hooks.Control, or build "
                "them with tokensteer.controls.build_controls)"
            )
    return list(controls)


def _kind(x: Any) -> str:
    """How a message names a wrong value: a short plain value itself, anything else by its type."""
    if x is None or (isinstance(x, (int, float, str, bytes)) and len(repr(x)) <= 40):
        return repr(x)
    name = type(x).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"
