"""``discover(path)``: what a path the user typed is, as one typed value.

The one artifact detector: ``inspect``, ``bench``, ``verify``/``pack`` and the runtimes all
ask it. It looks only at names and the structure of a folder (cheap, no file is parsed);
each kind then reads its files through the bounded readers (:mod:`edgepeft.security`,
:mod:`edgepeft.readers`) when it is used. Sidecar records written by the exporters are
read with their shape checked; a path they name must stay inside the folder.

Kinds: :class:`GGUFFile`, :class:`GGUFFolder` (an export folder: one model plus
``*.lora.gguf`` adapters), :class:`OnnxFolder` (onnxruntime-genai), :class:`OnnxFile`,
:class:`QnnFolder` (EPContext prefill/decode graphs) and :class:`Bundle` (directory or tar).
"""

from __future__ import annotations

import dataclasses
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

from edgepeft.errors import EdgepeftError, IntegrityError
from edgepeft.keys import (
    ADAPTER_SUFFIX_GGUF,
    BUNDLE_MANIFEST,
    GGUF_RECORD,
    IMATRIX_SUFFIX,
    ONNX_SIDECAR,
    QNN_DECODE_GRAPH,
    QNN_PREFILL_GRAPH,
)
from edgepeft.keys import ADAPTER_SUFFIX_ONNX as ADAPTER_SUFFIX
from edgepeft.paths import from_record

QNN_GRAPHS = (QNN_PREFILL_GRAPH, QNN_DECODE_GRAPH)
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    kind = "gguf"

    def artifact(self, extra: dict):
        from edgepeft.runtimes.base import Artifact

        return Artifact(self.path, "gguf", self.path, extra, gguf_quant(self.path))


@dataclass(frozen=True)
class GGUFFolder:
    path: Path
    model: Path
    adapters: dict
    quant: str | None
    kind = "gguf-folder"

    def artifact(self, extra: dict):
        from edgepeft.runtimes.base import Artifact

        return Artifact(self.path, "gguf", self.model, {**self.adapters, **extra}, self.quant or gguf_quant(self.model))


@dataclass(frozen=True)
class OnnxFolder:
    path: Path
    adapters: dict
    quant: str | None
    kind = "onnx-genai"

    def artifact(self, extra: dict):
        from edgepeft.runtimes.base import Artifact

        return Artifact(self.path, "onnx-genai", self.path, {**self.adapters, **extra}, self.quant)


@dataclass(frozen=True)
class OnnxFile:
    path: Path
    kind = "onnx"

    def artifact(self, extra: dict):
        from edgepeft.runtimes.base import Artifact

        return Artifact(self.path, "onnx", self.path, extra, None)


@dataclass(frozen=True)
class QnnFolder:
    path: Path
    kind = "onnx-static"

    def artifact(self, extra: dict):
        from edgepeft.runtimes.base import Artifact

        if extra:
            raise EdgepeftError(f"{self.path} is a QNN static export; it has no adapter inputs",
                                "QNN artifacts are merged; bench each merged export instead")
        return Artifact(self.path, "onnx-static", self.path, {}, "qnn-ctx")


@dataclass(frozen=True)
class Bundle:
    path: Path
    kind = "bundle"

    def artifact(self, extra: dict):
        """The checked bundle's GGUF base + adapters; every file is handed over by the descriptor it was hashed through."""
        from edgepeft.bundle import as_artifact

        return as_artifact(self.path, extra)


Discovered = GGUFFile | GGUFFolder | OnnxFolder | OnnxFile | QnnFolder | Bundle


def is_tar(p: Path) -> bool:
    if p.name.lower().endswith(_TAR_SUFFIXES):
        return True
    try:
        return tarfile.is_tarfile(p)
    except (OSError, EOFError, tarfile.TarError, ValueError):
        return False


