"""Reading GGUF files and writing the head-only model (the output layer alone) from one."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokensteer.files import atomic_write, drop_written_pages


def head_path(src: Path, cache: Path) -> Path:
    """Where the head model of ``src`` is kept: named by the file's path, size and time."""
    st = src.stat()
    key = hashlib.sha1(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache / f"{src.stem}.head-{key}.gguf"


_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


class _Reader:
    """Just enough of the GGUF layout to walk it (the ``gguf`` package's reader is slow to
    parse a large vocabulary into Python objects; we only need to copy those bytes)."""

    def __init__(self, buf, off: int = 0) -> None:
        self.buf, self.off = buf, off

    def uint(self, n: int) -> int:
        v = int.from_bytes(self.buf[self.off : self.off + n], "little")
        self.off += n
        return v

    def string(self) -> bytes:
        n = self.uint(8)
        self.off += n
        return bytes(self.buf[self.off - n : self.off])

    def skip_value(self, vtype: int) -> None:
        if vtype == _STRING:
            n = self.uint(8)  # (not ``self.off += self.uint(8)``: that adds to the offset before the read)
            self.off += n
        elif vtype == _ARRAY:
            etype, count = self.uint(4), self.uint(8)
            if etype in _SCALAR:
                self.off += _SCALAR[etype] * count
            else:
                for _ in range(count):
                    self.skip_value(etype)
        else:
            self.off += _SCALAR[vtype]


@dataclass
class Layout:
    """Where things are in a GGUF file: the metadata bytes, the block count's value, and each
    tensor as (name, dims, ggml type, first byte, byte count)."""

    n_kv: int
    kv: range
    block_count: tuple[int, int] | None  # (offset, width) of its value
    align: int
    tensors: list[tuple[str, list[int], int, int, int]]


def layout(buf) -> Layout:
    """Walk a GGUF file's header (``buf``: bytes or an mmap). Raises ValueError on anything else."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        r = _Reader(buf)
        if bytes(buf[:4]) != b"GGUF" or not 2 <= int.from_bytes(buf[4:8], "little") <= 3:
            raise ValueError("not a GGUF v2/v3 file")
        r.off = 8
        n_tensors, n_kv = r.uint(8), r.uint(8)
        kv_start, patch, align = r.off, None, 32
        for _ in range(n_kv):
            key, vtype = r.string(), r.uint(4)
            if key.endswith(b".block_count") and vtype in (4, 5, 10, 11):
                patch = (r.off, _SCALAR[vtype])
            if key == b"general.alignment" and vtype == 4:
                align = int.from_bytes(buf[r.off : r.off + 4], "little")
            r.skip_value(vtype)
        kv = range(kv_start, r.off)
        infos = []
        for _ in range(n_tensors):
            name, nd = r.string(), r.uint(4)
            dims = [r.uint(8) for _ in range(nd)]
            infos.append((name.decode(), dims, r.uint(4), r.uint(8)))
        data = -(-r.off // align) * align
        tensors = []
        for name, dims, ttype, offset in infos:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            tensors.append((name, dims, ttype, data + offset, math.prod(dims) // block * size))
    except (IndexError, ValueError, KeyError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the file as GGUF: {e}") from None
    return Layout(n_kv, kv, patch, align, tensors)


def read_tensor(path: Path, name: str) -> tuple[int, list[int], bytes]:
    """One tensor of a GGUF file: its ggml type, dims (row length first) and raw bytes."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for t_name, dims, ttype, start, n in layout(buf).tensors:
            if t_name == name:
                return ttype, dims, buf[start : start + n]
    raise KeyError(name)


def build_head(src: Path, dst: Path) -> None:
    """Write the head model of the GGUF file ``src`` to ``dst`` (atomically): its metadata with one
    block, that block's matrices zero, the final norm's weight one, the output matrix and any
    other tensor copied (the input embedding too when it doubles as the output matrix).
    Raises ValueError when the file has no RMS-normed output layer to copy."""
    import mmap

    from gguf import GGMLQuantizationType

    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        lay = layout(buf)
        if lay.block_count is None:
            raise ValueError("no block count")
        kv = bytearray(buf[lay.kv.start : lay.kv.stop])
        pos, width = lay.block_count[0] - lay.kv.start, lay.block_count[1]
        kv[pos : pos + width] = (1).to_bytes(width, "little")
        n_kv, align = lay.n_kv, lay.align
        names = {t[0] for t in lay.tensors}
        if "output_norm.weight" not in names or "output_norm.bias" in names or not any(n.startswith("blk.0.") for n in names):
            raise ValueError("no RMS-normed output layer")
        q4 = int(GGMLQuantizationType.Q4_0)
        out: list[tuple[str, list[int], int, bytes | range]] = []  # data, or the source bytes to copy
        untied = "output.weight" in names  # then the input embedding is never read (rows come as embeddings)
        for name, dims, ttype, first, size in lay.tensors:
            count = math.prod(dims)
            if name.startswith("blk.") and not name.startswith("blk.0."):
                continue
            if name.startswith("blk.") or (untied and name == "token_embd.weight"):
                if len(dims) >= 2 and dims[0] % 32 == 0:  # a zero matrix, as small as it gets
                    out.append((name, dims, q4, bytes(count // 32 * 18)))
                else:
                    out.append((name, dims, 0, bytes(4 * count)))  # F32 zeros
            elif name == "output_norm.weight":
                out.append((name, dims, 0, np.ones(count, np.float32).tobytes()))
            else:
                out.append((name, dims, ttype, range(first, first + size)))

        def write(tmp: str) -> None:
            with open(tmp, "wb") as w:
                w.write(b"GGUF" + (3).to_bytes(4, "little") + len(out).to_bytes(8, "little") + n_kv.to_bytes(8, "little"))
                w.write(kv)
                offset = 0
                for name, dims, ttype, data in out:
                    raw = name.encode()
                    w.write(len(raw).to_bytes(8, "little") + raw + len(dims).to_bytes(4, "little"))
                    w.write(b"".join(d.to_bytes(8, "little") for d in dims) + ttype.to_bytes(4, "little") + offset.to_bytes(8, "little"))
                    offset += -(-len(data) // align) * align
                w.write(bytes(-w.tell() % align))
                for _, _, _, data in out:
                    if isinstance(data, range):  # copied from the source in 16 MB pieces
                        for i in range(data.start, data.stop, 1 << 24):
                            w.write(buf[i : min(data.stop, i + (1 << 24))])
                    else:
                        w.write(data)
                    w.write(bytes(-len(data) % align))
            drop_written_pages(tmp)  # read back through readahead, the output layer streams faster

        atomic_write(dst, write, user_error=False)


