"""The Python entry points: load a model once, then generate or stream with any controls."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

from tokensteer.backends import Backend, load_backend
from tokensteer.errors import UserError
from tokensteer.hooks import Control
from tokensteer import engine
from tokensteer.engine import Generation, TokenEvent
from tokensteer.models import resolve
from tokensteer.openmp import release_pool
from tokensteer.sampling import SamplingConfig


def load(
    model: str | None = None,
    backend: str = "auto",
    dtype: str = "float32",
    progress: Callable[[str], None] | None = None,
    needs: frozenset[str] = frozenset(),
    kv_select: str | dict | bool | None = None,
) -> Backend:
    """Load a model: None for the bundled Gemma 3 270M, else a local HF folder or GGUF file.

    ``needs`` lists backend capabilities the caller's controls require; ``backend="auto"`` then
    picks the fastest backend that has them all. ``kv_select`` turns on TokenSelect for long
    prompts (True for the defaults, or ``"k=2048,local=512"``: docs/longcontext.md); it runs in
    transformers' attention, so it loads the torch backend.
    """
    from tokensteer.kvselect import parse_kv_select

    cfg = parse_kv_select(kv_select)
    if cfg is not None:
        if backend == "llamacpp":
            raise UserError("kv_select runs in transformers' attention: use backend='torch' (or 'auto')")
        backend = "torch"
    lm = load_backend(resolve(model), backend, dtype, progress, needs)
    release_pool()  # the backend's checks ran parallel work here; generation runs on the engine's thread
    if cfg is not None:
        lm.set_kv_select(cfg)
    return lm


def _config(cfg: SamplingConfig | None, kw: dict) -> SamplingConfig:
    if "stop" in kw and isinstance(kw["stop"], str):
        kw["stop"] = (kw["stop"],)
    elif "stop" in kw:
        kw["stop"] = tuple(kw["stop"])
    return SamplingConfig(**kw) if cfg is None else cfg


def generate(
    lm: Backend,
    prompt: str | Sequence[str],
    cfg: SamplingConfig | None = None,
    controls: Sequence[Control] = (),
    *,
    byte_level: bool = False,
    byte_formula: str | None = None,
    **sampling,
) -> Generation | list[Generation]:
    """Generate a continuation (or one per prompt, batched); ``sampling`` fills a SamplingConfig.

    ``byte_level=True`` samples byte by byte from the exact next-byte distribution (a prompt may
    end mid-word; ``max_tokens`` then counts characters); ``byte_formula`` combines the byte
    distributions of models with different tokenizers (see docs/bytes.md)."""
    cfg = _config(cfg, sampling)
    if byte_level or byte_formula is not None:
        out = engine.generate_bytes(lm, prompt, cfg, controls, byte_formula)
    else:
        out = engine.generate(lm, prompt, cfg, controls)
    return out[0] if isinstance(prompt, str) else out


def stream(
    lm: Backend,
    prompt: str | Sequence[str],
    cfg: SamplingConfig | None = None,
    controls: Sequence[Control] = (),
    *,
    byte_level: bool = False,
    byte_formula: str | None = None,
    **sampling,
) -> Iterator[TokenEvent]:
    """Yield tokens as they are chosen; ``event.index`` says which prompt each belongs to (with
    ``byte_level``, one event per byte: see ``generate``)."""
    cfg = _config(cfg, sampling)
    if byte_level or byte_formula is not None:
        return engine.stream_bytes(lm, prompt, cfg, controls, byte_formula)
    return engine.stream(lm, prompt, cfg, controls)
