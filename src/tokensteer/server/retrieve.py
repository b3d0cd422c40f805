"""The ``retrieve`` field of the ``tokensteer`` object: REPLUG over a document store that a client
names from the folder given to ``tokensteer serve --stores DIR``. A name is looked up among that
folder's entries, never joined to a path, and messages name stores, never their server-side paths."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokensteer.errors import UserError
from tokensteer.server.errors import APIError
from tokensteer.server.limits import Limits
from tokensteer.server.named import NamedEntries

if TYPE_CHECKING:
    from tokensteer.controls import RequestControls
    from tokensteer.retrieval import DocStore
    from tokensteer.server.schemas import TokensteerExtra

log = logging.getLogger("tokensteer.server")
STORE_SUFFIXES = (".jsonl", ".txt", ".md")
PARAM = "tokensteer.retrieve"


class Stores(NamedEntries):
    """The document stores a client may name: sub-folders and ``.jsonl``, ``.txt`` or ``.md`` files
    of ``--stores``."""

    suffixes, folders, what, flag, code = STORE_SUFFIXES, True, "document store", "--stores", "unknown_store"

    def resolve(self, name: str, param: str = f"{PARAM}.store") -> Path:
        return super().resolve(name, param)


@dataclass(frozen=True)
class StoreRef:
    """A store a request named, opened when its controls are built (``open``, off the event loop)."""

    name: str
    path: Path
    ks: tuple[int, ...]  # k of each R term that reads it

    def open(self) -> DocStore:
        from tokensteer.retrieval import open_store

        try:
            store = open_store(self.path)
        except UserError as e:  # the server's own documents are broken: not the client's mistake
            log.error("document store %r: %s", self.name, e)
            raise APIError(500, f"the document store {self.name!r} cannot be read; the server's log says why", code="store_unreadable") from None
        for k in self.ks:
            if k > len(store):
                raise APIError(400, f"cannot retrieve {k} passages: the store {self.name!r} holds only {len(store)}; lower k",
                               param=PARAM, code="invalid_value")
        return store


def apply(extra: TokensteerExtra, req: RequestControls, stores: Stores, limits: Limits) -> None:
    """Set ``req``'s documents (a StoreRef) and retrieval shortcut from ``extra.retrieve``; refuse
    R terms without a store, a store nothing reads, and R settings given twice."""
    from tokensteer.formula import parse
    from tokensteer.retrieval.request import retrieve_node
    from tokensteer.retrieval.term import retrieve_nodes

    spec = extra.retrieve
    nodes = retrieve_nodes(parse(extra.formula).root) if extra.formula is not None else []
    if spec is None:
        if nodes:
            known = ", ".join(stores.listing())
            where = f"one of: {known}" if known else "this server has none (tokensteer serve --stores DIR)"
            raise APIError(400, f"R(…) retrieval terms read a document store: name it in tokensteer.retrieve.store ({where})",
                           param="tokensteer.formula", code="unsupported_formula")
        return
    path = stores.resolve(spec.store)
    knobs = {k: v for k in ("k", "tau", "every") if (v := getattr(spec, k)) is not None}
    if extra.formula is not None:
        if knobs:
            raise APIError(400, "with tokensteer.formula, write R(k=…, tau=…, every=…) inside the formula; tokensteer.retrieve then names only the store",
                           param=PARAM, code="invalid_value")
        if not nodes:
            raise APIError(400, "tokensteer.retrieve names a store that only R(…) terms read: add one such as R(k=4) to the formula, or leave the formula out",
                           param=PARAM, code="invalid_value")
    else:
        try:
            nodes = [retrieve_node(knobs)]
        except UserError as e:
            raise APIError(400, str(e), param=PARAM, code="invalid_value") from None
        if nodes[0].k > limits.max_formula_rows:
            raise APIError(400, f"k = {nodes[0].k} passages is above this server's limit of {limits.max_formula_rows} rows "
                           "(tokensteer serve --max-formula-rows)", param=f"{PARAM}.k", code="formula_too_large")
        req.retrieve = knobs or {"k": nodes[0].k}
    req.docs = StoreRef(spec.store, path, tuple(n.k for n in nodes))


def open_docs(req: RequestControls) -> None:
    """Open the store a request named (in the worker thread that builds its controls)."""
    if isinstance(req.docs, StoreRef):
        req.docs = req.docs.open()
