"""What a request's controls can read while the engine decodes it."""

from __future__ import annotations

import torch

from tokensteer.backends.base import Backend
from tokensteer.hooks import Control
from tokensteer.sampling import SamplingConfig


class LoopState:
    """One request's view of the running batch: its prompts, their rows and what they generated.

    Controls see only their own request, as if it ran alone: ``batch_size`` is its number of
    prompts, ``rows`` its [B, R, V] log-probabilities, whatever else shares the forward pass.
    """

    def __init__(self, backend: Backend, prompts: list[list[int]], rows_per_prompt: int) -> None:
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.prompt_tokens = prompts
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.finished = [False] * len(prompts)
        self.rows_per_prompt = rows_per_prompt
        self._logits: torch.Tensor | None = None  # [B * R, V] raw logits of this step
        self._rows: torch.Tensor | None = None
        self.step = 0
        self.forward_calls = 0
        self.offsets: dict[int, int] = {}  # id(control) -> first variant row of that control
        self.mix: torch.Tensor | None = None  # [R', R] when the rows are combinations (Control.row_mix)
        self.max_tokens: int | None = None  # the step budget, so constraints can finish in time
        self.stop: tuple[str, ...] = ()  # stop strings, which constraints must not let cut the text
        self.confirmed = 0  # tokens emitted per prompt so far (counts against max_tokens)
        self.tentative = 0  # drafted tokens fed to the session but not yet confirmed (``verify``)
        self.cfg = SamplingConfig()  # how tokens are sampled, and the request's random generators,
        self.generators: list[torch.Generator] = []  # one per prompt; a drafting control verifies with both

    @property
    def batch_size(self) -> int:
        return len(self.prompt_tokens)

    @property
    def rows(self) -> torch.Tensor | None:
        """[B, R, V] log-probabilities of every row this step (normalised on first use)."""
        if self._rows is None and self._logits is not None:
            self._rows = torch.log_softmax(self._logits.float(), dim=-1).view(self.batch_size, self.rows_per_prompt, -1)
        return self._rows

    @property
    def logits(self) -> torch.Tensor | None:
        """[B * R, V] raw logits of this step."""
        return self._logits

    def set_logits(self, logits: torch.Tensor) -> None:
        self._logits, self._rows = logits, None

    def variant_rows(self, control: Control) -> torch.Tensor:
        """[B, k, V] log-probabilities of the variant rows that ``control`` asked for."""
        start = self.offsets[id(control)]
        k = len(control.variants(""))
        return self.rows[:, start : start + k]

    def context_tokens(self, window: int | None = None) -> list[list[int]]:
        """Prompt plus generated tokens of each prompt, the last ``window`` of them if given."""
        seqs = [p + g for p, g in zip(self.prompt_tokens, self.generated)]
        return [s[-window:] for s in seqs] if window else seqs

    def last_tokens(self) -> list[int]:
        """Each prompt's last token (generated, else prompt): what a finished prompt repeats."""
        return [(g or p)[-1] for p, g in zip(self.prompt_tokens, self.generated)]
