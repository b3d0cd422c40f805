"""Long-context evaluation: synthetic tasks at chosen lengths, dense against TokenSelect attention."""

from tokensteer.longcontext.run import evaluate, greedy_llama, greedy_torch, string_match_all
from tokensteer.longcontext.tasks import TASKS, Sample, make_samples

__all__ = ["TASKS", "Sample", "evaluate", "greedy_llama", "greedy_torch", "make_samples", "string_match_all"]
