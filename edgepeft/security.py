"""The bounded binary readers: every GGUF, ``.onnx_adapter`` and ``.onnx`` header edgepeft reads.

This is the only place those formats are parsed (inspect, bench, pack, verify, the fit
checks and every runtime load call it; no gguf-py ``GGUFReader``). Files are read with
plain bounded ``read()``s, never mmap, so a file that shrinks while it is read is an
error, not a SIGBUS. The walkers here are bounded: every length, count and offset read from the file
is checked against the bytes that remain before anything is sliced or allocated, so a
truncated, bit-flipped or hostile file costs at most one pass over its header and ends
in an :class:`IntegrityError` naming what is wrong. They never hand the file to a
library that trusts its offsets.

- GGUF: magic, version, tensor/KV counts, every key/value, every tensor's dims and type,
  data offsets aligned and inside the file (sizes from gguf-py's ``GGML_QUANT_SIZES``).
- ``.onnx_adapter``: ORT's flatbuffers ``Adapter`` table (file identifier ``TORT``):
  root/vtable/vector offsets inside the file, dims and dtype sizes matching raw data.
- ``.onnx``: external-data locations stay inside the model folder (no absolute, no ``..``).
"""

from __future__ import annotations

import array
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgepeft.errors import IntegrityError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY_LEN = 1 << 16
_FIX = "Re-export or re-download it"

MAX_STRING = 64 << 20  # one metadata string (chat templates are KBs; nothing legitimate is near this)
# GGUF value type -> struct of one scalar (8 = string, 9 = array handled apart); bool read as a byte
_GGUF_SCALARS = {t: struct.Struct("<" + f) for t, f in
                 {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}.items()}
_ARRAY_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}
_UINT32, _BOOL, _STRING, _ARRAY = 4, 7, 8, 9
_U32, _U64, _QQ, _IQ = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<QQ"), struct.Struct("<IQ")


