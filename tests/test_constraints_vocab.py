"""The constraints' token table: special tokens write no text whatever the disk cache holds."""

from __future__ import annotations

from tokensteer.constraints import vocab


def test_stale_cache_cannot_give_special_tokens_text(tiny, tmp_path, monkeypatch):
    """A vocab cache written before special tokens rendered as b"" (it gave <start_of_image> its
    name's bytes, so --end-word padded texts with it) is corrected on load."""
    monkeypatch.setenv("TOKENSTEER_HOME", str(tmp_path))
    tok = tiny.tokenizer
    special = sorted(tok.special_ids - tok.eos_ids)
    assert special
    vocab.forget(tok)
    fresh = vocab.token_table(tok)
    assert all(fresh.tokens[i] == b"" and bool(fresh.empty[i]) for i in special)
    (path,) = (tmp_path / "vocab").glob("*.npz")
    stale = [b"<special>" if i in special else t for i, t in enumerate(fresh.tokens)]
    vocab.write_cache(path, stale)
    vocab.forget(tok)
    again = vocab.token_table(tok)
    assert all(again.tokens[i] == b"" and bool(again.empty[i]) for i in special)
    assert again.tokens == fresh.tokens
