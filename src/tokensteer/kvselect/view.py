"""A torch backend seen with its own TokenSelect setting, so one loaded model can serve requests
with different ``kv_select`` side by side (the server gives each setting an engine over a view).

The view forwards everything to the backend, except that sessions it opens run their forward
passes through it, and it binds every KV cache they use to its setting (``bind_kv_select``)
before the backend's forward reads it.
"""

from __future__ import annotations

from tokensteer.kvselect.config import KVSelectConfig


class KVSelectView:
    """``backend`` with ``cfg`` (None: dense attention) for every session opened through the view."""

    def __init__(self, backend, cfg: KVSelectConfig | None) -> None:
        self._backend = backend
        self.kv_select = cfg
        self.context_length = None if cfg is not None and cfg.extrapolate else backend.trained

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def session(self, *args, **kwargs):
        """A session of the backend whose forward passes come through this view."""
        return type(self._backend).session(self, *args, **kwargs)

    def forward(self, ids, mask, positions, cache, *args, **kwargs):
        self._backend.bind_kv_select(cache, self.kv_select)
        return self._backend.forward(ids, mask, positions, cache, *args, **kwargs)