@dataclass
class GGUFTensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length (numpy shape reversed)
    type: int
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy/PyTorch order."""
        return tuple(reversed(self.ne))


@dataclass
class GGUFHeader:
    path: Path
    version: int
    size: int
    metadata: dict = field(default_factory=dict)  # key -> decoded value (arrays as lists)
    types: dict = field(default_factory=dict)  # key -> GGUF value type (arrays: (9, element type))
    tensors: dict[str, GGUFTensorInfo] = field(default_factory=dict)


class _Stream:
    """Little-endian reader over an open file: plain bounded ``read()``s, never mmap.

    Every length is checked against the bytes the file had when it was opened, and a short
    read (the file shrank while it was read) is an :class:`IntegrityError`, not a SIGBUS.
    """

    _CHUNK = 1 << 20

    def __init__(self, f, label: str, size: int):
        self.f, self.path, self.size = f, label, size
        self.pos = 0  # absolute offset of the next byte
        self.buf, self.bpos = b"", 0

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left():
            raise IntegrityError(f"{self.path}: {what} needs {n} bytes at offset {self.pos} but only "
                                 f"{self.left()} remain; the file is truncated or corrupt", _FIX)

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        avail = len(self.buf) - self.bpos
        if avail < n:
            want = min(max(n - avail, self._CHUNK), self.size - self.pos - avail)
            more = self.f.read(want)
            if len(more) < n - avail:
                raise IntegrityError(f"{self.path} shrank while it was read (at byte {self.pos + avail + len(more)} "
                                     f"of {self.size})", "Do not modify the file while edgepeft reads it")
            self.buf, self.bpos = self.buf[self.bpos:] + more, 0
        b = self.buf[self.bpos:self.bpos + n]
        self.bpos += n
        self.pos += n
        return b

    def unpack(self, st: struct.Struct, what: str):
        return st.unpack(self.read(st.size, what))

    def string(self, what: str, limit: int) -> str:
        (n,) = self.unpack(_U64, f"{what} length")
        if n > limit:
            raise IntegrityError(f"{self.path}: {what} claims {n} bytes (limit {limit}); the file is corrupt", _FIX)
        return self.read(n, what).decode("utf-8", "replace")


def _regular_file(path: Path, kind: str, label: str | None = None) -> int:
    shown = label or str(path)
    path = Path(path)
    if not path.exists():
        raise IntegrityError(f"{shown} does not exist", "Check the path")
    if path.is_dir():
        raise IntegrityError(f"{shown} is a directory, expected a {kind} file", f"Pass the {kind} file itself")
    if not path.is_file():
        raise IntegrityError(f"{shown} is not a regular file", f"Pass a {kind} file")
    size = path.stat().st_size
    if size == 0:
        raise IntegrityError(f"{shown} is empty (0 bytes)", _FIX)
    return size


def check_gguf_header(path: Path, label: str | None = None) -> GGUFHeader:
    """Walk the whole GGUF header with every size bounded; return names, shapes and metadata.

    The one GGUF reader: every other module reads GGUF metadata through this. ``label`` names
    the file in errors when ``path`` is a descriptor path (``/proc/self/fd/N``).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    label = label or str(path)
    _regular_file(path, ".gguf", label)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        c = _Stream(f, label, size)
        magic = c.read(min(4, size), "magic")
        if magic != GGUF_MAGIC:
            raise IntegrityError(f"{label} is not a GGUF file (magic {magic!r})",
                                 "Pass a .gguf written by llama.cpp or edgepeft")
        (version,) = c.unpack(_U32, "version")
        if version not in GGUF_VERSIONS:
            raise IntegrityError(f"{label}: unsupported GGUF version {version} (supported: 2, 3)",
                                 "Re-export with a current llama.cpp/edgepeft")
        n_tensors, n_kv = c.unpack(_QQ, "tensor and key counts")
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise IntegrityError(f"{label}: implausible GGUF header ({n_tensors} tensors, {n_kv} keys); "
                                 "the file is corrupt", _FIX)
        hdr = GGUFHeader(Path(label), version, size)
        for _ in range(n_kv):
            key = c.string("metadata key", MAX_KEY_LEN)
            if key in hdr.metadata:
                raise IntegrityError(f"{label}: metadata key {key!r} appears twice (llama.cpp refuses such files)", _FIX)
            (vtype,) = c.unpack(_U32, f"type of {key!r}")
            hdr.metadata[key], hdr.types[key] = _gguf_value(c, vtype, key)
        infos = []
        for i in range(n_tensors):
            name = c.string(f"tensor {i} name", MAX_KEY_LEN)
            (n_dims,) = c.unpack(_U32, f"tensor {name!r} rank")
            if not 1 <= n_dims <= MAX_DIMS:
                raise IntegrityError(f"{label}: tensor {name!r} has {n_dims} dims (1-{MAX_DIMS} allowed); "
                                     "the file is corrupt", _FIX)
            ne = struct.unpack(f"<{n_dims}Q", c.read(8 * n_dims, f"tensor {name!r} dims"))
            ttype, offset = c.unpack(_IQ, f"tensor {name!r} type/offset")
            infos.append((name, ne, ttype, offset))
        align = hdr.metadata.get("general.alignment", 32)
        if "general.alignment" in hdr.types and hdr.types["general.alignment"] != _UINT32:
            raise IntegrityError(f"{label}: general.alignment is stored as GGUF type "
                                 f"{hdr.types['general.alignment']}, allowed: uint32 (type {_UINT32})", _FIX)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise IntegrityError(f"{label}: general.alignment={align!r} is not a power of two", _FIX)
        data_start = (c.pos + align - 1) // align * align
    for name, ne, ttype, offset in infos:
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise IntegrityError(f"{label}: tensor {name!r} has unknown ggml type {ttype}", _FIX) from None
        n = 1
        for d in ne:
            if d <= 0 or d > 1 << 40:
                raise IntegrityError(f"{label}: tensor {name!r} has dimension {d}; the file is corrupt", _FIX)
            n *= d
        if ne[0] % block:
            raise IntegrityError(f"{label}: tensor {name!r} row length {ne[0]} is not a multiple of the "
                                 f"{qtype.name} block size {block}; the file is corrupt", _FIX)
        nbytes = n // block * type_size
        if offset % align:
            raise IntegrityError(f"{label}: tensor {name!r} offset {offset} is not {align}-byte aligned", _FIX)
        start = data_start + offset
        if start + nbytes > size:
            raise IntegrityError(f"{label}: tensor {name!r} ends at byte {start + nbytes} past the file end ({size}); "
                                 "it is truncated", _FIX)
        if name in hdr.tensors:
            raise IntegrityError(f"{label}: tensor {name!r} appears twice", _FIX)
        hdr.tensors[name] = GGUFTensorInfo(name, tuple(ne), ttype, start, nbytes)
    return hdr


