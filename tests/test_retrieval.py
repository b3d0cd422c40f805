"""Retrieval: document stores, chunking, the vector index and its saved file, and the R term's
parsing and checks. Fast: a toy embedding stands in for MiniLM (the model tests use the real one)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import deny_reading

from tokensteer.controls import RequestControls
from tokensteer.errors import UserError
from tokensteer.formula import check, parse
from tokensteer.formula.ast import Retrieve, to_string
from tokensteer.formula.parser import FormulaError
from tokensteer.retrieval import DocStore, chunk_documents, load_documents, windows
from tokensteer.retrieval.index import VectorIndex, load_vectors, save_vectors
from tokensteer.retrieval.request import check_docs, request_formula, retrieve_node

VOCAB = ["island", "capital", "harbour", "bird", "phone", "battery", "cheese", "village", "camel", "desert", "painter", "cat"]


def toy_embed(texts):
    """Bag of known words, unit length: passages sharing words with the query score higher."""
    calls.append(len(texts))
    out = np.zeros((len(texts), len(VOCAB) + 1), np.float32)
    for i, t in enumerate(texts):
        low = t.lower()
        out[i, :-1] = [low.count(w) for w in VOCAB]
        out[i, -1] = 0.1
    return out / np.linalg.norm(out, axis=1, keepdims=True)


calls: list[int] = []

DOCS = {
    "tarsk.md": "# Tarsk\n\nTarsk is an island. Its capital is Vellmar, a harbour town. The national bird is the heron.",
    "zephyr.txt": "The Zephyrine 9 is a phone. Its battery uses sodium.",
    "sub/brindle.md": "Brindlewick is a village known for its cheese.",
    "sub/drake.txt": "Tamsin Drake crossed the desert on a camel named Biscuit.",
    ".hidden/skip.txt": "never read",
    "notes.csv": "never read either",
}


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "kb"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, "utf-8")
    return root


def store(path, tmp_path, **kw):
    return DocStore(path, embed=toy_embed, model="toy-bow", index_path=tmp_path / "index.json", **kw)


# ---- documents ----

def test_folder_reads_text_and_markdown_recursively(folder):
    docs = load_documents(folder)
    assert [d.id for d in docs] == ["sub/brindle.md", "sub/drake.txt", "tarsk.md", "zephyr.txt"]
    assert docs[2].title == "Tarsk" and docs[3].title == "zephyr"  # a markdown heading, else the file name


def test_jsonl_ids_titles_and_line_numbers(tmp_path):
    f = tmp_path / "kb.jsonl"
    f.write_text('{"id": "a", "title": "Alpha", "text": "first"}\n\n{"text": "second"}\n', "utf-8")
    docs = load_documents(f)
    assert [(d.id, d.title, d.text) for d in docs] == [("a", "Alpha", "first"), ("3", "3", "second")]


@pytest.mark.parametrize("content, fragment", [
    ('{"text": 3}\n', 'line 1: each line needs a string "text"'),
    ('{"text": "a"}\nnot json\n', "line 2: invalid JSON"),
    ('{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n', "the id 'x' is used twice"),
    ('{"text": "  "}\n', "hold no text"),
])
def test_bad_jsonl_is_one_line(tmp_path, content, fragment):
    f = tmp_path / "kb.jsonl"
    f.write_text(content, "utf-8")
    with pytest.raises(UserError, match=fragment):
        load_documents(f)


def test_missing_empty_and_unreadable_stores(tmp_path):
    with pytest.raises(UserError, match="do not exist"):
        load_documents(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no .txt or .md files"):
        load_documents(tmp_path / "empty")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.txt").write_bytes(b"\xff\xfe not text")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_documents(tmp_path / "bin")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(UserError, match="give a folder of .txt/.md files"):
        load_documents(tmp_path / "data.csv")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    (tmp_path / "kb").mkdir()
    f = tmp_path / "kb" / "secret.txt"
    f.write_text("x")
    f.chmod(0)
    with pytest.raises(UserError, match="cannot read document"):
        load_documents(tmp_path / "kb")


def test_unreadable_file_as_root_too(tmp_path, monkeypatch):
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "secret.txt").write_text("x")
    deny_reading(monkeypatch, "secret.txt")
    with pytest.raises(UserError, match="cannot read document .*Permission denied"):
        load_documents(tmp_path / "kb")


# ---- chunking ----

@settings(max_examples=200, deadline=None)
@given(st.lists(st.text("abc", min_size=1, max_size=3), max_size=60), st.integers(1, 12), st.data())
def test_windows_cover_every_word_with_the_overlap(words, size, data):
    overlap = data.draw(st.integers(0, size - 1))
    text = "  ".join(words)
    out = windows(text, size, overlap)
    parts = [w.split() for w in out]
    assert all(1 <= len(p) <= size for p in parts)
    for a, b in zip(parts, parts[1:]):  # consecutive passages share exactly `overlap` words
        assert len(a) == size and a[size - overlap:] == b[:overlap]
    rebuilt = parts[0] + [w for p in parts[1:] for w in p[overlap:]] if parts else []
    assert rebuilt == words
    assert all(w in text for w in out)  # whitespace inside a passage is kept


def test_bad_chunk_settings():
    with pytest.raises(UserError, match="overlap < size"):
        windows("a b c", 3, 3)


def test_chunks_keep_their_document():
    from tokensteer.retrieval.store import Document

    chunks = chunk_documents([Document("d", "D", " ".join(map(str, range(10))))], size=4, overlap=1)
    assert [(c.doc, c.index, c.text) for c in chunks] == [("d", 0, "0 1 2 3"), ("d", 1, "3 4 5 6"), ("d", 2, "6 7 8 9")]


# ---- the index ----

def test_faiss_and_numpy_agree():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q = v[:5] + 0.01 * rng.normal(size=(5, 16)).astype(np.float32)
    idx = VectorIndex(v)
    assert idx.engine == "faiss"
    s1, i1 = idx.search(q, 7)
    idx._faiss = None  # the numpy fallback
    s2, i2 = idx.search(q, 7)
    assert (i1 == i2).all() and np.allclose(s1, s2, atol=1e-5)
    assert list(i1[:, 0]) == [0, 1, 2, 3, 4]


def test_saved_vectors_round_trip_and_go_stale(tmp_path):
    v = np.arange(12, dtype=np.float32).reshape(3, 4)
    p = tmp_path / "i.json"
    save_vectors(p, v, "fp", "model-a")
    assert (load_vectors(p, "fp", "model-a") == v).all()
    assert load_vectors(p, "other", "model-a") is None
    assert load_vectors(p, "fp", "model-b") is None
    p.write_text(p.read_text()[:-20])  # a damaged file is rebuilt, not trusted
    assert load_vectors(p, "fp", "model-a") is None
    assert [f.name for f in tmp_path.iterdir()] == ["i.json"]  # no temporary files left behind


def test_store_builds_reuses_and_rebuilds(folder, tmp_path):
    calls.clear()
    s = store(folder, tmp_path)
    hits = s.search(["Which bird lives on the island?"], 2)[0]
    assert hits[0].chunk.doc == "tarsk.md" and hits[0].score > hits[1].score
    assert s.rebuilt and s.saved and (tmp_path / "index.json").is_file()
    calls.clear()
    again = store(folder, tmp_path)
    again.search(["cheese"], 1)
    assert again.rebuilt is False and calls == [1]  # only the query was embedded
    (folder / "zephyr.txt").write_text("The Zephyrine 9 is a phone with a cheese battery.")
    changed = store(folder, tmp_path)
    changed.search(["cheese"], 1)
    assert changed.rebuilt is True
    other_chunks = store(folder, tmp_path, size=5, overlap=1)
    other_chunks.search(["cheese"], 1)
    assert other_chunks.rebuilt is True and len(other_chunks) > len(changed)


def test_read_only_cache_still_searches(folder, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    s = DocStore(folder, embed=toy_embed, model="toy", index_path=ro / "sub" / "index.json")
    try:
        assert s.search(["camel"], 1)[0][0].chunk.doc == "sub/drake.txt"
        assert s.saved is (os.geteuid() == 0)  # root may write anyway
    finally:
        ro.chmod(0o700)


def test_k_larger_than_the_store(folder, tmp_path):
    with pytest.raises(UserError, match="hold only 4 passages; lower k"):
        store(folder, tmp_path).search(["x"], 5)


# ---- the R term ----

@pytest.mark.parametrize("text, node", [
    ("R", Retrieve()),
    ("R(8)", Retrieve(k=8)),
    ("R(k=2, tau=0.05, every=16)", Retrieve(2, 0.05, 16)),
])
def test_parse_r(text, node):
    assert parse(text).root == node
    assert parse(to_string(node)).root == node


@given(st.integers(1, 64), st.floats(1e-6, 100, allow_nan=False), st.integers(0, 1000), st.floats(-5, 5, allow_nan=False))
def test_r_round_trips_inside_formulas(k, tau, every, w):
    from tokensteer.formula.ast import M

    f = Retrieve(k, tau, every) + w * M("Be brief:\n")
    assert parse(to_string(f)).root == f


@pytest.mark.parametrize("text, fragment", [
    ("R(k=0)", "whole number ≥ 1"),
    ("R(k=2.5)", "whole number"),
    ("R(tau=0)", "finite number"),
    ("R(every=-1)", "whole number ≥ 0"),
    ("R(q=1)", "R takes no argument named q"),
    ("R(2, 3)", "by name"),
    ('R(k="a")', "expected a number"),
])
def test_bad_r(text, fragment):
    with pytest.raises(FormulaError, match=fragment):
        parse(text)


def test_r_composes_and_checks():
    rep = check(parse("R(k=4) - 0.3*M"))
    assert [(w.term, w.effective, w.kind) for w in rep.weights] == [("R(k=4)", 1.0, "model"), ("M", -0.3, "model")]
    check(parse("nucleus(R(k=2) + M, 0.9)"))
    with pytest.raises(UserError, match="sum to"):
        check(parse("R(k=2) - 2*M"))


def test_request_options(folder):
    assert request_formula(RequestControls(docs=str(folder), retrieve=3)) == "R(k=3)"
    assert request_formula(RequestControls(docs=str(folder), retrieve={"k": 2, "tau": 0.5, "every": 8})) == "R(k=2, tau=0.5, every=8)"
    assert request_formula(RequestControls(docs=str(folder), formula="R(k=2) + M")) == "R(k=2) + M"
    with pytest.raises(UserError, match="--retrieve needs --docs"):
        request_formula(RequestControls(retrieve=2))
    with pytest.raises(UserError, match="write R\\(k=K\\) inside the formula"):
        request_formula(RequestControls(docs=str(folder), retrieve=2, formula="M"))
    with pytest.raises(UserError, match="unknown: docs"):
        retrieve_node({"k": 2, "docs": "x"})
    with pytest.raises(UserError, match="must be a number"):
        retrieve_node("4")
    with pytest.raises(UserError, match="--docs is read by retrieval terms"):
        check_docs(parse("M"), str(folder))
    with pytest.raises(UserError, match="hold only 4 passages"):
        check_docs(parse("R(k=5)"), str(folder))


def test_required_capabilities_check_before_loading(folder, tmp_path):
    with pytest.raises(UserError, match="do not exist"):
        RequestControls(docs=str(tmp_path / "missing"), retrieve=2).required_capabilities()
    with pytest.raises(UserError, match="hold only 4 passages"):
        RequestControls(docs=str(folder), retrieve=9).required_capabilities()
    with pytest.raises(UserError, match="--speculate does not support retrieval"):
        RequestControls(docs=str(folder), formula='R(k=2) + M(model="x")', speculate=2).required_capabilities()


# ---- the eval task and method ----

def test_qa_task_scores_the_first_word():
    from tokensteer.eval.tasks import Item, get_task

    task = get_task("qa-dev")
    items = [Item("q", {"answer": a}) for a in ("Vellmar", "heron", "seven", "Vellmar", "Vellmar", "teal")]
    texts = [" Vellmar.\nMore", " The heron", " 7 elders", " The capital is Vellmar", "", ' "Teal"']
    assert [r["success"] for r in task.score(items, texts)] == [True, True, True, False, False, True]


def test_qa_splits_are_sound():
    from tokensteer.eval.tasks import get_task

    dev, test = get_task("qa-dev"), get_task("qa-test")
    assert dev.docs == test.docs
    docs = {d.id: d.text for d in load_documents(dev.docs)}
    d_items, t_items = dev.items(), test.items()
    assert len(d_items) >= 50 and len(t_items) >= 50
    assert not {i.prompt for i in d_items} & {i.prompt for i in t_items}  # no question in both splits
    for it in d_items + t_items:  # every answer is a word of its document, which the model cannot know
        assert it.fields["answer"] in re.findall(r"\w+", docs[it.fields["doc"]])


def test_retrieve_method_specs():
    from tokensteer.eval.methods import make_method

    assert str(make_method("retrieve:4").formula) == "R(k=4)"
    assert str(make_method("retrieve:k=2,tau=0.5,every=8").formula) == "R(k=2, tau=0.5, every=8)"
    m = make_method("retrieve:R(k=2) - 0.3*M")
    assert str(m.formula) == "R(k=2) - 0.3*M" and m.docs is None
    assert make_method("retrieve:k=2,docs=kb/").docs == "kb/"
    for spec, fragment in (("retrieve", "needs K"), ("retrieve:k=x", "must be numbers"), ("retrieve:k=0", "whole number ≥ 1")):
        with pytest.raises(UserError, match=fragment):
            make_method(spec)
