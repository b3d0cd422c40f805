"""Fixtures: a tiny random-weight model made inside the tests, and the real bundled model."""

from __future__ import annotations

import pytest
import torch

import tokensteer  # noqa: F401  (sets the offline flags before transformers loads)

CORPUS = [
    "the cat sat on the mat and the dog ran to the park",
    "a quick brown fox jumps over the lazy dog every day",
    "good great happy kind bad awful sad rude hello world",
    "one two three four five six seven eight nine ten.",
] * 20


def make_tiny_model(folder, seed: int = 0) -> None:
    """A 2-layer Gemma 3 text model with a byte-level BPE tokenizer trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.add_bos_token = True
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    save_random(Gemma3ForCausalLM(cfg), tok, folder)


def save_random(model, tok, folder, seed: int | None = None) -> None:
    """Give a tiny model larger random weights (peaked, varied distributions; drawn after
    ``torch.manual_seed(seed)`` when a seed is given) and save it with its tokenizer."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def deny_reading(monkeypatch, name: str) -> None:
    """Make ``Path.read_text`` of any file called ``name`` fail as an unreadable file does (also for root)."""
    from pathlib import Path

    orig = Path.read_text

    def denied(self, *a, **k):
        if self.name == name:
            raise PermissionError(13, "Permission denied", str(self))
        return orig(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gemma")
    make_tiny_model(folder)
    return folder


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return tokensteer.load(str(tiny_dir), backend="torch")


@pytest.fixture(scope="session")
def bundled():
    """The real bundled Gemma 3 270M on the torch backend (converted once into the cache)."""
    return tokensteer.load(None, backend="torch")
