"""The output layers that run a formula's mixed rows once on llama.cpp: our Q8_0 kernel (which plain
sessions use too) and the head-only model (where the kernel cannot run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokensteer as ts

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from tokensteer.backends.llamacpp.gguf import build_head, read_tensor  # noqa: E402  (needs llama_cpp)
from tokensteer.backends.llamacpp.native import status as native_status  # noqa: E402

H, V = 32, 40  # row width and vocabulary of the little files

metadata = st.dictionaries(
    st.text("abcdefghij._", min_size=1, max_size=12).map(lambda k: "x." + k),
    st.one_of(
        st.text(max_size=20),
        st.integers(0, 2**31),
        st.floats(allow_nan=False, width=32),
        st.booleans(),
        st.lists(st.text(max_size=8), max_size=30),
        st.lists(st.integers(-(2**31), 2**31 - 1), max_size=30),
    ),
    max_size=8,
)


def write_gguf(path, meta: dict, layers: int = 3, norm_bias: bool = False, untied: bool = False) -> dict[str, np.ndarray]:
    """A small fake model file: metadata, ``layers`` blocks, a final norm and an output matrix."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    for k, v in meta.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif v and isinstance(v[0], str):
            w.add_array(k, v)
        else:
            w.add_array(k, [int(x) for x in v])
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.standard_normal((V, H), np.float32), "output_norm.weight": rng.random(H, np.float32)}
    if norm_bias:
        tensors["output_norm.bias"] = rng.random(H, np.float32)
    if untied:
        tensors["output.weight"] = rng.standard_normal((V, H), np.float32)
    for i in range(layers):
        tensors[f"blk.{i}.attn_q.weight"] = rng.standard_normal((H, H), np.float32)
        tensors[f"blk.{i}.attn_norm.weight"] = rng.random(H, np.float32)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=metadata, layers=st.integers(1, 4))
