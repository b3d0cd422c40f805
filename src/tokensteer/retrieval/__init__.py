"""Retrieval mixtures (REPLUG): condition generation on many documents at once.

A document store (a folder of .txt/.md files or a JSONL file) is split into overlapping passages,
embedded with all-MiniLM-L6-v2 and indexed (faiss, or numpy for tiny stores); the formula term
``R(k=4, tau=0.1)`` mixes the model's next-token distributions conditioned on each of the k passages
most similar to the prompt, weighted by softmax(similarity / τ), every passage one more row of the
same batched forward:

    tokensteer generate "Question: What is the capital of Tarsk?\\nAnswer:" --docs kb/ --retrieve 4
    FormulaControl(lm, "R(k=4) - 0.2*M", docs="kb/")
    build_controls(lm, RequestControls(docs="kb/", retrieve={"k": 4, "tau": 0.1}))

See docs/retrieval.md.
"""

from __future__ import annotations

from tokensteer.retrieval.chunking import Chunk, chunk_documents, windows
from tokensteer.retrieval.docstore import DocStore, Hit, open_store
from tokensteer.retrieval.store import Document, load_documents

__all__ = ["Chunk", "DocStore", "Document", "Hit", "chunk_documents", "load_documents", "open_store", "windows"]
