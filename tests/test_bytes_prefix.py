"""Exact byte-level probabilities for Llama 2-style SentencePiece tokenizers, which write a dummy
prefix space before every text. A tiny SentencePiece BPE model (byte fallback, dummy prefix,
whitespace-only pieces) is trained here on tests/data/bytes_corpus.txt and converted the way
transformers loads Llama 2 (a Metaspace pre-tokenizer) and the way older tokenizer.json files have
it (a Prepend normaliser). SentencePiece itself is the reference for every encoding."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import save_random
from test_bytes import CORPUS, Reference, check_greedy_bytes, close

import tokensteer
from tokensteer.bytes import (
    END,
    ByteFormula,
    ByteOptions,
    ByteState,
    generate_bytes,
    score,
)
from tokensteer.bytes.utf8 import completions, next_byte_mask, tail_state
from tokensteer.bytes.vocab import byte_vocab
from tokensteer.errors import UserError

spm = pytest.importorskip("sentencepiece")
NEG_INF = float("-inf")
#: lines with runs of spaces, so the vocabulary has whitespace-only pieces ("▁▁")
INDENTED = ["    indented  lines  keep  their  spaces", "  two  spaces   three   spaces"] * 8


def train_sentencepiece() -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS + INDENTED), model_writer=buf, model_type="bpe", vocab_size=420,
        byte_fallback=True, add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2,
    )
    return buf.getvalue()


def make_llama2_model(folder, proto: bytes, legacy_json: bool, seed: int = 2) -> None:
    """A 2-layer Llama with the SentencePiece model as transformers converts it; ``legacy_json``
    saves the older tokenizer.json form instead (Prepend("▁") and Replace normalisers, no pre-tokenizer)."""
    from tokenizers import normalizers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaTokenizer,
        PreTrainedTokenizerFast,
    )

    (folder / "sp").mkdir()
    (folder / "sp" / "tokenizer.model").write_bytes(proto)
    tok = LlamaTokenizer.from_pretrained(str(folder / "sp"))
    if legacy_json:
        t = tok.backend_tokenizer
        t.pre_tokenizer = None
        t.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    torch.manual_seed(seed)
    save_random(model, tok, folder)


@pytest.fixture(scope="module")
def proto():
    return train_sentencepiece()


@pytest.fixture(scope="module")
def sp(proto):
    return spm.SentencePieceProcessor(model_proto=proto)


@pytest.fixture(scope="module")
def llama2_folders(proto, tmp_path_factory):
    out = {}
    for form in ("metaspace", "legacy"):
        out[form] = tmp_path_factory.mktemp(f"bytes-llama2-{form}")
        make_llama2_model(out[form], proto, legacy_json=form == "legacy")
    return out


@pytest.fixture(scope="module")
def llama2_models(llama2_folders):
    return {form: tokensteer.load(str(folder), backend="torch") for form, folder in llama2_folders.items()}


@pytest.fixture(params=["metaspace", "legacy"])
def llama2(request, llama2_models):
    return llama2_models[request.param]


class SentencePieceReference(Reference):
    """The slow reference of test_bytes with SentencePiece's own encoding: the text after the
    dummy space is the text; a sequence is canonical when it begins SentencePiece's encoding of a
    text it spells (its text plus a character that merges with nothing, or plus a character that
    completes its last one); the empty text is no tokens, so "▁" alone cannot end."""

    def __init__(self, lm, sp) -> None:
        super().__init__(lm)
        self.sp = sp

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def canonical(self, seq: tuple[int, ...]) -> bool:
        data = b"".join(self.v.table[t] for t in seq)
        if not data.startswith(b" "):
            return False
        x = data[1:]
        state = tail_state(x)
        if state is None:
            return False
        texts = [x.decode() + "\x01"] if state == 0 else [x[:-state].decode() + c for c in completions(x[-state:], 4096)]
        return any(self.encode(t)[: len(seq)] == list(seq) for t in texts)

    def end_ok(self, seq: tuple[int, ...]) -> bool:
        data = b"".join(self.v.table[t] for t in seq)
        return not seq or (len(data) > 1 and tail_state(data) == 0)

    def next_symbols(self, x: bytes) -> torch.Tensor:
        acc = self.cover_sums(b" " + x)
        if not x:  # the empty text ends with no tokens
            acc[END] += math.exp(float(torch.logsumexp(self.dist(())[self.v.eos], 0)))
        return torch.log(acc / acc.sum())


def test_sentencepiece_is_separated_at_a_control_character(sp):
    """What the reference relies on: nothing merges with "\\x01" (a byte token of its own)."""
    for a, b in [("The ca", "t sat"), (" a", "  b"), ("", "x")]:
        ids = sp.encode(a + "\x01" + b)
        k = len(sp.encode(a + "\x01"))
        assert sp.id_to_piece(ids[k - 1]) == "<0x01>" and ids[:k] == sp.encode(a + "\x01")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([*"ab e\n\t東ōx1\x01", "the", "  "]), max_size=8).map("".join))
def test_encoding_is_sentencepiece_after_the_dummy_space(llama2, sp, text):
    v = byte_vocab(llama2)
    assert v.prefix == b" " and v.pure
    assert v.encode([" " + text])[0] == sp.encode(text) or not text  # the empty text has no tokens, not "▁"
    assert b"".join(v.table[t] for t in v.encode([text])[0]) == text.encode()


PROMPTS = [b"", b" ", b"  ", b"The harb", b" a", b"The caf\xc3", b"\xe6\x9d", b"12 bo", b"Hello, world! "]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_next_byte_distribution_sums_to_one(llama2, prompt):
    lp = ByteState(llama2, prompt).logprobs()
    assert abs(float(lp.exp().sum()) - 1.0) < 1e-9
    assert float(lp.max()) > NEG_INF


@pytest.mark.parametrize("text", ["", " ", " a", "東京 x", "The baker opened the shop", "  two  spaces", " Über café 東京! 12 boats", "a  b\n\nc "])
def test_byte_logprobs_sum_to_the_sentencepiece_token_logprob(llama2, sp, text):
    """Σ log P(byte) + log P(END) = log P(SentencePiece's encoding of the text, then EOS) under
    the canonical token model, leading spaces and the empty text included."""
    byte_lps, end = score(llama2, text)
    assert len(byte_lps) == len(text.encode())
    got = math.fsum(byte_lps) + end
    want = SentencePieceReference(llama2, sp).text_logprob(text)
    assert abs(got - want) < 1e-4, (got, want)  # float32 logits: a few 1e-6 apart


@pytest.mark.parametrize("x", [b"", b" ", b"The ca", b" a caf\xc3", b"\xe6\x9d", b"  is the b", b"9 t", b"x"])
def test_fast_path_matches_brute_force_covers(llama2, sp, x):
    assert close(ByteState(llama2, x).logprobs(), SentencePieceReference(llama2, sp).next_symbols(x))


def test_checking_only_the_likeliest_tokens_agrees_with_checking_all(llama2):
    """Large vocabularies (Llama 2's 32k) check only the likeliest next tokens at each node; with
    (nearly) every token among them the distributions are those of the full check (tokens below
    float precision of the running sum go unchecked)."""
    opt = ByteOptions(check_all_below=0, check_mass=1.0, check_max=10**6)
    for prompt in (b"", b" ", b"The ca", b"  two"):
        a, b = ByteState(llama2, prompt, opt).logprobs(), ByteState(llama2, prompt).logprobs()
        assert float((a.exp() - b.exp()).abs().max()) < 1e-4


def test_both_conversions_give_the_same_bytes(llama2_models, sp):
    """The Metaspace and the Prepend form of one model encode text that starts with a space
    differently; byte-level they are the same model (SentencePiece's)."""
    a, b = llama2_models["metaspace"], llama2_models["legacy"]
    raw = lambda lm, t: lm.tokenizer.encode(t, add_bos=False)
    assert raw(a, " a") != raw(b, " a") == sp.encode(" a")
    for prompt in (b"", b" ", b"  two", b" a caf\xc3"):
        assert close(ByteState(a, prompt).logprobs(), ByteState(b, prompt).logprobs(), 1e-9)


@pytest.mark.parametrize("prompt", ["The harbour.", "  two,", "x\n", "12"])
def test_at_a_clean_boundary_bytes_are_the_tokens_by_first_byte(llama2, sp, prompt):
    """Where no token reaches across the end of the prompt, the next-byte distribution is the
    token-level next-token distribution (canonical tokens, renormalised) summed by first byte."""
    v, ref = byte_vocab(llama2), SentencePieceReference(llama2, sp)
    text = b" " + prompt.encode()
    assert not any(b.startswith(text[i:]) and len(b) > len(text) - i for b in v.table for i in range(len(text)))
    tok = ref.dist(tuple(sp.encode(prompt)))
    want = torch.full((257,), NEG_INF, dtype=torch.float64)
    for b in range(256):
        ids = [t for t in range(len(tok)) if v.table[t][:1] == bytes([b]) and t not in v.eos]
        if ids:
            want[b] = float(torch.logsumexp(tok[ids], 0))
    want[END] = float(torch.logsumexp(tok[v.eos], 0))
    got = ByteState(llama2, prompt).logprobs()
    assert close(got, want)
    assert int(got.argmax()) == int(want.argmax())  # greedy picks the token-level greedy's first byte


def test_greedy_generation_follows_the_argmax(llama2):
    g, st_ = check_greedy_bytes(llama2, "The harb")
    assert st_.forwards <= len(g.tokens) + len(b"The harb") + 2


def test_generation_from_an_empty_prompt_and_an_ensemble(llama2):
    g = generate_bytes(llama2, "", max_tokens=10, temperature=1.0, seed=3)
    assert g.text and len(g.chars) <= 10
    mean = ByteFormula(llama2, 'softunion(M, M(model="same"))', "The ca", models={"same": llama2}).logprobs()
    assert close(mean, ByteState(llama2, "The ca").logprobs(), 1e-9)


def test_a_normalising_tokenizer_is_refused(llama2):
    from tokenizers import normalizers

    from tokensteer.backends.torch.backend import HFTokenizer

    hf = llama2.tokenizer.hf.__class__(tokenizer_object=llama2.tokenizer.hf.backend_tokenizer)
    t = hf.backend_tokenizer
    t.pre_tokenizer = None
    t.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])

    class Fake:
        model_name = "lowercasing"
        tokenizer = HFTokenizer(hf, {2}, llama2.tokenizer.vocab_size)

    with pytest.raises(UserError, match="normalises text"):
        byte_vocab(Fake())


# llama.cpp ----------------------------------------------------------------------------------
def write_llama2_gguf(path, folder, sp) -> None:
    """The torch model of ``folder`` as a llama.cpp file with SentencePiece's vocabulary (pieces,
    scores, types) and add_space_prefix, as llama.cpp's converter writes Llama 2."""
    gguf = pytest.importorskip("gguf")
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(folder)
    sd, c = {k: v.float().numpy() for k, v in m.state_dict().items()}, m.config
    rope = lambda w, heads: w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    n = sp.get_piece_size()
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", rope(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", rope(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[p + theirs + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_llamacpp_runs_llama2_style_tokenizers(llama2_folders, llama2_models, sp, tmp_path):
    """llama.cpp's SentencePiece tokenizer (add_space_prefix) is found to write the dummy space and
    taken off the same way; the same weights give the same byte distributions as on torch."""
    pytest.importorskip("llama_cpp")
    th = llama2_models["metaspace"]
    path = tmp_path / "llama2-tiny.gguf"
    write_llama2_gguf(path, llama2_folders["metaspace"], sp)
    lc = tokensteer.load(str(path), backend="llamacpp")
    try:
        assert lc.tokenizer.vocab_type == "spm"
        for text in ["a", " a", "  two  spaces", "東京 x\n"]:
            assert lc.tokenizer.encode(text, add_bos=False) == sp.encode(text)
        v = byte_vocab(lc)
        assert v.prefix == b" " and v.pure and v.start == [1]
        for prompt in (b"", b" ", b"The harb", b"  two"):
            a, b = ByteState(lc, prompt).logprobs(), ByteState(th, prompt).logprobs()
            assert abs(float(a.exp().sum()) - 1) < 1e-9
            assert float((a.exp() - b.exp()).abs().max()) < 2e-3  # float32 on both, different kernels
    finally:
        lc.close()
