"""Interchange with llama.cpp control-vector GGUF files (and repeng, which writes the same format).

llama.cpp adds tensor ``direction.N`` to the output of 0-based decoder layer N (its graph calls
``build_cvec(cur, il)`` after layer il's residual add) and rejects N = 0, so layer 0's output cannot
be steered there; our layer index maps to N unchanged. llama.cpp ignores metadata, so the export
folds the strength into the tensors; our own metadata and the unscaled vectors ride along as
GGUF key-values (which llama.cpp skips), so importing our export gives back the exact numbers.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from tokensteer.errors import UserError
from tokensteer.files import atomic_write
from tokensteer.steering.vecfile import FORMAT, FORMAT_VERSION, LAYER_CONVENTION, SteeringVector, check_writable, expand, validate

ARCH = "controlvector"
META_KEY = "tokensteer.metadata"
STRENGTH_KEY = "tokensteer.folded_strength"


def export_gguf(
    vec: SteeringVector, path: str | Path, strength: float | None = None, layers: Sequence[int] | None = None
) -> Path:
    """Write a llama.cpp control vector: ``direction.N`` = strength × vector of layer N, atomically."""
    import gguf

    from tokensteer.steering.apply import MAX_STRENGTH, dose

    path = expand(path)
    if path.suffix.lower() != ".gguf":
        raise UserError(f"{path}: the llama.cpp control vector must be written to a .gguf file")
    strength = vec.recommended_strength if strength is None else float(strength)
    if not math.isfinite(strength) or abs(strength) > MAX_STRENGTH:  # the limit --steer applies
        raise UserError(f"strength must be a finite number with |strength| ≤ {MAX_STRENGTH:g}, got {strength:g}")
    layers = list(vec.recommended_layers if layers is None else layers)
    if 0 in layers:
        raise UserError("llama.cpp cannot steer the output of layer 0 (it rejects direction.0); choose layers ≥ 1")
    missing = [i for i in layers if i not in vec.vectors]
    if missing:
        raise UserError(f"the vector has no direction for layer(s) {missing}; it has {vec.layers}")
    meta = {k: v for k, v in vec.meta.items() if k != "path"}
    meta.setdefault("format", FORMAT)
    meta.setdefault("format_version", FORMAT_VERSION)

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_string(f"{ARCH}.model_hint", str(meta.get("model", {}).get("id", "unknown")))
        w.add_uint32(f"{ARCH}.layer_count", len(layers))
        w.add_string(META_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True))
        w.add_float32(STRENGTH_KEY, strength)
        w.add_array("tokensteer.exported_layers", [int(i) for i in layers])
        for i in vec.layers:
            w.add_array(f"tokensteer.layer.{i}", vec.vectors[i].to(torch.float32).tolist())
        for i, p in sorted(vec.probes.items()):
            w.add_array(f"tokensteer.probe.{i}", p.to(torch.float32).tolist())
        for i in sorted(layers):
            w.add_tensor(f"direction.{i}", dose(vec.vectors[i], strength).numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    check_writable(path)
    atomic_write(path, write)
    return path


def _field(reader, key: str) -> Any:
    f = reader.get_field(key)
    try:
        return None if f is None else f.contents()
    except UnicodeDecodeError:
        raise UserError(f"{getattr(reader.data, 'filename', 'the GGUF')}: field {key} is not UTF-8 text (corrupt file)") from None


def import_gguf(path: str | Path) -> SteeringVector:
    """Read a control-vector GGUF: ours exactly; llama.cpp's or repeng's as raw-unit vectors."""
    import gguf

    path = expand(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError, EOFError) as e:
        why = "truncated or corrupt" if isinstance(e, (IndexError, EOFError)) else e
        raise UserError(f"{path} is not a readable GGUF file ({why})") from None
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise UserError(f"{path} is a GGUF of architecture {arch!r}, not a control vector ({ARCH!r})")
    directions: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        if not m:
            raise UserError(f"{path} has tensor {t.name!r}; control vectors hold only direction.N tensors")
        data = _tensor_values(t, path)
        if data.ndim != 1 and not (data.ndim == 2 and 1 in data.shape):
            raise UserError(f"{path}: tensor {t.name} is not one-dimensional")
        directions[int(m.group(1))] = torch.from_numpy(np.array(data, dtype=np.float32).reshape(-1))
    if not directions:
        raise UserError(f"{path} holds no direction tensors")
    sizes = {v.shape[0] for v in directions.values()}
    if len(sizes) != 1:
        raise UserError(f"{path} mixes direction sizes {sorted(sizes)}")
    raw_meta = _field(reader, META_KEY)
    if raw_meta is not None:
        try:
            meta = json.loads(raw_meta)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            vectors, probes = {}, {}
            for f in reader.fields.values():
                m = re.fullmatch(r"tokensteer\.(layer|probe)\.(\d+)", f.name)
                if m:
                    (vectors if m.group(1) == "layer" else probes)[int(m.group(2))] = torch.tensor(np.array(f.contents(), dtype=np.float32))
        except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise UserError(f"{path} has corrupt tokensteer metadata ({type(e).__name__}); re-export it") from None
        meta["path"] = str(path)
        meta.setdefault("gguf", {})["folded_strength"] = _field(reader, STRENGTH_KEY)
        vec = SteeringVector(vectors, meta, probes)
    else:
        hint = _field(reader, f"{ARCH}.model_hint")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "layer_convention": LAYER_CONVENTION,
            "model": {"id": hint, "hidden_size": sizes.pop()},
            "units": "raw",
            "method": {"name": "imported", "from": "repeng" if hint else "llama.cpp", "file": path.name},
            "recommended": {"layers": sorted(directions), "strength": 1.0, "positions": "all", "by": "import (raw units, as llama.cpp applies it)"},
            "path": str(path),
        }
        vec = SteeringVector(directions, meta)
    validate(vec, path)
    return vec


def _tensor_values(t, path: Path) -> np.ndarray:
    """A tensor's numbers in the shape llama.cpp reads them: float types as they are, quantized
    types dequantized (their raw ``data`` is bytes, which read as floats would be garbage)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if t.tensor_type in (T.F32, T.F16, T.F64):
        return np.asarray(t.data)
    try:
        return gguf.quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise UserError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which tokensteer cannot read ({e})") from None


def from_repeng(control_vector, model_id: str | None = None) -> SteeringVector:
    """Convert an in-memory ``repeng.ControlVector`` (``directions``: layer -> array, same layer convention)."""
    directions = {int(k): torch.tensor(np.asarray(v, dtype=np.float32)) for k, v in control_vector.directions.items()}
    hidden = next(iter(directions.values())).shape[0]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layer_convention": LAYER_CONVENTION,
        "model": {"id": model_id or getattr(control_vector, "model_type", None), "hidden_size": hidden},
        "units": "raw",
        "method": {"name": "imported", "from": "repeng"},
        "recommended": {"layers": sorted(directions), "strength": 1.0, "positions": "all", "by": "import"},
    }
    return SteeringVector(directions, meta)
