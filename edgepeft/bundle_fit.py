"""What a GGUF artifact is, and whether an adapter fits a base: by fingerprint AND by names/shapes.

Torch-free on purpose: ``edgepeft verify``, ``pack`` and runtime loads on a device all run
this one check, and must not import PyTorch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgepeft.errors import MismatchError
from edgepeft.fingerprint import short

# GGUF metadata keys that carry the base fingerprint (written by export/gguf.py); first hit wins.
FINGERPRINT_KEYS = ("edgepeft.base_fingerprint", "edgepeft.fingerprint")


@dataclass
class GGUFArtifact:
    path: Path
    header: object  # edgepeft.security.GGUFHeader
    meta: dict  # edgepeft.* metadata, JSON strings decoded

    @property
    def kind(self) -> str:
        return self.header.metadata.get("general.type", "model")

    @property
    def fingerprint(self) -> str | None:
        for k in FINGERPRINT_KEYS:
            v = self.meta.get(k[len("edgepeft."):])
            if isinstance(v, str) and v:
                return v
        return None

    def ggml_type_name(self) -> str:
        from gguf import LlamaFileType

        ft = self.header.metadata.get("general.file_type")
        try:
            return LlamaFileType(ft).name.replace("MOSTLY_", "").replace("ALL_", "").lower()
        except ValueError:
            return "unknown"


def read_gguf(path: Path) -> GGUFArtifact:
    from edgepeft.security import check_gguf_header

    hdr = check_gguf_header(path)
    raw = {k: v for k, v in hdr.metadata.items() if k.startswith("edgepeft.")}
    if any(isinstance(v, list) for v in raw.values()):  # arrays: let gguf-py decode them (header is safe now)
        from edgepeft.gguf_meta import read_metadata

        raw = read_metadata(path, "edgepeft.")
    meta = {}
    for k, v in raw.items():
        if isinstance(v, str) and v[:1] in "{[":
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        meta[k[len("edgepeft."):]] = v
    return GGUFArtifact(Path(path), hdr, meta)


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
    if base.meta.get("mode") == "merged":
        raise MismatchError(f"base {base.path.name} already has adapters merged into it",
                            "Use the base GGUF from --mode separate with its adapters")
    expected = base_fingerprint or base.fingerprint
    fp = adapter.fingerprint
    if fp is None and require_fingerprint:
        raise MismatchError(f"adapter {adapter.path.name} records no base fingerprint (edgepeft.base_fingerprint)",
                            "Export it with edgepeft export --format gguf so its base is known")
    if fp and expected and fp != expected:
        name = adapter.meta.get("adapter.name") or adapter.path.name
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


def _training_summary(t) -> dict:
    """Task and data hash from a training manifest (or the summary the exporter stored)."""
    if not isinstance(t, dict):
        return {"summary": t}
    data = t.get("data") if isinstance(t.get("data"), dict) else {}
    out = {"task": t.get("task"), "data_sha256": t.get("data_sha256") or data.get("sha256")}
    train = t.get("train") if isinstance(t.get("train"), dict) else t
    for k in ("steps", "final_loss"):
        if train.get(k) is not None:
            out[k] = train[k]
    return {k: v for k, v in out.items() if v is not None}


def _adapter_record(art: GGUFArtifact, name: str) -> dict:
    ranks: dict[str, list[int]] = {}
    for n, t in art.header.tensors.items():
        if n.endswith(".lora_a"):
            kind = n[:-7].split(".")[-2] if n.startswith("blk.") else n[:-7]  # blk.3.attn_q.weight -> attn_q
            ranks.setdefault(kind, set()).add(t.ne[1])
    m = art.meta
    train = _training_summary(m.get("train") or m.get("train_summary") or m.get("training") or {})
    return {
        "name": name,
        "format": "gguf",
        "base_fingerprint": art.fingerprint,
        "adapter_sha256": m.get("adapter.sha256") or m.get("adapter_sha256"),
        "type": m.get("quant"),
        "alpha": art.header.metadata.get("adapter.lora.alpha"),
        "ranks": {k: sorted(v) for k, v in sorted(ranks.items())},
        "target_modules": m.get("target_modules") or sorted(ranks),
        "prune": m.get("prune") or m.get("prune_settings"),
        "merge": m.get("merge"),
        "training": train,
    }
