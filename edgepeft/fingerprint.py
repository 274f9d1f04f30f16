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
import json
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


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Return (header dict, data offset). Raises IntegrityError on a bad file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise IntegrityError(f"{path} is not a safetensors file ({size} bytes, no header)",
                                 "Re-save the weights with save_pretrained(safe_serialization=True)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise IntegrityError(f"{path} has a corrupt safetensors header (length {n}, file {size} bytes)",
                                 "Re-download or re-save the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IntegrityError(f"{path} has a corrupt safetensors header ({e})", "Re-download or re-save the file")
    base = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        if not (0 <= start <= end and base + end <= size):
            raise IntegrityError(f"{path}: tensor {name} lies past the end of the file ({size} bytes)",
                                 "The file is truncated; re-download or re-save it")
    return header, base


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
