"""Header sanity checks that run before any file reaches a C++ runtime (llama.cpp, ORT).

Both parsers here are bounded walkers: every length, count and offset read from the file
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

import mmap
import struct
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

# GGUF value type -> struct format of one scalar (8 = string, 9 = array handled apart)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


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
    metadata: dict = field(default_factory=dict)  # scalars and strings only; arrays as their length
    tensors: dict[str, GGUFTensorInfo] = field(default_factory=dict)


class _Cursor:
    """Little-endian reader over a mapped file that refuses to read past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.size, self.pos = buf, path, len(buf), 0

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left():
            raise IntegrityError(f"{self.path}: {what} needs {n} bytes at offset {self.pos} but only "
                                 f"{self.left()} remain; the file is truncated or corrupt", _FIX)

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def unpack(self, fmt: str, what: str):
        st = struct.Struct("<" + fmt)
        self.need(st.size, what)
        v = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return v

    def string(self, what: str, limit: int | None = None) -> bytes:
        (n,) = self.unpack("Q", f"{what} length")
        if limit is not None and n > limit:
            raise IntegrityError(f"{self.path}: {what} claims {n} bytes (limit {limit}); the file is corrupt", _FIX)
        return self.read(n, what)


def _regular_file(path: Path, kind: str) -> int:
    path = Path(path)
    if not path.exists():
        raise IntegrityError(f"{path} does not exist", "Check the path")
    if path.is_dir():
        raise IntegrityError(f"{path} is a directory, expected a {kind} file", f"Pass the {kind} file itself")
    if not path.is_file():
        raise IntegrityError(f"{path} is not a regular file", f"Pass a {kind} file")
    size = path.stat().st_size
    if size == 0:
        raise IntegrityError(f"{path} is empty (0 bytes)", _FIX)
    return size


