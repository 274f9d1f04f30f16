"""Base-model fingerprints and safetensors headers.

The fingerprint is a sha256 over every tensor's name, dtype, shape and raw bytes, in
sorted name order, read straight from the safetensors files in chunks: nothing is loaded
into torch, so it costs one sequential read. Equal weights give equal fingerprints
regardless of sharding or file order. A dequantized GGUF and the original safetensors
are different weights, so their fingerprints differ (by design).

We parse the safetensors header ourselves (8-byte length + JSON) because
``safetensors.safe_open`` cannot hand out raw bytes for every dtype without torch.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from edgepeft.errors import IntegrityError

FINGERPRINT_VERSION = 1
_CHUNK = 1 << 22
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def read(self) -> bytearray:
        """The tensor's raw bytes, with a plain read: unlike safetensors' mmap, nothing of the file
        stays resident once the caller drops the buffer."""
        buf = bytearray(self.end - self.start)
        with open(self.file, "rb") as f:
            f.seek(self.start)
            if f.readinto(buf) != len(buf):
                raise IntegrityError(f"{self.file} ends inside tensor {self.name}", "The file is truncated")
        return buf


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
             "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1,
             "F6_E3M2": 1, "C64": 8}


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Return (header dict, data offset). Every entry is typed and bounded, else IntegrityError naming it.

    The one safetensors header reader (fingerprint, base shapes, adapter load): a plain bounded read,
    strict UTF-8 JSON without NaN or duplicate keys, each tensor ``{dtype: known, shape: [ints >= 0],
    data_offsets: [start, end]}`` with ``end - start`` = numel x itemsize and the data inside the file.
    """
    from edgepeft.readers import loads_json

    path = Path(path)
    fix = "Re-download or re-save the file"
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise IntegrityError(f"{path} is not a safetensors file ({size} bytes, no header)",
                                 "Re-save the weights with save_pretrained(safe_serialization=True)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise IntegrityError(f"{path} has a corrupt safetensors header (length {n}, file {size} bytes)", fix)
        body = f.read(n)
    if len(body) != n:
        raise IntegrityError(f"{path} shrank while its header was read", fix)
    header = loads_json(body, f"safetensors header of {path}")
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: safetensors header is a JSON {type(header).__name__}, allowed: an object", fix)
    base = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise IntegrityError(f"{path}: safetensors __metadata__ is not allowed",
                                     "Allowed: an object of strings; " + fix)
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(meta, dict):
            raise IntegrityError(f"{where} header entry is a {type(meta).__name__}",
                                 "Allowed: {dtype, shape, data_offsets}; " + fix)
        dtype, shape, offs = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if dtype not in _ITEMSIZE:
            raise IntegrityError(f"{where} dtype={dtype!r} is not allowed", f"Allowed: {', '.join(_ITEMSIZE)}; {fix}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_uint(d) for d in shape):
            raise IntegrityError(f"{where} shape={shape!r} is not allowed",
                                 f"Allowed: a list of at most 8 integers >= 0; {fix}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_uint(o) for o in offs):
            raise IntegrityError(f"{where} data_offsets={offs!r} is not allowed",
                                 f"Allowed: [start, end], integers >= 0; {fix}")
        start, end = offs
        if not (start <= end and base + end <= size):
            raise IntegrityError(f"{where} lies past the end of the file ({size} bytes)",
                                 "The file is truncated; re-download or re-save it")
        numel = 1
        for d in shape:
            numel *= d
        if dtype not in ("F4", "F6_E2M3", "F6_E3M2") and numel * _ITEMSIZE[dtype] != end - start:
            raise IntegrityError(f"{where} has shape {shape} ({dtype}) but {end - start} data bytes", fix)
    return header, base


def _uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62


def tensor_entries(files: list[Path]) -> list[TensorEntry]:
    entries = []
    for fp in files:
        header, base = read_safetensors_header(fp)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            s, e = meta["data_offsets"]
            entries.append(TensorEntry(name, meta["dtype"], tuple(meta["shape"]), Path(fp), base + s, base + e))
    entries.sort(key=lambda t: t.name)
    return entries


def fingerprint_files(files: list[Path]) -> str:
    h = hashlib.sha256(f"edgepeft-fingerprint-v{FINGERPRINT_VERSION}\n".encode())
    for t in tensor_entries(files):
        h.update(f"{t.name}\0{t.dtype}\0{','.join(map(str, t.shape))}\0".encode())
        with open(t.file, "rb") as f:
            f.seek(t.start)
            left = t.end - t.start
            while left:
                buf = f.read(min(_CHUNK, left))
                if not buf:
                    raise IntegrityError(f"{t.file} ends inside tensor {t.name}", "The file is truncated")
                h.update(buf)
                left -= len(buf)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(_CHUNK):
            h.update(buf)
    return h.hexdigest()


def short(fp: str) -> str:
    return fp[:16]