def _gguf_value(c: _Stream, vtype: int, key: str):
    """(value, type) of one metadata entry; arrays are decoded in full (bounded by the file's bytes)."""
    if vtype in _GGUF_SCALARS:
        st = _GGUF_SCALARS[vtype]
        (v,) = c.unpack(st, f"value of {key!r}")
        if vtype == _BOOL and v not in (0, 1):
            raise IntegrityError(f"{c.path}: metadata {key!r} is a bool stored as {v}; allowed: 0 or 1", _FIX)
        return (bool(v) if vtype == _BOOL else v), vtype
    if vtype == _STRING:
        return c.string(f"value of {key!r}", MAX_STRING), vtype
    if vtype == _ARRAY:
        (sub,) = c.unpack(_U32, f"array type of {key!r}")
        (n,) = c.unpack(_U64, f"array length of {key!r}")
        if sub in _GGUF_SCALARS:
            st = _GGUF_SCALARS[sub]
            vals = array.array(_ARRAY_CODES[sub], c.read(n * st.size, f"array {key!r}"))  # 1x the file's bytes
            if sys.byteorder != "little":
                vals.byteswap()
            return vals, (_ARRAY, sub)
        if sub == _STRING:
            c.need(n * 8, f"array {key!r}")  # each string has at least its 8-byte length
            return [c.string(f"string in {key!r}", MAX_STRING) for _ in range(n)], (_ARRAY, sub)
        raise IntegrityError(f"{c.path}: metadata {key!r} is an array of unsupported type {sub}", _FIX)
    raise IntegrityError(f"{c.path}: metadata {key!r} has unknown value type {vtype}; the file is corrupt", _FIX)


def read_metadata(path: Path, prefix: str = "") -> dict:
    """Decoded GGUF metadata whose keys start with ``prefix`` (tokenizer arrays left out)."""
    return {k: v for k, v in check_gguf_header(path).metadata.items()
            if k.startswith(prefix) and not k.startswith(("tokenizer.ggml.", "GGUF."))}


# --- .onnx_adapter (ORT flatbuffers) ----------------------------------------------------

ADAPTER_IDENTIFIER = b"TORT"
ADAPTER_FORMAT_VERSIONS = (1,)
MAX_PARAMETERS = 1 << 16
MAX_ADAPTER_BYTES = 8 << 30  # read whole (adapters are MBs); refuse anything absurd before allocating
MAX_ONNX_GRAPH_BYTES = 2 << 30  # protobuf's own limit for one message
# ORT TensorDataType -> bytes per element (STRING=8 is refused: adapters never hold strings)
_ORT_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16,
                 16: 2, 17: 1, 18: 1, 19: 1, 20: 1}


@dataclass
class AdapterParam:
    name: str
    shape: tuple[int, ...]
    data_type: int
    nbytes: int


@dataclass
class OnnxAdapterHeader:
    path: Path
    format_version: int
    adapter_version: int
    model_version: int
    params: dict[str, AdapterParam]