def check_gguf_header(path: Path) -> GGUFHeader:
    """Walk the whole GGUF header with every size bounded; return names, shapes and scalar metadata."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = _regular_file(path, ".gguf")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        c = _Cursor(mm, path)
        magic = mm[:4]
        c.pos = len(magic)
        if magic != GGUF_MAGIC:
            raise IntegrityError(f"{path} is not a GGUF file (magic {magic!r})",
                                 "Pass a .gguf written by llama.cpp or edgepeft")
        (version,) = c.unpack("I", "version")
        if version not in GGUF_VERSIONS:
            raise IntegrityError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)",
                                 "Re-export with a current llama.cpp/edgepeft")
        n_tensors, n_kv = c.unpack("QQ", "tensor and key counts")
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise IntegrityError(f"{path}: implausible GGUF header ({n_tensors} tensors, {n_kv} keys); "
                                 "the file is corrupt", _FIX)
        hdr = GGUFHeader(path, version, size)
        for _ in range(n_kv):
            key = c.string("metadata key", MAX_KEY_LEN).decode("utf-8", "replace")
            (vtype,) = c.unpack("I", f"type of {key}")
            hdr.metadata[key] = _gguf_value(c, vtype, key, depth=0)
        infos = []
        for i in range(n_tensors):
            name = c.string(f"tensor {i} name", MAX_KEY_LEN).decode("utf-8", "replace")
            (n_dims,) = c.unpack("I", f"tensor {name} rank")
            if not 1 <= n_dims <= MAX_DIMS:
                raise IntegrityError(f"{path}: tensor {name} has {n_dims} dims (1-{MAX_DIMS} allowed); "
                                     "the file is corrupt", _FIX)
            ne = c.unpack("Q" * n_dims, f"tensor {name} dims")
            ttype, offset = c.unpack("IQ", f"tensor {name} type/offset")
            infos.append((name, ne, ttype, offset))
        align = hdr.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise IntegrityError(f"{path}: general.alignment={align!r} is not a power of two", _FIX)
        data_start = (c.pos + align - 1) // align * align
    for name, ne, ttype, offset in infos:
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise IntegrityError(f"{path}: tensor {name} has unknown ggml type {ttype}", _FIX) from None
        n = 1
        for d in ne:
            if d <= 0 or d > 1 << 40:
                raise IntegrityError(f"{path}: tensor {name} has dimension {d}; the file is corrupt", _FIX)
            n *= d
        if ne[0] % block:
            raise IntegrityError(f"{path}: tensor {name} row length {ne[0]} is not a multiple of the "
                                 f"{qtype.name} block size {block}; the file is corrupt", _FIX)
        nbytes = n // block * type_size
        if offset % align:
            raise IntegrityError(f"{path}: tensor {name} offset {offset} is not {align}-byte aligned", _FIX)
        start = data_start + offset
        if start + nbytes > size:
            raise IntegrityError(f"{path}: tensor {name} ends at byte {start + nbytes} past the file end ({size}); "
                                 "it is truncated", _FIX)
        if name in hdr.tensors:
            raise IntegrityError(f"{path}: tensor {name} appears twice", _FIX)
        hdr.tensors[name] = GGUFTensorInfo(name, tuple(ne), ttype, start, nbytes)
    return hdr


def _gguf_value(c: _Cursor, vtype: int, key: str, depth: int):
    if vtype in _GGUF_SCALARS:
        (v,) = c.unpack(_GGUF_SCALARS[vtype], f"value of {key}")
        return v
    if vtype == _STRING:
        return c.string(f"value of {key}").decode("utf-8", "replace")
    if vtype == _ARRAY and depth == 0:
        (sub,) = c.unpack("I", f"array type of {key}")
        (n,) = c.unpack("Q", f"array length of {key}")
        if sub in _GGUF_SCALARS:
            c.skip(n * struct.calcsize(_GGUF_SCALARS[sub]), f"array {key}")
        elif sub == _STRING:
            c.need(n * 8, f"array {key}")  # each string has at least its 8-byte length
            buf, pos, end = c.buf, c.pos, c.size
            for _ in range(n):  # hot loop over vocabularies: inline the bounds check
                if pos + 8 > end:
                    c.pos = pos
                    c.need(8, f"string in {key}")
                pos += 8 + _U64.unpack_from(buf, pos)[0]
                if pos > end:
                    c.pos = end
                    c.need(1, f"string in {key}")
            c.pos = pos
        else:
            raise IntegrityError(f"{c.path}: metadata {key} is an array of unsupported type {sub}", _FIX)
        return [n]  # length only: callers that need array contents use gguf-py after this check
    raise IntegrityError(f"{c.path}: metadata {key} has unknown value type {vtype}; the file is corrupt", _FIX)


# --- .onnx_adapter (ORT flatbuffers) ----------------------------------------------------

ADAPTER_IDENTIFIER = b"TORT"
ADAPTER_FORMAT_VERSIONS = (1,)
MAX_PARAMETERS = 1 << 16
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


def check_onnx_adapter(path: Path) -> OnnxAdapterHeader:
    """Validate an ``.onnx_adapter`` file's flatbuffer structure before ORT reads it."""
    path = Path(path)
    size = _regular_file(path, ".onnx_adapter")
    if size < 8:
        raise IntegrityError(f"{path} is too short for an .onnx_adapter ({size} bytes)", _FIX)
    buf = path.read_bytes()  # adapters are small (MBs); the size check below bounds every slice
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
        name = buf[s:s + ln].decode("utf-8", "replace")
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

def check_onnx_model(path: Path) -> None:
    """An ONNX model's external-data files must stay inside its folder and exist at the stated sizes."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    path = Path(path)
    size = _regular_file(path, ".onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise IntegrityError(f"{path} is not a valid ONNX model ({type(e).__name__}: {size} bytes)", _FIX) from e
    folder = path.parent.resolve()
    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        info = ExternalDataInfo(t)
        rel = Path(info.location)
        target = (folder / rel).resolve()
        if rel.is_absolute() or ".." in rel.parts or not target.is_relative_to(folder):
            raise IntegrityError(f"{path}: tensor {t.name} points at external data {info.location!r} outside "
                                 "the model folder", "Refusing to load it; re-export the model")
        if not target.is_file():
            raise IntegrityError(f"{path}: external data file {info.location} for tensor {t.name} is missing", _FIX)
        end = (info.offset or 0) + (info.length or 0)
        if end > target.stat().st_size:
            raise IntegrityError(f"{path}: tensor {t.name} ends at byte {end} past the end of {info.location}", _FIX)


def check_artifact(path: Path) -> None:
    """Dispatch on the suffix; runtimes call this on any file before handing it to native code."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        check_gguf_header(path)
    elif suffix == ".onnx_adapter":
        check_onnx_adapter(path)
    elif suffix == ".onnx":
        check_onnx_model(path)
    else:
        _regular_file(path, suffix or "model")
