"""tokensteer: control what a language model generates, token by token, at inference time.

    import tokensteer as ts
    lm = ts.load()                                  # the bundled Gemma 3 270M
    print(ts.generate(lm, "The lighthouse keeper", max_tokens=32).text)
"""

from __future__ import annotations

import os

# Nothing is ever downloaded from a model hub: a missing file must fail loudly, not fetch.
for _flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_flag] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokensteer.allocator import keep_freed_memory  # noqa: E402
from tokensteer.openmp import bound_spinning  # noqa: E402

bound_spinning()  # before torch loads the OpenMP runtime, which reads it once
keep_freed_memory()  # each step's megabyte tensors are reused instead of faulted in again

from tokensteer.api import generate, load, stream  # noqa: E402
from tokensteer.errors import UserError  # noqa: E402
from tokensteer.hooks import Control, ResidualEdit  # noqa: E402
from tokensteer.engine import Engine, Generation, TokenEvent  # noqa: E402
from tokensteer.sampling import SamplingConfig  # noqa: E402

__all__ = [
    "Control",
    "Engine",
    "Generation",
    "ResidualEdit",
    "SamplingConfig",
    "TokenEvent",
    "UserError",
    "generate",
    "load",
    "stream",
]
__version__ = "0.1.0"
