"""The Python entry points: load a model once, then generate or stream with any controls."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

from tokensteer.backends import Backend, load_backend
from tokensteer.hooks import Control
from tokensteer import engine
from tokensteer.engine import Generation, TokenEvent
from tokensteer.models import resolve
from tokensteer.sampling import SamplingConfig


def load(
    model: str | None = None,
    backend: str = "auto",
    dtype: str = "float32",
    progress: Callable[[str], None] | None = None,
    needs: frozenset[str] = frozenset(),
) -> Backend:
    """Load a model: None for the bundled Gemma 3 270M, else a local HF folder or GGUF file.

    ``needs`` lists backend capabilities the caller's controls require; ``backend="auto"`` then
    picks the fastest backend that has them all.
    """
    return load_backend(resolve(model), backend, dtype, progress, needs)


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
    **sampling,
) -> Generation | list[Generation]:
    """Generate a continuation (or one per prompt, batched); ``sampling`` fills a SamplingConfig."""
    out = engine.generate(lm, prompt, _config(cfg, sampling), controls)
    return out[0] if isinstance(prompt, str) else out


def stream(
    lm: Backend,
    prompt: str | Sequence[str],
    cfg: SamplingConfig | None = None,
    controls: Sequence[Control] = (),
    **sampling,
) -> Iterator[TokenEvent]:
    """Yield tokens as they are chosen; ``event.index`` says which prompt each belongs to."""
    return engine.stream(lm, prompt, _config(cfg, sampling), controls)
