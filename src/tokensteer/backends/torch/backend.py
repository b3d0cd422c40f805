"""The reference backend: any local Hugging Face causal LM through PyTorch, with every hook.

Residual edits and hidden-state reads go through one permanent forward hook per decoder layer,
which looks at the session that is running; with no edits the hook returns at once. Long prompts
are prefilled in chunks (``kvselect.prefill``), and attention runs through ``kvselect``'s
function, which is plain SDPA until TokenSelect is turned on (``set_kv_select``).
"""

from __future__ import annotations

import functools
import pickle
import re
import struct
import threading
import weakref
from typing import Callable, Sequence

import torch

from tokensteer.backends.rowmix import RowMix
from tokensteer.backends.torch.session import TorchSession
from tokensteer.backends.torch.packed import pack_decoder_layers, pack_output_layer
from tokensteer.backends.base import (
    HEAD_MIX,
    HIDDEN_STATES,
    LOAD_HF,
    RESIDUAL_ADD,
    RESIDUAL_FIRST,
    RESIDUAL_FN,
    ROW_EDITS,
    MARKER,
    Backend,
    Tokenizer,
)
from tokensteer.errors import UserError
from tokensteer.hooks import EditContext, ResidualEdit
from tokensteer.kvselect import KV_SELECT, PREFILL_CHUNK, KVSelectConfig, install, new_selector, parse_kv_select, prefill_chunks, use
from tokensteer.models import ModelSource, quiet_gguf_reader

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class HFTokenizer(Tokenizer):
    """A transformers tokenizer behind the loop's small tokenizer interface."""

    def __init__(self, tok, eos_ids: set[int], vocab_size: int) -> None:
        self.hf = tok
        self.vocab_size = vocab_size
        self.eos_ids = frozenset(eos_ids)
        self.bos_id = tok.bos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        added = getattr(tok, "added_tokens_decoder", {}) or {}
        self.special_ids = frozenset(tok.all_special_ids) | frozenset(
            i for i, t in added.items() if t.special or MARKER.match(t.content)
        )

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_bos)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token, recovering byte-fallback (``<0xE2>``) and byte-level BPE pieces."""
        if token_id in self.special_ids:
            return b""
        text = self.decode([token_id])
        piece = self.hf.convert_ids_to_tokens(token_id)
        if "\ufffd" in text and isinstance(piece, str):
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            if m:
                return bytes([int(m.group(1), 16)])
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        if isinstance(piece, str) and piece.startswith("\u2581"):
            spelled = piece.replace("\u2581", " ")
            if text == spelled[1:]:
                text = spelled  # a decoder that strips the dummy prefix space drops it from a lone "▁…" token
        return text.encode("utf-8")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character that stands for each byte, reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(extra))]
    return {chr(c): b for b, c in zip(printable + extra, chars)}


def _eos_ids(model, tok) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return ids


def _first_lines(e: BaseException) -> str:
    """The gist of a loading error on one line: its first line, or its first two where the first
    only announces the second (``Validation error for field 'x':`` then the error itself)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def _decoder_layers(model) -> torch.nn.ModuleList:
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise UserError(f"cannot find the decoder layers of {type(model).__name__}; steering needs them")


