"""``describe(target)``: what a base, GGUF file, ONNX folder or bundle is, as a dict.

What the target is comes from :func:`edgepeft.artifacts.discover` (the one detector);
each file is read through the bounded readers. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

from edgepeft.errors import EdgepeftError
from edgepeft.fingerprint import short
from edgepeft.keys import PREFIX


def describe_gguf(p: Path) -> dict:
    """A GGUF file from its bounded header walk (no tensor data read)."""
    from edgepeft.fit import read_gguf
    from edgepeft.security import check_gguf_header

    hdr = check_gguf_header(p)
    meta = hdr.metadata
    art = read_gguf(p) if any(k.startswith(PREFIX) for k in meta) else None
    arch = meta.get("general.architecture")
    kind = meta.get("general.type") or "model"
    types: dict[str, int] = {}
    n_params = 0
    from gguf import GGMLQuantizationType

    for t in hdr.tensors.values():
        name = GGMLQuantizationType(t.type).name
        types[name] = types.get(name, 0) + 1
        n = 1
        for d in t.ne:
            n *= d
        n_params += n
    edgepeft = art.meta if art else {}
    tokens = meta.get("tokenizer.ggml.tokens")
    info = {
        "kind": f"gguf-{kind}",
        "path": str(p),
        "architecture": arch,
        "name": meta.get("general.name"),
        "parameters": n_params,
        "tensor_types": types,
        "tensors": len(hdr.tensors),
        "layers": meta.get(f"{arch}.block_count"),
        "context_length": meta.get(f"{arch}.context_length"),
        "vocab_size": len(tokens) if tokens is not None and not isinstance(tokens, str) else None,
        "file_bytes": hdr.size,
    }
    if kind == "adapter":
        info["lora_alpha"] = meta.get("adapter.lora.alpha")
    fp = edgepeft.get("base_fingerprint") or edgepeft.get("fingerprint")
    if fp:
        info["fingerprint"] = fp
    if edgepeft:
        info["edgepeft"] = edgepeft
    return info


def describe_onnx(p: Path) -> dict:
    """What an ONNX export folder holds: the sidecar record, adapter slots, and each adapter's fit."""
    from edgepeft.artifacts import ADAPTER_SUFFIX, ONNX_SIDECAR, read_sidecar
    from edgepeft.errors import IntegrityError
    from edgepeft.fit import check_onnx_adapter_fits, model_slots

    manifest = read_sidecar(p / ONNX_SIDECAR)
    info = {"kind": "onnx", "path": str(p), **{k: manifest.get(k) for k in ("mode", "quant", "target", "base")}}
    if (p / "model.onnx").is_file():
        slots = model_slots(p)
        info["adapter_slots"] = len(slots) // 2
        info["adapters"] = {}
        for f in sorted((p / "adapters").glob("*" + ADAPTER_SUFFIX)) if slots else []:
            fit = check_onnx_adapter_fits(p, f)  # raises, naming the tensor, if it does not fit
            info["adapters"][f.name] = {"modules": fit["modules"], "ranks": sorted(set(fit["ranks"].values()))}
    qnn = manifest.get("qnn")
    if qnn:
        if not isinstance(qnn, dict):
            raise IntegrityError(f"{p / ONNX_SIDECAR}: field 'qnn' is a {type(qnn).__name__}",
                                 "Allowed: an object; re-export the folder")
        info["qnn"] = {k: qnn.get(k) for k in ("soc_model", "htp_arch", "prefill_len", "cache_len")}
    info["total_bytes"] = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    return info


def describe_base(spec: str) -> dict:
    from edgepeft.models import ALIASES, folder_bytes, param_count, resolve_base

    base = resolve_base(spec)
    alias = ALIASES.get(spec)
    cfg = base.config
    dtypes = sorted({t.dtype for t in base.tensors()})
    return {
        "kind": "base",
        "spec": spec,
        "source": base.source,
        "path": str(base.path),
        "origin": str(base.origin) if base.origin else None,
        "licence": alias.licence if alias else None,  # known for aliases; a folder's licence is its owner's to state
        "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
        "model_type": base.model_type,
        "parameters": param_count(base),
        "dtype": ",".join(dtypes),
        "layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "vocab_size": cfg.get("vocab_size"),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
        "tokenizer": base.has_tokenizer(),
        "fingerprint": base.fingerprint,
        "files": {f.name: f.stat().st_size for f in sorted(base.path.iterdir()) if f.is_file() and not f.name.startswith(".")},
        "total_bytes": folder_bytes(base.path),
    }


def describe(target: str) -> dict:
    """Dispatch on :func:`edgepeft.artifacts.discover`; anything else is a base-model spec."""
    from edgepeft.artifacts import ONNX_SIDECAR, Bundle, GGUFFile, OnnxFile, OnnxFolder, QnnFolder, discover

    p = Path(target).expanduser()
    if p.exists() and p.is_file() and p.stat().st_size == 0:
        raise EdgepeftError(f"{target} is empty (0 bytes)", "Pass a model folder, .gguf, ONNX folder or bundle")
    found = discover(p) if p.exists() else None
    if isinstance(found, GGUFFile):
        return describe_gguf(p)
    if isinstance(found, Bundle):
        from edgepeft.bundle import describe_bundle

        return describe_bundle(p)
    if isinstance(found, (OnnxFolder, QnnFolder)) or (p.is_dir() and (p / ONNX_SIDECAR).is_file()):
        return describe_onnx(p)
    if isinstance(found, OnnxFile) and found.path.parent == p:
        return describe_onnx(p)
    return describe_base(target)


def summary_rows(info: dict) -> list[tuple[str, str]]:
    rows = []
    for k, v in info.items():
        if k == "files" and isinstance(v, dict):
            for name, size in v.items():
                rows.append((f"  {name}", human_bytes(size)))
            continue
        if k == "fingerprint" and isinstance(v, str):
            rows.append((k, v))
            rows.append(("  short", short(v)))
            continue
        if isinstance(v, int) and k.endswith("bytes"):
            rows.append((k, human_bytes(v)))
            continue
        if isinstance(v, int) and k == "parameters":
            rows.append((k, f"{v:,}"))
            continue
        rows.append((k, str(v) if not isinstance(v, (dict, list)) else _compact(v)))
    return rows


def _compact(v) -> str:
    import json

    return json.dumps(v, default=str)  # never cut: it can hold hashes and paths


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
