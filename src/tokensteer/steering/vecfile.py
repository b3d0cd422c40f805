"""The steering-vector file: safetensors tensors per layer plus JSON metadata with full provenance.

Tensor ``layer.{i}`` is the vector added to the OUTPUT of 0-based decoder layer ``i`` at strength
1.0. For trained vectors it has the length of that layer's median residual norm, so strength is a
fraction of the typical residual norm and means the same on every layer and model ("relative"
units); imported foreign vectors keep their raw numbers ("raw" units). ``probe.{i}`` holds a
logistic probe's weights for the GCAV minimal-push mode.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokensteer.errors import UserError, check_can_write, expand
from tokensteer.files import atomic_write

FORMAT = "tokensteer-steering-vector"
FORMAT_VERSION = 1
LAYER_CONVENTION = "0-based decoder layer index; the vector is added to the residual stream output of that layer"
MISMATCH_ENV = "TOKENSTEER_ALLOW_VECTOR_MISMATCH"


def model_signature(lm) -> dict[str, Any]:
    """What identifies a model for steering, computable on every backend."""
    arch = {"n_layers": int(lm.n_layers), "hidden_size": int(lm.hidden_size), "vocab_size": int(lm.tokenizer.vocab_size)}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    return {"id": lm.model_name, "config_hash": digest, **arch}


@dataclass
class SteeringVector:
    """Per-layer vectors (the dose added at strength 1.0) and their metadata."""

    vectors: dict[int, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    probes: dict[int, torch.Tensor] = field(default_factory=dict)  # [H + 1]: weights then bias

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def recommended_layers(self) -> list[int]:
        rec = self.meta.get("recommended", {}).get("layers")
        return list(rec) if rec else self.layers

    @property
    def recommended_strength(self) -> float:
        return float(self.meta.get("recommended", {}).get("strength", 0.1 if self.units == "relative" else 1.0))

    @property
    def units(self) -> str:
        return self.meta.get("units", "relative")

    def check_model(self, lm, allow_other_model: bool | None = None) -> None:
        """Raise a clear UserError if this vector was made for a different model than ``lm``."""
        if allow_other_model is None:
            allow_other_model = os.environ.get(MISMATCH_ENV, "") not in ("", "0")
        want = self.meta.get("model", {})
        have = model_signature(lm)
        name = self.meta.get("path", "the steering vector")
        if self.hidden_size != have["hidden_size"]:
            raise UserError(
                f"{name} has hidden size {self.hidden_size} but model {have['id']} has {have['hidden_size']}: "
                f"it was made for {want.get('id', 'another model')}; train a vector for this model with `tokensteer steer train`"
            )
        bad = [i for i in self.layers if not 0 <= i < have["n_layers"]]
        if bad:
            raise UserError(f"{name} has layers {bad} but model {have['id']} has layers 0–{have['n_layers'] - 1}")
        if allow_other_model or not want.get("config_hash"):
            return
        if want["config_hash"] != have["config_hash"] or want.get("id") != have["id"]:
            raise UserError(
                f"{name} was trained on model {want.get('id')!r} ({want.get('n_layers')} layers, hidden "
                f"{want.get('hidden_size')}, vocab {want.get('vocab_size')}) but this is {have['id']!r} "
                f"({have['n_layers']} layers, hidden {have['hidden_size']}, vocab {have['vocab_size']}); retrain it "
                f"with `tokensteer steer train --model ...`, or set {MISMATCH_ENV}=1 to use it anyway"
            )


def check_writable(path: Path, flag: str = "output") -> None:
    """Raise a UserError if ``path`` cannot be written as a file: it is a folder, a file stands
    where one of its parent folders must be, or its folder takes no new files."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    check_can_write(path, flag)