class _FB:
    """Minimal bounded flatbuffers table reader (only what the Adapter schema uses)."""

    def __init__(self, buf: bytes, path: Path):
        self.buf, self.path = buf, path

    def u32(self, off: int, what: str) -> int:
        self._need(off, 4, what)
        return struct.unpack_from("<I", self.buf, off)[0]

    def _need(self, off: int, n: int, what: str) -> None:
        if off < 0 or n < 0 or off + n > len(self.buf):
            raise IntegrityError(f"{self.path}: {what} at offset {off} (+{n}) lies outside the file "
                                 f"({len(self.buf)} bytes); it is truncated or corrupt", _FIX)

    def field(self, table: int, index: int, what: str) -> int | None:
        """Absolute position of field ``index`` of the table at ``table``, or None if absent."""
        self._need(table, 4, what)
        vtable = table - struct.unpack_from("<i", self.buf, table)[0]
        self._need(vtable, 4, f"{what} vtable")
        vt_size, _ = struct.unpack_from("<HH", self.buf, vtable)
        if vt_size < 4 or vt_size % 2:
            raise IntegrityError(f"{self.path}: {what} has a corrupt vtable", _FIX)
        self._need(vtable, vt_size, f"{what} vtable")
        slot = 4 + 2 * index
        if slot + 2 > vt_size:
            return None
        rel = struct.unpack_from("<H", self.buf, vtable + slot)[0]
        return table + rel if rel else None

    def scalar(self, table: int, index: int, fmt: str, what: str, default=0):
        pos = self.field(table, index, what)
        if pos is None:
            return default
        self._need(pos, struct.calcsize("<" + fmt), what)
        return struct.unpack_from("<" + fmt, self.buf, pos)[0]

    def deref(self, pos: int, what: str) -> int:
        return pos + self.u32(pos, what)

    def vector(self, table: int, index: int, elem: int, what: str) -> tuple[int, int]:
        """(start, length) of a vector field, bounds checked; (0, 0) if absent."""
        pos = self.field(table, index, what)
        if pos is None:
            return 0, 0
        vec = self.deref(pos, what)
        n = self.u32(vec, f"{what} length")
        self._need(vec + 4, n * elem, what)
        return vec + 4, n


def check_onnx_adapter(path: Path, label: str | None = None) -> OnnxAdapterHeader:
    """Validate an ``.onnx_adapter`` file's flatbuffer structure before ORT reads it."""
    path = Path(path)
    _regular_file(path, ".onnx_adapter", label)
    buf = _read_all(path, label, MAX_ADAPTER_BYTES, ".onnx_adapter")
    path = Path(label or path)
    size = len(buf)
    if size < 8:
        raise IntegrityError(f"{path} is too short for an .onnx_adapter ({size} bytes)", _FIX)
    if buf[4:8] != ADAPTER_IDENTIFIER:
        raise IntegrityError(f"{path} is not an .onnx_adapter (identifier {buf[4:8]!r}, expected b'TORT')",
                             "Pass a file written by onnxruntime.AdapterFormat or edgepeft export --format onnx")
    fb = _FB(buf, path)
    root = fb.deref(0, "root table")
    fmt_v = fb.scalar(root, 0, "i", "format_version")
    if fmt_v not in ADAPTER_FORMAT_VERSIONS:
        raise IntegrityError(f"{path}: unsupported adapter format version {fmt_v} (supported: 1)",
                             "Re-export with the installed onnxruntime")
    hdr = OnnxAdapterHeader(path, fmt_v, fb.scalar(root, 1, "i", "adapter_version"),
                            fb.scalar(root, 2, "i", "model_version"), {})
    start, n = fb.vector(root, 3, 4, "parameters")
    if n > MAX_PARAMETERS:
        raise IntegrityError(f"{path}: implausible parameter count {n}; the file is corrupt", _FIX)
    for i in range(n):
        p = fb.deref(start + 4 * i, f"parameter {i}")
        s, ln = fb.vector(p, 0, 1, f"parameter {i} name")
        name = bytes(buf[s:s + ln]).decode("utf-8", "replace")
        ds, nd = fb.vector(p, 1, 8, f"parameter {name} dims")
        if nd > 8:
            raise IntegrityError(f"{path}: parameter {name} has {nd} dims; the file is corrupt", _FIX)
        dims = struct.unpack_from(f"<{nd}q", buf, ds) if nd else ()
        dtype = fb.scalar(p, 2, "i", f"parameter {name} data_type")
        if dtype not in _ORT_ITEMSIZE:
            raise IntegrityError(f"{path}: parameter {name} has unsupported data type {dtype}", _FIX)
        _, nraw = fb.vector(p, 3, 1, f"parameter {name} raw_data")
        numel = 1
        for d in dims:
            if d < 0:
                raise IntegrityError(f"{path}: parameter {name} has negative dimension {d}", _FIX)
            numel *= d
        if numel * _ORT_ITEMSIZE[dtype] != nraw:
            raise IntegrityError(f"{path}: parameter {name} has shape {list(dims)} but {nraw} data bytes; "
                                 "the file is corrupt", _FIX)
        if name in hdr.params:
            raise IntegrityError(f"{path}: parameter {name} appears twice", _FIX)
        hdr.params[name] = AdapterParam(name, tuple(dims), dtype, nraw)
    return hdr