def discover(path: str | Path) -> Discovered | None:
    """The typed artifact at ``path``, or None when it is none of the kinds (e.g. a base-model spec)."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        return None
    if p.is_file():
        low = p.name.lower()
        if low.endswith(".gguf"):
            return GGUFFile(p)
        if low.endswith(".onnx"):
            return OnnxFile(p)
        if is_tar(p):
            return Bundle(p)
        return None
    if not p.is_dir():
        return None
    if (p / BUNDLE_MANIFEST).is_file():
        return Bundle(p)
    if all((p / g).is_file() for g in QNN_GRAPHS):
        return QnnFolder(p)
    if (p / "genai_config.json").is_file():
        found = {a.name[: -len(ADAPTER_SUFFIX)]: a for a in sorted(p.rglob("*" + ADAPTER_SUFFIX))}
        side = read_sidecar(p / ONNX_SIDECAR)
        return OnnxFolder(p, found, _str_field(side, "quant", p / ONNX_SIDECAR))
    ggufs = sorted(g for g in p.glob("*.gguf") if not g.name.endswith(IMATRIX_SUFFIX))  # the matrix is no model
    if ggufs:
        record = read_sidecar(p / GGUF_RECORD)
        found = {a.name[: -len(ADAPTER_SUFFIX_GGUF)]: a for a in ggufs if a.name.endswith(ADAPTER_SUFFIX_GGUF)}
        entries = record.get("adapter_files", [])
        if not isinstance(entries, list):
            raise IntegrityError(f"{p / GGUF_RECORD}: field 'adapter_files' is a {type(entries).__name__}",
                                 "Allowed: a list of {name, path} objects; re-export the folder")
        for i, a in enumerate(entries):
            name = a.get("name") if isinstance(a, dict) else None
            rel = a.get("path") if isinstance(a, dict) else None
            if not isinstance(name, str) or not isinstance(rel, str):
                raise IntegrityError(f"{p / GGUF_RECORD}: adapter_files[{i}] needs string 'name' and 'path'",
                                     "Re-export the folder")
            found[name] = from_record(rel, p / GGUF_RECORD, confine=f"{p / GGUF_RECORD}: adapter_files[{i}].path")
        models = [g for g in ggufs if g not in found.values()]
        if len(models) == 1:
            return GGUFFolder(p, models[0], found, _str_field(record, "quant", p / GGUF_RECORD))
        if len(models) > 1:
            raise EdgepeftError(f"{p} holds {len(models)} model GGUFs ({', '.join(m.name for m in models)})",
                                "Pass the one to benchmark")
    if (p / "model.onnx").is_file():
        return OnnxFile(p / "model.onnx")
    return None


def read_sidecar(path: Path) -> dict:
    """An exporter's JSON record beside its artifacts ({} if absent); wrong shape is an IntegrityError."""
    from edgepeft.readers import read_json

    if not path.is_file():
        return {}
    return read_json(path, "record", expect=dict)


def _str_field(rec: dict, key: str, where: Path) -> str | None:
    v = rec.get(key)
    if v is not None and not isinstance(v, str):
        raise IntegrityError(f"{where}: field {key!r} is a {type(v).__name__}", "Allowed: a string; re-export it")
    return v.lower() if v else None


def runtime_artifact(path: str | Path, adapters: dict | None = None):
    """What ``bench`` and the runtimes load: the discovered artifact as a ``runtimes.base.Artifact``."""
    p = Path(path)
    extra = {n: Path(a) for n, a in (adapters or {}).items()}
    for n, a in extra.items():
        if not a.is_file():
            raise EdgepeftError(f"--adapter {n}={a} does not exist", "Pass NAME=PATH to an adapter file")
    if not p.exists():
        raise EdgepeftError(f"artifact {p} does not exist", "Pass a .gguf, an export folder, or an .onnx file")
    found = discover(p)
    if found is None:
        raise EdgepeftError(f"{p} is not a benchmarkable artifact",
                            "Pass a .gguf file, a GGUF/ONNX export folder, a bundle, or an .onnx file")
    art = found.artifact(extra)
    if not isinstance(found, Bundle):  # a bundle's files were checked, through their descriptors, by verify
        from edgepeft.security import check_artifact

        files = [art.model] if art.model.is_file() else [art.model / "model.onnx"] if (art.model / "model.onnx").is_file() else []
        for f in [*files, *art.adapters.values()]:
            check_artifact(f)  # bounded header walk before any file reaches native code
        if art.quant is None and files and files[0].suffix == ".onnx":  # no edgepeft record: read the graph
            art = dataclasses.replace(art, quant=onnx_quant(files[0]))
    return art


def gguf_quant(path: Path, label: str | None = None) -> str | None:
    """The file type a GGUF records (general.file_type), as a quant name (q4_k_m, f16, ...)."""
    from gguf import LlamaFileType

    from edgepeft.security import check_gguf_header

    ft = check_gguf_header(path, label).metadata.get("general.file_type")
    if not isinstance(ft, int) or isinstance(ft, bool):
        return None
    try:
        name = LlamaFileType(ft).name
    except ValueError:
        return None
    return {"ALL_F32": "f32", "MOSTLY_F16": "f16", "MOSTLY_BF16": "bf16"}.get(name, name.replace("MOSTLY_", "").lower())


# ONNX tensor element types (onnx.TensorProto.DataType) by the quant name the tolerance table uses
_ONNX_FLOATS = {1: "fp32", 10: "fp16", 16: "bf16"}
_ONNX_INT8_OPS = {"MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "DequantizeLinear"}


def onnx_quant(path: Path, label: str | None = None) -> str | None:
    """The quant an ONNX graph's weights are in, read from the graph alone (no external data): int4 or int8
    from the ``bits`` of its MatMulNBits nodes (int4 wherever any is 4-bit: the ``*_last`` algorithms keep
    the output projection at 8), int8 for QDQ / integer-matmul graphs, else the float type holding most
    initializer elements. For ONNX folders without an edgepeft record (the builder's, Olive's, optimum's),
    so ``verify`` and ``bench`` pick the tolerance row the weights call for."""
    from edgepeft.security import load_onnx_graph

    graph = load_onnx_graph(path, label).graph
    bits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    if bits:
        return "int4" if 4 in bits else "int8" if bits == {8} else None
    if any(n.op_type in _ONNX_INT8_OPS for n in graph.node):
        return "int8"
    elements: dict[int, int] = {}
    for t in graph.initializer:
        elements[t.data_type] = elements.get(t.data_type, 0) + math.prod(t.dims)
    top = max(elements, key=elements.get, default=None)
    return _ONNX_FLOATS.get(top)