def save_vector(vec: SteeringVector, path: str | Path) -> Path:
    """Write ``vec`` atomically (temp file + rename) as safetensors with JSON metadata."""
    from safetensors.torch import save_file

    path = expand(path)  # as load_vector reads it: a quoted "~/v.safetensors" is the home folder's
    if path.suffix.lower() == ".gguf":
        raise UserError(f"{path}: vector files are .safetensors; make a llama.cpp GGUF with `tokensteer steer export`")
    tensors = {f"layer.{i}": v.detach().to(torch.float32).contiguous().clone() for i, v in vec.vectors.items()}
    tensors |= {f"probe.{i}": p.detach().to(torch.float32).contiguous().clone() for i, p in vec.probes.items()}
    meta = {k: v for k, v in vec.meta.items() if k != "path"}
    meta.setdefault("format", FORMAT)
    meta.setdefault("format_version", FORMAT_VERSION)
    meta.setdefault("layer_convention", LAYER_CONVENTION)
    meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    header = {"tokensteer": json.dumps(meta, ensure_ascii=False, sort_keys=True)}
    check_writable(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


def load_vector(path: str | Path) -> SteeringVector:
    """Read a vector file; mistakes (missing, not ours, newer format) become UserErrors."""
    from safetensors import SafetensorError, safe_open

    path = expand(path)
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a folder; give a steering vector file (.safetensors or .gguf)")
    if not path.is_file():
        raise UserError(f"steering vector file {str(path)!r} does not exist; make one with `tokensteer steer train`")
    if path.suffix.lower() == ".gguf":
        from tokensteer.steering.gguf_io import import_gguf

        return import_gguf(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors steering vector ({e})") from None
    if "tokensteer" not in header:
        raise UserError(f"{path} is a safetensors file without tokensteer metadata; it is not a steering vector")
    try:
        meta = json.loads(header["tokensteer"])
        if not isinstance(meta, dict):
            raise ValueError("the metadata is not a JSON object")
        if meta.get("format") != FORMAT:
            raise UserError(f"{path} is not a tokensteer steering vector (format {meta.get('format')!r})")
        vectors, probes = {}, {}
        for k, v in tensors.items():
            kind, _, idx = k.partition(".")
            if kind in ("layer", "probe"):
                if not idx.isdigit() or str(int(idx)) != idx:
                    raise ValueError(f"tensor name {k!r}")
                (vectors if kind == "layer" else probes)[int(idx)] = v
    except (ValueError, TypeError, AttributeError, IndexError) as e:  # JSONDecodeError is a ValueError
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path} has corrupt tokensteer metadata or tensors; retrain or re-export it") from None
    meta["path"] = str(path)
    vec = SteeringVector(vectors, meta, probes)
    validate(vec, path)
    return vec


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate(vec: SteeringVector, path: str | Path) -> None:
    """Raise a one-line UserError unless ``vec`` is usable: finite one-dimensional vectors of one size,
    probes of that size plus a bias, and metadata fields of the types the rest of tokensteer reads."""

    def bad(why: str) -> UserError:
        return UserError(f"{path} has corrupt tokensteer metadata or tensors ({why}); retrain or re-export it")

    meta = vec.meta
    try:
        version = meta.get("format_version", 0)
        if not _is_int(version) and not (isinstance(version, float) and version.is_integer()):
            raise bad(f"format_version {version!r}")
        if int(version) > FORMAT_VERSION:
            raise UserError(f"{path} uses vector format {version}; this tokensteer reads up to {FORMAT_VERSION}: upgrade it")
        for k in ("model", "recommended", "pairs", "method", "stats"):
            if not isinstance(meta.get(k, {}), dict):
                raise bad(f"{k} must be a mapping")
        for k in ("n_layers", "hidden_size"):
            if k in meta.get("model", {}) and not _is_int(meta["model"][k]):
                raise bad(f"model.{k} must be a whole number")
        if not isinstance(meta.get("units", "relative"), str):
            raise bad("units must be a string")
        rec = meta.get("recommended", {})
        if "layers" in rec and (not isinstance(rec["layers"], list) or not all(_is_int(i) for i in rec["layers"])):
            raise bad("recommended.layers must be a list of layer numbers")
        s = rec.get("strength", 0.0)
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
            raise bad(f"recommended.strength {s!r} is not a finite number")
        if not isinstance(rec.get("positions", "all"), str):
            raise bad("recommended.positions must be a string")
        g = rec.get("guard")
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g <= 1):
            raise bad(f"recommended.guard {g!r} is not a top-p in (0, 1]")
    except AttributeError:
        raise bad("metadata fields of the wrong type") from None
    if not vec.vectors:
        raise UserError(f"{path} holds no layer vectors")
    shapes = {tuple(v.shape) for v in vec.vectors.values()}
    if len(shapes) > 1 or any(v.dim() != 1 or v.numel() == 0 for v in vec.vectors.values()):
        raise bad("layer vectors must be one-dimensional and of one size")
    hidden = vec.hidden_size
    if any(p.dim() != 1 or p.shape[0] != hidden + 1 for p in vec.probes.values()):
        raise bad(f"probe weights must have {hidden + 1} numbers (hidden size plus a bias)")
    for kind, ts in (("layer", vec.vectors), ("probe", vec.probes)):
        for i, t in sorted(ts.items()):
            if not t.is_floating_point():  # complex, bool or integer numbers cannot be added to a residual stream
                raise bad(f"{kind} {i} holds {str(t.dtype).removeprefix('torch.')} numbers, not real floating-point ones")
            if not bool(torch.isfinite(t.to(torch.float32)).all()):
                raise bad(f"{kind} {i} holds NaN or infinite numbers")
