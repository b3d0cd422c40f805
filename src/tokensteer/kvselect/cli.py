"""What ``--kv-select`` does on the command line: check it, pick the backend that runs it, say why."""

from __future__ import annotations

from rich.console import Console

from tokensteer.errors import UserError
from tokensteer.kvselect.config import KVSelectConfig, parse_kv_select

def choose(spec: str | None, backend: str, console: Console) -> tuple[KVSelectConfig | None, str]:
    """The parsed ``--kv-select`` and the backend to load: TokenSelect runs in transformers'
    attention, so ``auto`` becomes torch (saying so) and ``llamacpp`` is refused."""
    cfg = parse_kv_select(spec)
    if cfg is None:
        return None, backend
    if backend == "llamacpp":
        raise UserError("--kv-select runs on the torch backend only (llama.cpp's attention runs inside its own graph); use --backend torch or auto")
    if backend == "auto":
        console.print(
            "[dim]--kv-select runs on the torch backend: llama.cpp cannot select KV entries inside its graph "
            "(dense llama.cpp, without --kv-select, is often faster end to end; see docs/longcontext.md)[/]",
            highlight=False,
        )
    return cfg, "torch"


def apply(lm, cfg: KVSelectConfig | None, console: Console) -> None:
    """Turn ``cfg`` on for the loaded backend, and show a progress bar while long prompts are read."""
    from tokensteer.kvselect.progress import prefill_bar

    if cfg is not None:
        lm.set_kv_select(cfg)
    if hasattr(lm, "progress"):
        lm.progress = prefill_bar(console)
