"""The one fit check: does an adapter fit its base, for GGUF and for ``.onnx_adapter``.

GGUF: by fingerprint AND by tensor names/shapes (llama.cpp's own rule). ONNX: every
adapter parameter's name, dtype and shape against the model's LoRA graph inputs. Both read
files only through the bounded readers in :mod:`edgepeft.security` (no gguf-py reader, no
ORT parse of an unchecked file). Torch-free on purpose: ``edgepeft verify``, ``pack`` and
runtime loads on a device all run this one check, and must not import PyTorch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from edgepeft.errors import EdgepeftError, IntegrityError, MismatchError
from edgepeft.fingerprint import short
from edgepeft.keys import PREFIX, local
from edgepeft.keys import EdgepeftKeys as K


@dataclass
class GGUFArtifact:
    path: Path  # as named in errors (a descriptor path is shown by its label)
    header: object  # edgepeft.security.GGUFHeader
    meta: dict  # edgepeft.* metadata, JSON strings decoded

    @property
    def kind(self) -> str:
        return self.header.metadata.get("general.type", "model")

    @property
    def fingerprint(self) -> str | None:
        v = self.meta.get(local(K.BASE_FINGERPRINT))
        return v if isinstance(v, str) and v else None

    def ggml_type_name(self) -> str:
        from gguf import LlamaFileType

        ft = self.header.metadata.get("general.file_type")
        try:
            return LlamaFileType(ft).name.replace("MOSTLY_", "").replace("ALL_", "").lower()
        except ValueError:
            return "unknown"


def read_gguf(path: Path, label: str | None = None) -> GGUFArtifact:
    """One bounded header walk; ``edgepeft.*`` JSON strings decoded (bounded), impossible values refused."""
    from edgepeft.readers import loads_json
    from edgepeft.security import check_gguf_header

    hdr = check_gguf_header(path, label)
    meta = {}
    for k, v in hdr.metadata.items():
        if not k.startswith(PREFIX):
            continue
        if isinstance(v, str) and v[:1] in "{[":
            try:
                v = loads_json(v, f"{hdr.path}: metadata {k}")
            except EdgepeftError:
                pass  # a string that merely looks like JSON stays a string
        elif not isinstance(v, (str, int, float, bool)):
            v = list(v)
        meta[local(k)] = v
    for k in ("adapter.lora.alpha",):
        v = hdr.metadata.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise IntegrityError(f"{hdr.path}: metadata {k}={v!r} is not allowed", "Allowed: a finite number")
    for k in (K.BASE_FINGERPRINT,):
        if k in hdr.metadata and not isinstance(hdr.metadata[k], str):
            raise IntegrityError(f"{hdr.path}: metadata {k} is a {type(hdr.metadata[k]).__name__}",
                                 "Allowed: a 64-character hex string")
    return GGUFArtifact(Path(label or path), hdr, meta)


def adapter_fit_problem(base: GGUFArtifact, adapter: GGUFArtifact) -> str | None:
    """First reason ``adapter`` cannot be applied to ``base`` (architecture, names, shapes), or None.

    llama.cpp's own rule (llama-adapter.cpp): lora_a is (ne0=in, ne1=r), lora_b is
    (ne0=r, ne1=out) and the base weight is (ne0=in, ne1=out).
    """
    if adapter.kind != "adapter":
        return f"{adapter.path.name} is a GGUF {adapter.kind}, not a LoRA adapter (general.type={adapter.kind})"
    arch_b = base.header.metadata.get("general.architecture")
    arch_a = adapter.header.metadata.get("general.architecture")
    if arch_a != arch_b:
        return f"{adapter.path.name} is for architecture {arch_a}, the base is {arch_b}"
    tensors = adapter.header.tensors
    targets = sorted({n[:-7] for n in tensors if n.endswith((".lora_a", ".lora_b"))})
    if not targets:
        return f"{adapter.path.name} has no .lora_a/.lora_b tensors"
    for t in targets:
        a, b, w = tensors.get(t + ".lora_a"), tensors.get(t + ".lora_b"), base.header.tensors.get(t)
        if a is None or b is None:
            return f"{adapter.path.name}: {t} has only one of lora_a/lora_b"
        if w is None:
            return f"{adapter.path.name}: tensor {t} does not exist in the base"
        if a.ne[1] != b.ne[0]:
            return f"{adapter.path.name}: {t} rank mismatch (lora_a rank {a.ne[1]}, lora_b rank {b.ne[0]})"
        if a.ne[0] != w.ne[0] or b.ne[1] != w.ne[1]:
            return (f"{adapter.path.name}: {t} shape mismatch (adapter in={a.ne[0]} out={b.ne[1]}, "
                    f"base in={w.ne[0]} out={w.ne[1]})")
    return None


def check_adapter_fits(base: GGUFArtifact, adapter: GGUFArtifact, base_fingerprint: str | None = None, *,
                       require_fingerprint: bool = True) -> dict:
    """Fingerprint AND names/shapes; raise MismatchError naming the first mismatch, else say what was checked.

    The one check behind ``pack``, ``verify`` and every llama.cpp runtime load. ``base_fingerprint``
    is what the adapter must have been made for (a bundle passes its manifest's; by default the
    base GGUF's own). A runtime load passes ``require_fingerprint=False`` so adapters from other
    tools still load, with llama.cpp's shape guarantees.
    """
    if base.kind == "adapter":
        raise MismatchError(f"{base.path.name} is an adapter, not a base model", "Pass the base GGUF first")
    if base.meta.get(local(K.MODE)) == "merged":
        raise MismatchError(f"base {base.path.name} already has adapters merged into it",
                            "Use the base GGUF from --mode separate with its adapters")
    expected = base_fingerprint or base.fingerprint
    fp = adapter.fingerprint
    if fp is None and require_fingerprint:
        raise MismatchError(f"adapter {adapter.path.name} records no base fingerprint (edgepeft.base_fingerprint)",
                            "Export it with edgepeft export --format gguf so its base is known")
    if fp and expected and fp != expected:
        name = adapter.meta.get(local(K.ADAPTER_NAME)) or adapter.path.name
        raise MismatchError(f"adapter {name} was made for base {short(fp)}, but base {base.path.name} is "
                            f"{short(expected)}", "Pair it with the base GGUF it was exported with")
    problem = adapter_fit_problem(base, adapter)
    if problem:
        raise MismatchError(problem, "Pair it with the base GGUF it was exported with")
    modules = {n[:-7] for n in adapter.header.tensors if n.endswith((".lora_a", ".lora_b"))}
    return {"base": str(base.path), "adapter": str(adapter.path),
            "architecture": base.header.metadata.get("general.architecture"),
            "fingerprint_checked": bool(fp and expected), "base_fingerprint": expected, "modules": len(modules)}


def check_gguf_pair(base_path, adapter_path, *, require_fingerprint: bool = False) -> dict:
    """:func:`check_adapter_fits` on two GGUF paths (headers sanity-checked first)."""
    return check_adapter_fits(read_gguf(Path(base_path)), read_gguf(Path(adapter_path)),
                              require_fingerprint=require_fingerprint)


def _adapter_record(art: GGUFArtifact, name: str) -> dict:
    ranks: dict[str, list[int]] = {}
    for n, t in art.header.tensors.items():
        if n.endswith(".lora_a"):
            kind = n[:-7].split(".")[-2] if n.startswith("blk.") else n[:-7]  # blk.3.attn_q.weight -> attn_q
            ranks.setdefault(kind, set()).add(t.ne[1])
    m = art.meta
    train = m.get(local(K.TRAIN))  # edgepeft.train.manifest.training_summary, stored by the GGUF writer
    return {
        "name": name,
        "format": "gguf",
        "base_fingerprint": art.fingerprint,
        "adapter_sha256": m.get(local(K.ADAPTER_SHA256)),
        "type": m.get(local(K.QUANT)),
        "alpha": art.header.metadata.get("adapter.lora.alpha"),
        "ranks": {k: sorted(v) for k, v in sorted(ranks.items())},
        "target_modules": sorted(ranks),
        "prune": m.get(local(K.PRUNE)),
        "merge": m.get(local(K.MERGE)),
        "training": train if isinstance(train, dict) else {},
    }


# ------------------------------------------------------------------ ONNX (.onnx_adapter)
LORA_PARAM = re.compile(r"(?P<target>.+)\.lora_(?P<ab>[AB])\.weight")  # graph input / adapter parameter name
# ORT TensorDataType -> numpy dtype name (what the model's graph inputs declare)
_ORT_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}


def model_slots(model_dir: Path, label: str | None = None) -> dict[str, dict]:
    """The adapter slots of an exported model, read from its graph inputs (weights not loaded)."""
    from edgepeft.security import load_onnx_graph

    path = Path(model_dir)
    path = path / "model.onnx" if path.is_dir() else path
    if not path.is_file():
        raise EdgepeftError(f"{label or path} does not exist", "Pass the folder written by edgepeft export --format onnx")
    from onnx import helper

    model = load_onnx_graph(path, label)
    slots = {}
    for vi in model.graph.input:
        m = LORA_PARAM.fullmatch(vi.name)
        if not m:
            continue
        t = vi.type.tensor_type
        try:
            dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name
        except (KeyError, ValueError, TypeError):
            raise IntegrityError(f"{label or path}: graph input {vi.name!r} has unknown element type {t.elem_type}",
                                 "Re-export it") from None
        shape = [None if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        slots[vi.name] = {"shape": shape, "dtype": dtype, "target": m["target"]}
    return slots


def check_parameters(params: dict, slots: dict[str, dict], where: str) -> dict[str, int]:
    """Names, dtypes and shapes ``{param: (shape, dtype name)}`` vs the model's slots; returns ranks per target."""
    ranks: dict[str, int] = {}
    for name in sorted(params):
        shape, dtype = params[name]
        shape = list(shape)
        slot = slots.get(name)
        if slot is None:
            hint = _nearest(name, slots)
            raise MismatchError(f"{where}: parameter {name!r} is not an adapter input of the model"
                                + (f" (closest: {hint})" if hint else ""),
                                "Export the adapter against this base with edgepeft export --mode separate")
        want = slot["shape"]
        if len(shape) != len(want) or None not in want or any(w is not None and w != s for w, s in zip(want, shape)):
            shown = ["r" if w is None else w for w in want]
            raise MismatchError(f"{where}: parameter {name} has shape {shape}, the model expects {shown}",
                                "The adapter was made for a different base; re-export it against this one")
        if dtype != slot["dtype"]:
            raise MismatchError(f"{where}: parameter {name} is {dtype}, the model expects {slot['dtype']}",
                                "Re-export the adapter against this base")
        rank = shape[want.index(None)]
        target = slot["target"]
        if ranks.setdefault(target, rank) != rank:
            raise MismatchError(f"{where}: {target} has A and B of different ranks ({ranks[target]} vs {rank})",
                                "Re-export the adapter")
    for target in ranks:
        for ab in "AB":
            if f"{target}.lora_{ab}.weight" not in params:
                raise MismatchError(f"{where}: {target} has only one of lora_A/lora_B", "Re-export the adapter")
    return ranks


def _nearest(name: str, slots) -> str | None:
    import difflib

    close = difflib.get_close_matches(name, list(slots), n=1, cutoff=0.6)
    return close[0] if close else None


def check_onnx_adapter_fits(model_dir, adapter_path, *, model_label: str | None = None,
                            adapter_label: str | None = None) -> dict:
    """Load-time check: does ``adapter_path`` fit the ONNX model in ``model_dir``?

    Reads the adapter through the bounded flatbuffers walker only (names, dims, dtypes), so a
    hostile file never reaches ORT's parser. Returns ``{"adapter": path, "modules": n, "ranks":
    {target: r}}``; raises :class:`MismatchError` naming the first parameter that does not fit.
    ``model_dir`` may be the ``model.onnx`` file itself (a descriptor path in a bundle).
    """
    from edgepeft.security import check_onnx_adapter

    slots = model_slots(Path(model_dir), model_label)
    shown = adapter_label or str(adapter_path)
    if not slots:
        raise MismatchError(f"ONNX model in {model_label or model_dir} has no LoRA inputs, so {shown} cannot be applied",
                            "Export the base with --mode separate")
    hdr = check_onnx_adapter(Path(adapter_path), adapter_label)
    params = {n: (p.shape, _ORT_DTYPES.get(p.data_type, f"ort-type-{p.data_type}")) for n, p in hdr.params.items()}
    ranks = check_parameters(params, slots, where=f"adapter {shown}")
    return {"adapter": shown, "modules": len(ranks), "ranks": ranks}
