"""Per-request TokenSelect (``"kv_select"`` in the ``tokensteer`` object): checked as the CLI's
``--kv-select`` is, and run on an engine of its own setting.

Requests with the server's own setting run on the server's engine. A different setting (another
budget, or "off" on a server started with ``--kv-select``) cannot share a batch with them (one
session attends one way), so each setting gets its own engine over a view of the same loaded model
(``kvselect.view``); an engine's thread ends while it has no requests, and the least recently used
idle engines are closed when more settings arrive than ``MAX_SETTINGS``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from tokensteer.errors import UserError
from tokensteer.kvselect import KV_SELECT, KVSelectConfig, parse_kv_select
from tokensteer.server.errors import APIError
from tokensteer.server.schemas import KVSelect, TokensteerExtra

if TYPE_CHECKING:
    from tokensteer.engine import Engine

PARAM = "tokensteer.kv_select"
MAX_SETTINGS = 8  # engines for settings other than the server's, at most


def request_setting(spec: object, lm) -> KVSelectConfig | None:
    """The request's ``kv_select`` (a spec string, true/false, or an object of settings) as a config,
    None for dense attention; a 400 naming the field when it is malformed or the backend cannot run it."""
    if isinstance(spec, dict):
        spec = {k: v for k, v in spec.items() if v is not None}
    try:
        cfg = parse_kv_select(spec)
    except UserError as e:
        raise APIError(400, str(e), param=PARAM) from None
    if cfg is not None and KV_SELECT not in lm.capabilities:
        why = ("this server runs the llama.cpp backend, whose attention runs inside its own graph; start it with --backend torch"
               if lm.name != "torch" else f"{lm.model_name} does not run SDPA attention (eager, e.g. soft-capped logits)")
        raise APIError(400, f"kv_select runs in transformers' attention on the torch backend: {why}", param=PARAM, code="unsupported_parameter")
    return cfg


def requested(extra: TokensteerExtra | None) -> str | bool | dict | None:
    """The ``kv_select`` of a request's ``tokensteer`` object as ``parse_kv_select`` takes it (None: not given)."""
    v = None if extra is None else extra.kv_select
    return v.model_dump() if isinstance(v, KVSelect) else v


def server_setting(lm, cfg: KVSelectConfig | None) -> None:
    """Turn the server's ``--kv-select`` on for ``lm`` (a UserError where its backend cannot run it)."""
    if cfg is None:
        return
    if KV_SELECT not in lm.capabilities:
        raise UserError(f"--kv-select runs on the torch backend only; this server's model runs on {lm.name}")
    lm.set_kv_select(cfg)


class Engines:
    """The server's engine, and one engine per other ``kv_select`` setting, made on first use."""

    def __init__(self, lm, default: Engine, max_batch_rows: int, max_running: int) -> None:
        self.lm, self.default = lm, default
        self.max_batch_rows, self.max_running = max_batch_rows, max_running
        self._others: OrderedDict[KVSelectConfig | None, Engine] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: object) -> Engine:
        """The engine for a request's ``kv_select`` (None: the server's setting). Call it and submit
        under one lock (the server's ``ctx.lock``): an engine with nothing queued may be closed here."""
        if spec is None:
            return self.default
        cfg = request_setting(spec, self.lm)
        if cfg == getattr(self.lm, "kv_select", None):
            return self.default
        with self._lock:
            eng = self._others.get(cfg)
            if eng is not None:
                self._others.move_to_end(cfg)
                return eng
            self._evict()
            from tokensteer.engine import Engine
            from tokensteer.kvselect.view import KVSelectView

            eng = self._others[cfg] = Engine(KVSelectView(self.lm, cfg), self.max_batch_rows, self.max_running)
            return eng

    def _evict(self) -> None:
        while len(self._others) >= MAX_SETTINGS:
            idle = next((c for c, e in self._others.items() if _idle(e)), _NONE)
            if idle is _NONE:
                raise APIError(429, f"requests with {MAX_SETTINGS} other kv_select settings are running; retry later, "
                               "or use the server's setting (leave kv_select out)", param=PARAM, code="too_many_settings")
            self._others.pop(idle).close()

    def close(self) -> None:
        with self._lock:
            for eng in self._others.values():
                eng.close()
            self._others.clear()


_NONE = object()


def _idle(engine: Engine) -> bool:
    s = engine.stats()
    return not s["waiting"] and not s["running"]
