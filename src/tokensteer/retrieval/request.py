"""A request's retrieval options (``docs`` and ``retrieve`` of ``RequestControls``, the CLI's
``--docs``/``--retrieve``, the server's ``"retrieve"`` object) turned into a formula and checked
before any model loads."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokensteer.errors import UserError
from tokensteer.formula.ast import Formula, Retrieve, to_string

if TYPE_CHECKING:
    from tokensteer.controls import RequestControls

KEYS = ("k", "tau", "every")


def retrieve_node(retrieve: object) -> Retrieve:
    """``retrieve`` as an R term: a whole number k, or a dict with ``k``, ``tau`` and ``every``."""
    if isinstance(retrieve, dict):
        unknown = sorted(set(retrieve) - set(KEYS))
        if unknown:
            raise UserError(f"retrieve takes {', '.join(KEYS)}; unknown: {', '.join(map(str, unknown))}")
        spec = dict(retrieve)
    else:
        spec = {"k": retrieve}
    for key, v in spec.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"retrieve's {key} must be a number, got {v!r}")
    return Retrieve(**spec)


def request_formula(req: RequestControls) -> str:
    """The formula a request with ``docs``/``retrieve`` runs: its own formula, or ``R(k=…)``."""
    if req.retrieve is not None and req.docs is None:
        raise UserError("--retrieve needs --docs PATH: a folder of .txt/.md files or a .jsonl file to retrieve from")
    if req.retrieve is not None and req.formula is not None:
        raise UserError("--retrieve K is the formula R(k=K); with --formula, write R(k=K) inside the formula instead")
    if req.formula is not None:
        return req.formula
    if req.retrieve is None:
        raise UserError("--docs is read by retrieval terms: add --retrieve K, or an R term such as R(k=4) to --formula")
    return to_string(retrieve_node(req.retrieve))


def check_docs(f: Formula, docs: object) -> None:
    """Refuse documents no term reads, and R terms asking for more passages than the store holds
    (reads and chunks the documents; the index is built later, on first search)."""
    from tokensteer.retrieval.docstore import DocStore, open_store
    from tokensteer.retrieval.term import retrieve_nodes

    nodes = retrieve_nodes(f.root)
    if docs is None:
        return
    if not nodes:
        raise UserError("--docs is read by retrieval terms: add --retrieve K, or an R term such as R(k=4) to --formula")
    store = docs if isinstance(docs, DocStore) else open_store(docs)
    for n in nodes:
        store.check_k(n.k)