def test_head_file_keeps_metadata_and_output_layer_and_zeroes_one_block(tmp_path, meta, layers):
    src, dst = tmp_path / "m.gguf", tmp_path / "heads" / "m.head.gguf"
    tensors = write_gguf(src, meta, layers)
    build_head(src, dst)
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    for k, f in a.fields.items():
        if k.startswith("GGUF."):
            continue
        want = 1 if k == "llama.block_count" else f.contents()
        assert b.fields[k].contents() == want, k
    got = {t.name: t for t in b.tensors}
    assert set(got) == {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_norm.weight"}
    assert np.array_equal(np.asarray(got["token_embd.weight"].data), tensors["token_embd.weight"])
    assert np.array_equal(np.asarray(got["output_norm.weight"].data), np.ones(H, np.float32))
    q = got["blk.0.attn_q.weight"]  # a zero matrix, stored as Q4_0
    assert q.tensor_type == gguf.GGMLQuantizationType.Q4_0 and list(q.shape) == [H, H]
    assert not np.asarray(q.data).any() and not np.asarray(got["blk.0.attn_norm.weight"].data).any()
    assert not list(dst.parent.glob("*.part"))  # written through a temporary file, renamed at the end
    ttype, dims, raw = read_tensor(src, "token_embd.weight")  # the walker finds what gguf's reader finds
    assert ttype == 0 and dims == [H, V] and raw == tensors["token_embd.weight"].tobytes()


def test_an_untied_model_keeps_its_output_matrix_and_zeroes_its_input_embedding(tmp_path):
    tensors = write_gguf(tmp_path / "m.gguf", {}, untied=True)
    build_head(tmp_path / "m.gguf", tmp_path / "h.gguf")
    got = {t.name: t for t in gguf.GGUFReader(tmp_path / "h.gguf").tensors}
    assert np.array_equal(np.asarray(got["output.weight"].data), tensors["output.weight"])
    emb = got["token_embd.weight"]  # never read: rows arrive as embeddings; kept only for its shape
    assert emb.tensor_type == gguf.GGMLQuantizationType.Q4_0 and list(emb.shape) == [H, V] and not np.asarray(emb.data).any()


def test_files_without_an_rms_normed_output_layer_are_refused(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="GGUF"):
        build_head(tmp_path / "junk.gguf", tmp_path / "out.gguf")
    write_gguf(tmp_path / "ln.gguf", {}, norm_bias=True)  # a LayerNorm with a bias is not linear in its input
    with pytest.raises(ValueError, match="RMS"):
        build_head(tmp_path / "ln.gguf", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


@pytest.fixture(scope="module")
def llama_any():
    lm = ts.load(None, backend="llamacpp")
    yield lm
    lm.close()


@pytest.fixture(params=["kernel", "model"])
def llama(request, llama_any):
    """The bundled model with its mixing head: our kernel, or the head-only model (the kernel
    switched off, so plain sessions use llama.cpp's own output layer as on a CPU without it)."""
    lm = llama_any
    if request.param == "kernel":
        if lm.plain_head() is None:
            pytest.skip("the Q8_0 output kernel cannot be built on this machine")
        yield lm
        return
    saved = lm._q8, lm._head
    lm._q8, lm._head = False, None
    try:
        assert lm.head() is not None and lm.plain_head() is None
        yield lm
    finally:
        lm._q8, lm._head = saved


PROMPTS = ["The old lighthouse keeper climbed the stairs one last time and", "My favourite food is"]
PREFIXES = ["", "Here is a happy story:\n", "Here is a sad story:\n", "A story for children:\n"]
TEXT = " and then the sea was calm and quiet, so he sat down by the window to read a book"


def paired(lm, mix: torch.Tensor, steps: int = 12):
    """(mixed session's logits, mix @ a plain session's logits) at prefill and each fed token."""
    rows = [lm.tokenizer.encode(p + x) for x in PROMPTS for p in PREFIXES]
    a, b = lm.session(mix=mix), lm.session()
    try:
        pairs = []
        la, lb = a.prefill(rows), b.prefill(rows)
        for t in lm.tokenizer.encode(TEXT, add_bos=False)[:steps]:
            pairs.append((la.clone(), torch.einsum("or,grv->gov", mix, lb.view(len(PROMPTS), 4, -1)).flatten(0, 1)))
            feed = torch.tensor([t] * len(rows))
            la, lb = a.step(feed), b.step(feed)
        return pairs
    finally:
        a.close()
        b.close()


@pytest.mark.model
def test_the_output_kernel_gives_llama_cpps_own_logits(llama_any):
    """Plain sessions finish with our kernel where it runs. It quantises activations as llama.cpp
    does, so its logits are llama.cpp's own up to the order of float sums: same greedy tokens,
    differences far below the gaps between tokens."""
    lm = llama_any
    if lm.plain_head() is None:
        pytest.skip("the Q8_0 output kernel cannot be built on this machine")
    rows = [lm.tokenizer.encode(p + x) for x in PROMPTS for p in PREFIXES]
    a = lm.session()
    saved, lm._q8 = lm._q8, False
    b = lm.session()
    lm._q8 = saved
    assert a.head is not None and b.head is None
    try:
        la, lb = a.prefill(rows), b.prefill(rows)
        for t in lm.tokenizer.encode(TEXT, add_bos=False)[:8]:
            assert torch.equal(la.argmax(-1), lb.argmax(-1))
            assert float((la - lb).abs().max()) < 0.02
            feed = torch.tensor([t] * len(rows))
            la, lb = a.step(feed).clone(), b.step(feed)
    finally:
        a.close()
        b.close()


@pytest.mark.model
def test_head_model_gives_each_rows_own_logits(llama):
    """Through the head model (mix = identity), every row gets the logits of its own full decode."""
    assert llama.head() is not None
    for got, want in paired(llama, torch.eye(4)):
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert float((got - want).abs().max()) < 0.15  # llama.cpp quantises the head's input per 32 values


@pytest.mark.model
def test_mixed_rows_match_mixed_logits(llama):
    """A formula's weighted sum through the head once ≈ the same sum of every row's logits."""
    mix = torch.tensor([[1.0, 2.0, -2.0, 0.5]])
    agree, kls = 0, []
    for got, want in paired(llama, mix):
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        lg, lw = torch.log_softmax(got, -1), torch.log_softmax(want, -1)
        kls.append(float((lw.exp() * (lw - lg)).sum(-1).mean()))
    assert agree >= 0.8 * 2 * 12 and np.mean(kls) < 0.01


@pytest.mark.model
def test_c_and_python_eval_callbacks_capture_the_same_final_norms(llama_any, monkeypatch):
    llama = llama_any
    """The compiled callback is only a faster copy of the Python one: the same rows, bit for bit;
    disarmed, neither stops the graph, so the model's logits come out as usual."""
    import tokensteer.backends.llamacpp.capture as head_mod
    from tokensteer.backends.llamacpp.context import Context

    ids = np.asarray(llama.tokenizer.encode(PROMPTS[0]), np.int32)

    def capture(native: bool) -> tuple[np.ndarray, bool]:
        if not native:
            monkeypatch.setattr("tokensteer.backends.llamacpp.native.library", lambda *a: None)
        c = Context(llama.model, 64, 1, llama.n_threads, capture=True)
        monkeypatch.undo()
        try:
            assert c.capture.native == native
            n, b = len(ids), c.batch
            b.token[:n], b.pos[:n], b.seq[:n], b.logits[:n] = ids, np.arange(n), 0, 1
            b.c.n_tokens = n
            c.capture.arm()
            assert llama_cpp.llama_decode(c.ptr, b.c) == 0
            c.capture.disarm()
            h = c.capture.h
            llama_cpp.llama_memory_clear(c.mem, False)
            assert llama_cpp.llama_decode(c.ptr, b.c) == 0  # disarmed: the whole graph runs
            logits_ok = bool(np.isfinite(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(c.ptr, n - 1), (llama.n_vocab,))).all())
            return h, logits_ok and c.capture.h is h
        finally:
            c.free()

    if not head_mod.Capture(8).native:
        pytest.skip(f"no compiled callback here ({native_status('evalstop')})")
    (hc, okc), (hp, okp) = capture(True), capture(False)
    assert hc.shape == (len(ids) * llama.hidden_size,) and np.array_equal(hc, hp)
    assert okc and okp


@pytest.mark.model
def test_without_the_head_model_sessions_mix_full_logits(llama_any):
    llama = llama_any
    """Where the head model is unusable, a mixing session still returns the exact mixed logits."""
    saved = llama._head, llama._q8
    llama._head = llama._q8 = False
    try:
        mix = torch.tensor([[1.0, 2.0, -2.0, 0.5], [1.0, 0.0, 0.0, 0.0]])
        for got, want in paired(llama, mix, steps=4):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    finally:
        llama._head, llama._q8 = saved


@pytest.mark.model
def test_mixing_before_the_head_is_closer_to_the_exact_sum(llama):
    """Against W·(Σ wᵢ·hᵢ) unquantised (the output matrix dequantised, the same final hidden states),
    one quantised pass over the mixed row errs less than mixing rows that were each quantised."""
    ttype, _, raw = read_tensor(llama.path, "token_embd.weight")
    assert ttype == gguf.GGMLQuantizationType.Q8_0  # blocks of an f16 scale and 32 int8 values
    blocks = np.frombuffer(raw, np.uint8).reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    W = torch.from_numpy((scale * blocks[:, 2:].view(np.int8)).reshape(llama.n_vocab, -1))
    mix = torch.tensor([[1.0, 2.0, -2.0, 0.5]])
    rows = [llama.tokenizer.encode(p + x) for x in PROMPTS for p in PREFIXES]
    a, b = llama.session(mix=mix), llama.session()
    seen = []
    real = a._head_rows
    a._head_rows = lambda h, mix: (seen.append(torch.as_tensor(np.asarray(h, np.float32))), real(h, mix))[1]
    kl = {"fused": [], "unfused": []}
    try:
        la, lb = a.prefill(rows), b.prefill(rows)
        for t in llama.tokenizer.encode(TEXT, add_bos=False)[:10]:
            u = torch.einsum("or,grh->goh", mix, seen[-1].view(len(PROMPTS), 4, -1)).flatten(0, 1)
            exact = torch.log_softmax((u @ W.T).double(), -1)  # float32 sums: errors ~1e-5, far below the gap tested
            unfused = torch.einsum("or,grv->gov", mix, lb.view(len(PROMPTS), 4, -1)).flatten(0, 1)
            for name, x in (("fused", la), ("unfused", unfused)):
                lx = torch.log_softmax(x.double(), -1)
                kl[name].append(float((exact.exp() * (exact - lx)).sum(-1).mean()))
            feed = torch.tensor([t] * len(rows))
            la, lb = a.step(feed), b.step(feed)
    finally:
        a.close()
        b.close()
    assert np.mean(kl["fused"]) < np.mean(kl["unfused"]), kl


@pytest.mark.model
@pytest.mark.fallback
def test_formula_on_llamacpp_runs_its_sum_through_the_head_once(llama):
    """A three-term formula on llama.cpp: one head row per prompt per step, not three."""
    from tokensteer.formula import FormulaControl

    head = llama.head()
    calls = []
    real = head.logits
    head.logits = lambda u, out=None: (calls.append(u.shape[0]), real(u, out))[1]
    try:
        f = 'M + 0.5*(M("Here is a happy story:\\n") - M("Here is a sad story:\\n"))'
        out = ts.generate(llama, PROMPTS, max_tokens=5, temperature=0, ignore_eos=True, controls=[FormulaControl(llama, f)])
    finally:
        del head.logits
    assert all(len(g.tokens) == 5 for g in out)
    assert calls == [len(PROMPTS)] * 5  # prefill and four steps, one mixed row per prompt each
