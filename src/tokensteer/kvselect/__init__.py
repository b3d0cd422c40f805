"""TokenSelect: dynamic token-level KV selection for long prompts (torch backend).

Growing (full-attention) layers attend per step to the first tokens, the top-k tokens by per-head
soft-voted query-key scores, and a local window; sliding-window layers are left alone. See
docs/longcontext.md.
"""

from tokensteer.kvselect.attention import Selector, attach, default_selector, install, new_selector, use
from tokensteer.kvselect.config import KVSelectConfig, parse_kv_select
from tokensteer.kvselect.prefill import PREFILL_CHUNK, prefill_chunks

KV_SELECT = "kv_select"  # backend capability: runs TokenSelect

__all__ = [
    "KV_SELECT",
    "KVSelectConfig",
    "PREFILL_CHUNK",
    "Selector",
    "attach",
    "default_selector",
    "install",
    "new_selector",
    "parse_kv_select",
    "prefill_chunks",
    "use",
]