class TorchBackend(Backend):
    """PyTorch/transformers backend: the reference with every capability."""

    name = "torch"
    capabilities = frozenset({RESIDUAL_ADD, RESIDUAL_FN, RESIDUAL_FIRST, HIDDEN_STATES, LOAD_HF, ROW_EDITS})

    def __init__(self, model, tokenizer: HFTokenizer, model_name: str) -> None:
        self.model = model.eval()
        self.packed_head = pack_output_layer(model)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.layers = _decoder_layers(model)
        self.packed_layers = pack_decoder_layers(self.layers)
        self.n_layers = len(self.layers)
        text_config = model.config.get_text_config()
        self.hidden_size = int(text_config.hidden_size)
        self.trained = getattr(text_config, "max_position_embeddings", None)
        self.context_length = self.trained
        self.dtype = next(model.parameters()).dtype
        self.kv_select: KVSelectConfig | None = None  # TokenSelect for every session, when set
        self._selectors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KV cache -> its Selector
        self._bound: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KV cache -> its own settings
        self.last_selector = None
        self.prefill_chunk = PREFILL_CHUNK
        self.progress: Callable[[int, int], None] | None = None  # (prompt tokens done, in all) during a prefill
        if install(model):
            self.capabilities = self.capabilities | {KV_SELECT}
        self.set_kv_select(None)
        self._lock = threading.Lock()
        self._edits: dict[int, list[ResidualEdit]] = {}
        self._ctx = EditContext("prefill", 0)
        self._record: dict[int, torch.Tensor] | None = None
        self._mix: RowMix | None = None  # the running forward's row mixes, applied before the output layer
        for i, layer in enumerate(self.layers):
            layer.register_forward_hook(self._make_hook(i))
        head = model.get_output_embeddings()
        softcap = getattr(text_config, "final_logit_softcapping", None)
        if isinstance(head, torch.nn.Linear) and head.bias is None and not softcap:  # logits linear in the hidden state
            head.register_forward_pre_hook(self._mix_rows)
            self.capabilities = self.capabilities | {HEAD_MIX}

    def set_kv_select(self, spec: str | KVSelectConfig | dict | bool | None) -> KVSelectConfig | None:
        """Turn TokenSelect on for the sessions opened from now on ("on", "k=1024,theta=0.95", a
        config) or off (None, "off"); ``extrapolate=on`` lifts the trained-length limit."""
        cfg = parse_kv_select(spec)
        if cfg is not None and KV_SELECT not in self.capabilities:
            raise UserError(f"{self.model_name} does not run SDPA attention (eager, e.g. soft-capped logits), so --kv-select cannot run on it")
        self.kv_select = cfg
        self.prefill_chunk = cfg.chunk if cfg is not None else PREFILL_CHUNK
        self.context_length = None if cfg is not None and cfg.extrapolate else self.trained
        self.context_hint = (
            f", or read past the {self.trained} tokens {self.model_name} was trained to with --kv-select extrapolate=on "
            "(Python: kv_select='extrapolate=on')" if self.trained and KV_SELECT in self.capabilities else ""
        )
        return cfg

    def bind_kv_select(self, cache, spec: str | KVSelectConfig | dict | bool | None) -> None:
        """Give the sequences in ``cache`` their own TokenSelect settings (a session's, a request's),
        in place of the backend's ``kv_select``; None or "off" makes them dense."""
        self._bound[cache] = parse_kv_select(spec)

    def selector(self, cache):
        """The TokenSelect state of the sequences in ``cache`` (made on first use), or None when off."""
        cfg = self._bound[cache] if cache in self._bound else self.kv_select
        if cfg is None:
            return None
        sel = self._selectors.get(cache)
        if sel is None or sel.cfg != cfg:
            sel = self._selectors[cache] = new_selector(self.model, cfg)
        self.last_selector = sel  # its counts (selection-cache hit rate) outlive the session
        return sel

    @classmethod
    def load(cls, source: ModelSource, dtype: str = "float32", kv_select: str | KVSelectConfig | None = None) -> "TorchBackend":
        from huggingface_hub.errors import StrictDataclassError
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our CLI shows its own progress line

        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        kw = {"dtype": DTYPES[dtype]}
        folder, extra = (source.path.parent, {"gguf_file": source.path.name}) if source.kind == "gguf" else (source.path, {})
        try:
            with quiet_gguf_reader():
                model = AutoModelForCausalLM.from_pretrained(folder, **extra, **kw)
                tok = AutoTokenizer.from_pretrained(folder, **extra)
        except pickle.UnpicklingError as e:
            raise UserError(
                f"cannot load model {source.path}: its pickled weights (.bin) hold Python objects besides tensors, and "
                "unpickling those could run code, so they are refused; use the model's .safetensors weights"
            ) from e
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, SafetensorError, StrictDataclassError,
                struct.error, IndexError, EOFError) as e:  # corrupt, odd or truncated files, or a config.json of the wrong shape
            raise UserError(f"cannot load model {source.path}: {_first_lines(e)}") from e
        vocab = int(model.get_output_embeddings().weight.shape[0])
        backend = cls(model, HFTokenizer(tok, _eos_ids(model, tok), vocab), source.name)
        backend.set_kv_select(kv_select)
        return backend

    def _make_hook(self, i: int):
        def hook(module, args, output):
            edits, record = self._edits.get(i), self._record
            if not edits and record is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            for e in edits or ():
                if (e.positions == "prompt" and self._ctx.phase != "prefill") or (
                    e.positions == "generated" and self._ctx.phase != "decode"
                ):
                    continue
                if e.fn is not None:
                    hidden = e.fn(hidden, self._ctx)
                else:
                    v = e.vector.to(hidden.dtype)
                    hidden = hidden + (v if v.dim() == 1 else v[:, None, :])
            if record is not None:
                record[i] = hidden.detach()
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _mix_rows(self, module, args):
        """Output-layer pre-hook: replace mixed groups of rows [N, T, H] by their combinations (``RowMix``)."""
        m = self._mix
        if m is None or not m.mixes:
            return None
        return (m.apply(args[0]), *args[1:])

    def session(
        self, edits: Sequence[ResidualEdit] = (), rollback: bool = False, mix: torch.Tensor | None = None,
        capacity: int | None = None, isolated: bool = False,
    ) -> "TorchSession":
        """Rows are always isolated here: each has its own cache rows, padded on the left."""
        if mix is not None and HEAD_MIX not in self.capabilities:
            raise UserError(f"{self.model_name}'s output layer is not linear (a bias or logit soft-capping); it cannot mix rows")
        why = self.unsupported(edits)
        if why:
            raise UserError(why)
        return TorchSession(self, edits, rollback, mix)

    def unsupported(self, edits: Sequence[ResidualEdit]) -> str | None:
        for e in edits:
            if not 0 <= e.layer < self.n_layers:
                return f"layer {e.layer} is out of range: this model has layers 0–{self.n_layers - 1}"
            if e.vector is not None and e.vector.shape[-1] != self.hidden_size:
                return f"a steering vector of size {e.vector.shape[-1]} does not fit hidden size {self.hidden_size}"
        return super().unsupported(edits)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache, edits: dict[int, list[ResidualEdit]],
                phase: str, mix: RowMix | None, keep: int) -> torch.Tensor:
        """Run ``ids`` [N, T] through the model with ``cache``, applying ``edits`` (by layer) and the
        row ``mix``; return the float logits of the last ``keep`` positions, [N', keep, V]. A prompt
        longer than ``prefill_chunk`` goes in chunks, reporting to ``progress``."""
        with self._lock:
            self._edits, self._ctx, self._mix = edits, EditContext(phase, ids.shape[0]), mix
            try:
                sel = self.selector(cache)
                chunk = sel.cfg.chunk if sel is not None else self.prefill_chunk  # a cache's own setting chunks its prompts
                with use(sel):
                    if phase == "prefill" and keep == 1 and ids.shape[1] > chunk:
                        return prefill_chunks(self.model, ids, cache, mask, positions, chunk, self.progress, sel is not None and sel.cfg.dense_tail)[:, None]
                    out = self.model(
                        input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=keep
                    )
            finally:
                self._edits, self._mix = {}, None
        return out.logits.float()

    @torch.inference_mode()
    def continuation_nll(self, ctx: Sequence[Sequence[int]], cont: Sequence[Sequence[int]]) -> list[float]:
        """One right-padded forward pass over contexts and continuations together."""
        seqs = [[*c, *x] for c, x in zip(ctx, cont)]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.tokenizer.pad_id or 0, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        with self._lock:
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return [-float(lp[i, len(c) - 1 : len(c) - 1 + len(x)].sum()) for i, (c, x) in enumerate(zip(ctx, cont))]

    @torch.inference_mode()
    def hidden_states(self, texts: Sequence[str], layers: Sequence[int]) -> list[torch.Tensor]:
        out = []
        with self._lock:
            self._edits, self._record = {}, {}
            try:
                rows = [self.tokenizer.encode(text) for text in texts]
                for s in range(0, len(rows), 16):  # batched, right-padded: one forward per 16 texts
                    chunk = rows[s : s + 16]
                    width = max(len(r) for r in chunk)
                    ids = torch.tensor([r + [self.tokenizer.pad_id] * (width - len(r)) for r in chunk])
                    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk])
                    self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
                    for b, r in enumerate(chunk):
                        out.append(torch.stack([self._record[layer][b, : len(r)].float() for layer in layers]))
            finally:
                self._record = None
        return out


