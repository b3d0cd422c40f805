"""Exact byte-level probabilities on two tiny random models whose tokenizers are trained here on
tests/data/bytes_corpus.txt: a byte-level BPE (GPT-2 style) and a SentencePiece-style BPE with
byte fallback and no pre-tokenizer (Gemma style). A slow reference computes the same quantities
from scratch: full forward passes, canonicality checked on the whole text, covers enumerated by
depth-first search."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from conftest import save_random

import tokensteer
from tokensteer.bytes import END, ByteFormula, ByteState, generate_bytes, score, stream_bytes
from tokensteer.bytes.utf8 import completions, next_byte_mask, tail_state
from tokensteer.bytes.vocab import byte_vocab
from tokensteer.errors import UserError

CORPUS = (Path(__file__).parent / "data" / "bytes_corpus.txt").read_text(encoding="utf-8").splitlines()
NEG_INF = float("-inf")


def make_bpe_model(folder: Path, seed: int = 0) -> None:
    """GPT-2 style: byte-level pre-tokenizer, BPE over bytes, a 2-layer GPT-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    save_random(model, tok, folder, seed)


def make_sp_model(folder: Path, seed: int = 1) -> None:
    """Gemma style: spaces become "▁", BPE over the whole text, byte-fallback tokens <0x00>–<0xFF>,
    a 2-layer Llama."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.normalizer = normalizers.Replace(" ", "\u2581")
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")  # words while training only
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    spec = json.loads(t.to_str())["model"]
    vocab = spec["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    sp = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    sp.normalizer = normalizers.Replace(" ", "\u2581")
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    sp.add_special_tokens(specials)
    sp.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    save_random(model, tok, folder, seed)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bytes-bpe")
    make_bpe_model(folder)
    return folder


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bytes-sp")
    make_sp_model(folder)
    return folder


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    return tokensteer.load(str(bpe_dir), backend="torch")


@pytest.fixture(scope="module")
def sp(sp_dir):
    return tokensteer.load(str(sp_dir), backend="torch")


@pytest.fixture(params=["bpe", "sp"])
def lm(request):
    return request.getfixturevalue(request.param)


class Reference:
    """The byte-level model computed the slow way, from its definition: the token model restricted
    to canonical sequences (checked on the whole text, every token), covers by exhaustive search."""

    def __init__(self, lm) -> None:
        self.lm, self.v = lm, byte_vocab(lm)
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}

    def encode(self, text: str) -> list[int]:
        return self.lm.tokenizer.hf.encode(text, add_special_tokens=False)

    def canonical(self, seq: tuple[int, ...]) -> bool:
        data = b"".join(self.v.table[t] for t in seq)
        state = tail_state(data)
        if state is None:
            return False
        if state == 0:
            return self.encode(data.decode()) == list(seq)
        head = data[:-state].decode()
        return any(self.encode(head + c)[: len(seq)] == list(seq) for c in completions(data[-state:], 4096))

    def dist(self, seq: tuple[int, ...]) -> torch.Tensor:
        if seq not in self.cache:
            with torch.no_grad():
                logits = self.lm.model(input_ids=torch.tensor([self.v.start + list(seq)])).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            end = self.end_ok(seq)
            ok = torch.tensor([end if t in self.v.eos else bool(self.v.table[t]) and self.canonical(seq + (t,)) for t in range(len(lp))])
            lp = lp.masked_fill(~ok, NEG_INF)
            self.cache[seq] = lp - torch.logsumexp(lp, -1)
        return self.cache[seq]

    def end_ok(self, seq: tuple[int, ...]) -> bool:
        """Whether the text may end after ``seq`` (a canonical sequence): on a character boundary."""
        return tail_state(b"".join(self.v.table[t] for t in seq)) == 0

    def text_logprob(self, text: str) -> float:
        """log P(canonical encoding of text, then end of text) under the canonical token model."""
        ids = tuple(self.encode(text))
        total = sum(float(self.dist(ids[:i])[ids[i]]) for i in range(len(ids)))
        return total + float(torch.logsumexp(self.dist(ids)[self.v.eos], 0))

    def next_symbols(self, x: bytes) -> torch.Tensor:
        """Next-symbol log-probabilities after x, from every cover found by depth-first search."""
        acc = self.cover_sums(x)
        return torch.log(acc / acc.sum())

    def cover_sums(self, x: bytes) -> torch.Tensor:
        """[257] probabilities of x followed by each symbol (unnormalised), summed over covers."""
        acc = torch.zeros(257, dtype=torch.float64)

        def visit(seq: tuple[int, ...], mass: float, pos: int) -> None:
            d = self.dist(seq)
            for t in torch.nonzero(torch.isfinite(d)).flatten().tolist():
                m = mass + float(d[t])
                b = self.v.table[t]
                if t in self.v.eos:
                    acc[END] += math.exp(m) if pos == len(x) else 0.0
                elif pos == len(x):
                    acc[b[0]] += math.exp(m)
                elif pos + len(b) <= len(x):
                    if b == x[pos : pos + len(b)]:
                        visit(seq + (t,), m, pos + len(b))
                elif b.startswith(x[pos:]):
                    acc[b[len(x) - pos]] += math.exp(m)

        visit((), 0.0, 0)
        return acc


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    return bool((a.exp() - b.exp()).abs().max() < tol) and bool((torch.isinf(a) == torch.isinf(b)).all())


PROMPTS = [b"", b"The harb", b"The caf\xc3", b"a naive", b" \xe6\x9d", b"12 bo", b"Hello, world! "]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_next_byte_distribution_sums_to_one(lm, prompt):
    lp = ByteState(lm, prompt).logprobs()
    assert lp.shape == (257,)
    assert abs(float(lp.exp().sum()) - 1.0) < 1e-9
    assert float(lp.max()) > NEG_INF


@pytest.mark.parametrize("text", ["The baker opened the shop", "Über café 東京! 12 boats", "a  b\n\nc"])
def test_byte_logprobs_sum_to_the_canonical_token_logprob(lm, text):
    byte_lps, end = score(lm, text)
    assert len(byte_lps) == len(text.encode())
    got = math.fsum(byte_lps) + end
    want = Reference(lm).text_logprob(text)
    assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (got, want)


@pytest.mark.parametrize("x", [b"The ca", b"a caf\xc3", b" \xe6\x9d", b"is the b", b"9 t"])
def test_fast_path_matches_brute_force_covers(lm, x):
    assert close(ByteState(lm, x).logprobs(), Reference(lm).next_symbols(x))


def test_prompt_split_points_agree(lm):
    """Starting from a prompt (tokens before its last fixed boundary run in one prefill) gives the
    same distributions as pushing the same bytes one by one."""
    text = "The teacher asked the class to write a story".encode()
    pushed = ByteState(lm, b"")
    for k, b in enumerate(text):
        pushed.push(b)
        if k % 7 == 3:
            assert close(ByteState(lm, text[: k + 1]).logprobs(), pushed.logprobs(), 1e-5)
    assert pushed.p > len(text) // 2  # the fixed boundary followed the text


def test_about_one_forward_pass_per_byte(lm):
    text = CORPUS[0].encode()
    st = ByteState(lm, b"")
    for b in text:
        st.logprobs()
        st.push(b)
    assert st.forwards <= len(text) + 1
    assert len(st.nodes) < 30  # nodes behind the fixed boundary are dropped


def test_memory_stays_bounded_without_boundaries(sp):
    """A long run no token boundary is fixed in (no spaces) keeps only recent nodes."""
    st = ByteState(sp, b"")
    for b in b"the" * 40:
        st.push(b)
    assert st.p == 0 and len(st.nodes) <= 2 * st.v.maxlen + 3
    assert abs(float(st.logprobs().exp().sum()) - 1) < 1e-9


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["the", " ", "ca", "f", "é", "東", "12", "\n", "ō", "s"]), max_size=8), st.integers(0, 3))
def test_any_prompt_gives_a_distribution(bpe, sp, pieces, cut):
    data = "".join(pieces).encode()
    data = data[: max(0, len(data) - cut)]  # may end inside a character
    for lm in (bpe, sp):
        lp = ByteState(lm, data).logprobs()
        assert abs(float(lp.exp().sum()) - 1.0) < 1e-9


@given(st.text(max_size=6), st.integers(0, 24))
def test_utf8_masks_allow_exactly_the_bytes_that_keep_text_valid(text, cut):
    data = text.encode("utf-8")[:cut]
    pending = tail_state(data)
    assert pending is not None  # every prefix of valid UTF-8 is a valid start
    mask = next_byte_mask(data[len(data) - pending :])
    for b in range(256):
        assert bool(mask[b]) == (tail_state(data + bytes([b])) is not None), (data, b)
    assert bool(mask[END]) == (pending == 0)
    for c in completions(data[len(data) - pending :], 8) if pending else []:
        assert (data[: len(data) - pending] + c.encode()).decode()  # completes to valid text


# ensembles ----------------------------------------------------------------------------------
@pytest.mark.parametrize("formula", ['softunion(M, M(model="same"))', 'normalized: 0.3*M + 0.7*M(model="same")',
                                     'min(M, M(model="same"))', 'max(M, M(model="same"))'])
def test_an_ensemble_of_a_model_with_itself_equals_the_model(lm, formula):
    for prompt in (b"The harb", b"a caf\xc3"):
        f = ByteFormula(lm, formula, prompt, models={"same": lm})
        assert len(f.states) == 2  # two sessions, each with its own cache
        assert close(f.logprobs(), ByteState(lm, prompt).logprobs(), 1e-9)


def test_ensembles_across_tokenizers(bpe, sp):
    prompt = "The fishing bo"
    assert bpe.tokenizer.encode(prompt, add_bos=False) != sp.tokenizer.encode(prompt, add_bos=False)
    pa, pb = ByteState(bpe, prompt).logprobs(), ByteState(sp, prompt).logprobs()
    mean = ByteFormula(bpe, 'softunion(M, M(model="sp"))', prompt, models={"sp": sp}).logprobs()
    assert close(mean, torch.log((pa.exp() + pb.exp()) / 2), 1e-9)
    prod = ByteFormula(bpe, 'M + M(model="sp")', prompt, models={"sp": sp}).logprobs()
    assert close(prod, torch.log_softmax(pa + pb, -1), 1e-9)
    g = generate_bytes(bpe, prompt, formula='normalized: 0.5*M + 0.5*M(model="sp")', models={"sp": sp}, max_tokens=12, temperature=1.0, seed=0)
    assert len(g.chars) == 12 and g.finish_reason == "length"


def test_mixing_token_and_byte_level_terms_is_refused(bpe, sp_dir):
    with pytest.raises(UserError, match="byte by byte"):  # a guide scores whole tokens
        ByteFormula(bpe, 'M + C("positive")', "The")
    from tokensteer.formula import FormulaControl

    with pytest.raises(UserError, match="--byte-level"):  # token by token, vocabularies must match
        tokensteer.generate(bpe, "The", max_tokens=2, controls=[FormulaControl(bpe, f'M + M(model="{sp_dir}")')])


# generation ---------------------------------------------------------------------------------
def check_greedy_bytes(lm, prompt: str, max_tokens: int = 15):
    """Greedy byte-level generation picks each step's argmax among the bytes UTF-8 allows, with its
    log-probability; returns the generation and the state that followed it."""
    g = generate_bytes(lm, prompt, max_tokens=max_tokens)
    st, pending = ByteState(lm, prompt), b""
    for b, lp in zip(g.tokens, g.logprobs):
        dist = st.logprobs().float().masked_fill(~next_byte_mask(pending), NEG_INF)
        assert int(dist.argmax()) == b
        assert abs(float(torch.log_softmax(dist, -1)[b]) - lp) < 1e-5
        st.push(b)
        pending = b"" if tail_state(pending + bytes([b])) == 0 else pending + bytes([b])
    return g, st


def test_greedy_generation_follows_the_argmax(lm):
    g, _ = check_greedy_bytes(lm, "The harb")
    assert g.text == bytes(g.tokens).decode("utf-8", "replace")[: len(g.text)]


def test_seeds_and_streaming(lm):
    a = generate_bytes(lm, "The", max_tokens=14, temperature=1.0, top_p=0.95, seed=7)
    b = generate_bytes(lm, "The", max_tokens=14, temperature=1.0, top_p=0.95, seed=7)
    c = generate_bytes(lm, "The", max_tokens=14, temperature=1.0, top_p=0.95, seed=8)
    assert a.text == b.text and a.tokens == b.tokens and a.text != c.text
    events = list(stream_bytes(lm, "The", max_tokens=14, temperature=1.0, top_p=0.95, seed=7))
    assert "".join(e.text for e in events) == a.text
    assert [e.token for e in events if e.token != END] == a.tokens
    # max_tokens counts characters, and per-character log-probabilities add up their bytes
    assert a.finish_reason == "length" and len(a.chars) == 14 and "".join(a.chars) == a.text
    assert math.isclose(sum(a.char_logprobs), sum(a.logprobs), abs_tol=1e-6)
    assert len(a.tokens) == len(a.text.encode())


def test_stop_strings_match_bytes(lm):
    full = generate_bytes(lm, "The baker", max_tokens=24, temperature=1.0, seed=1)
    stop = full.text[12:14]
    cut = full.text[: full.text.find(stop)]
    g = generate_bytes(lm, "The baker", max_tokens=24, temperature=1.0, seed=1, stop=[stop])
    assert g.finish_reason == "stop" and g.text == cut
    streamed = "".join(e.text for e in stream_bytes(lm, "The baker", max_tokens=24, temperature=1.0, seed=1, stop=[stop]))
    assert streamed == cut


def test_batch_of_prompts_and_bad_options(bpe):
    gs = generate_bytes(bpe, ["The", "A girl"], max_tokens=5, temperature=1.0, seed=3)
    assert [g.prompt for g in gs] == ["The", "A girl"] and all(len(g.chars) == 5 for g in gs)
    assert generate_bytes(bpe, "The", max_tokens=0).text == ""
    with pytest.raises(UserError, match="repetition penalty"):
        generate_bytes(bpe, "The", repetition_penalty=1.2)


def test_tokenizers_that_do_not_spell_text_back_are_refused(sp):
    from tokenizers import normalizers

    from tokensteer.backends.torch.backend import HFTokenizer

    hf = sp.tokenizer.hf.__class__(tokenizer_object=sp.tokenizer.hf.backend_tokenizer)
    hf.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "\u2581")])

    class Fake:
        model_name = "lowercasing"
        tokenizer = HFTokenizer(hf, {1}, sp.tokenizer.vocab_size)

    with pytest.raises(UserError, match="byte for byte"):
        byte_vocab(Fake())


# command line -------------------------------------------------------------------------------
def test_cli_byte_level(bpe_dir, sp_dir):
    from typer.testing import CliRunner

    from tokensteer.cli import app

    run = lambda *a: CliRunner().invoke(app, ["generate", *a, "--model", str(bpe_dir), "--backend", "torch", "--byte-level"])
    r = run("The harb", "-n", "6", "--json", "--top-logprobs", "2", "-t", "1", "--seed", "4")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.output.strip().splitlines()[-1])
    assert obj["byte_level"] and len(obj["chars"]) == 6 and "".join(c["text"] for c in obj["chars"]) == obj["text"]
    assert all(math.isclose(c["logprob"], sum(b["logprob"] for b in c["bytes"]), abs_tol=1e-6) for c in obj["chars"])
    assert all(len(b["top"]) == 2 for c in obj["chars"] for b in c["bytes"])
    streamed = run("The harb", "-n", "6", "-t", "1", "--seed", "4")
    assert streamed.exit_code == 0 and obj["text"] in streamed.output
    mixed = run("The harb", "-n", "4", "--formula", f'softunion(M, M(model="{sp_dir}"))')
    assert mixed.exit_code == 0, mixed.output
    for bad in (["--ban", "the"], ["--formula", 'M + C("positive")'], ["--repetition-penalty", "1.3"]):
        r = run("The", *bad)
        assert r.exit_code == 2 and "byte" in r.output, r.output