# --- .onnx models -----------------------------------------------------------------------

def _read_all(path: Path, label: str | None, limit: int, kind: str) -> bytes:
    """A whole (small) file with one bounded read; a file that shrinks meanwhile is an error, not a crash."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise IntegrityError(f"{label or path} is {size} bytes, more than any {kind} edgepeft reads ({limit})", _FIX)
        buf = f.read(size)
    if len(buf) != size:
        raise IntegrityError(f"{label or path} shrank while it was read ({len(buf)} of {size} bytes)",
                             "Do not modify the file while edgepeft reads it")
    return buf


def load_onnx_graph(path: Path, label: str | None = None):
    """An ONNX model's graph (no external data), parsed from one bounded read."""
    import onnx

    path = Path(path)
    _regular_file(path, ".onnx", label)
    raw = _read_all(path, label, MAX_ONNX_GRAPH_BYTES, ".onnx graph")
    try:
        return onnx.load_model_from_string(raw)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError, RecursionError on deep nesting, and friends
        raise IntegrityError(f"{label or path} is not a valid ONNX model ({type(e).__name__}, {len(raw)} bytes)",
                             _FIX) from None


def check_onnx_model(path: Path, label: str | None = None, resolve=None) -> None:
    """An ONNX model's external-data files must stay inside its folder and exist at the stated sizes.

    ``resolve(rel)`` maps a folder-relative location to the file to check (a bundle passes its
    hashed descriptors, so an unlisted file is never opened); by default it is looked up beside ``path``.
    """
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    path = Path(path)
    shown = label or str(path)
    model = load_onnx_graph(path, label)
    folder = path.parent.resolve()
    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        rel = Path(loc)
        nums = {}
        for k in ("offset", "length"):
            v = info.get(k, "0") or "0"
            if not v.isdigit() or len(v) > 19:
                raise IntegrityError(f"{shown}: tensor {t.name!r} has external-data {k}={v!r}",
                                     "Allowed: a non-negative integer; re-export the model")
            nums[k] = int(v)
        if not loc or rel.is_absolute() or ".." in rel.parts or "\\" in loc or "\0" in loc:
            raise IntegrityError(f"{shown}: tensor {t.name!r} points at external data {loc!r} outside "
                                 "the model folder", "Refusing to load it; re-export the model")
        if resolve is not None:
            target = resolve(rel.as_posix())
        else:
            target = (folder / rel).resolve()
            if not target.is_relative_to(folder):
                raise IntegrityError(f"{shown}: tensor {t.name!r} points at external data {loc!r} outside "
                                     "the model folder", "Refusing to load it; re-export the model")
        if target is None or not Path(target).is_file():
            raise IntegrityError(f"{shown}: external data file {loc} for tensor {t.name!r} is missing", _FIX)
        end = nums["offset"] + nums["length"]
        if end > Path(target).stat().st_size:
            raise IntegrityError(f"{shown}: tensor {t.name!r} ends at byte {end} past the end of {loc}", _FIX)


def check_artifact(path: Path, label: str | None = None, resolve=None) -> None:
    """Dispatch on the suffix; runtimes call this on any file before handing it to native code."""
    path = Path(path)
    suffix = Path(label or path).suffix.lower()
    if suffix == ".gguf":
        check_gguf_header(path, label)
    elif suffix == ".onnx_adapter":
        check_onnx_adapter(path, label)
    elif suffix == ".onnx":
        check_onnx_model(path, label, resolve)
    else:
        _regular_file(path, suffix or "model", label)
