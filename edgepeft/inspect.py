"""``describe(target)``: what a base, GGUF file, ONNX folder or bundle is, as a dict.

Inspectors are (matches, describe) pairs tried in order; the first match wins. Later
formats add one pair each. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgepeft.errors import EdgepeftError
from edgepeft.fingerprint import short

Inspector = tuple[Callable[[Path], bool], Callable[[Path], dict]]


def _is_gguf(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() == ".gguf"


def describe_gguf(p: Path) -> dict:
    from edgepeft.gguf_meta import read_gguf_summary

    return read_gguf_summary(p)


def describe_base(spec: str) -> dict:
    from edgepeft.models import folder_bytes, param_count, resolve_base

    base = resolve_base(spec)
    cfg = base.config
    dtypes = sorted({t.dtype for t in base.tensors()})
    return {
        "kind": "base",
        "spec": spec,
        "source": base.source,
        "path": str(base.path),
        "origin": str(base.origin) if base.origin else None,
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


def _is_bundle(p: Path) -> bool:
    from edgepeft.bundle import is_bundle

    return is_bundle(p)


def _describe_bundle(p: Path) -> dict:
    from edgepeft.bundle import describe_bundle

    return describe_bundle(p)


def _is_onnx(p: Path) -> bool:
    from edgepeft.export.onnx import is_onnx_export

    return is_onnx_export(p)


def _describe_onnx(p: Path) -> dict:
    from edgepeft.export.onnx import describe_onnx

    return describe_onnx(p)


INSPECTORS: list[Inspector] = [
    (_is_gguf, describe_gguf),
    (_is_bundle, _describe_bundle),
    (_is_onnx, _describe_onnx),
]


def describe(target: str) -> dict:
    p = Path(target).expanduser()
    for matches, fn in INSPECTORS:
        if p.exists() and matches(p):
            return fn(p)
    if p.exists() and p.is_file() and p.stat().st_size == 0:
        raise EdgepeftError(f"{target} is empty (0 bytes)", "Pass a model folder, .gguf, ONNX folder or bundle")
    return describe_base(target)


def summary_rows(info: dict) -> list[tuple[str, str]]:
    rows = []
    for k, v in info.items():
        if k == "files" and isinstance(v, dict):
            for name, size in v.items():
                rows.append((f"  {name}", human_bytes(size)))
            continue
        if k == "fingerprint" and isinstance(v, str):
            rows.append((k, f"{v}  (short {short(v)})"))
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

    s = json.dumps(v, default=str)
    return s if len(s) < 200 else s[:197] + "..."


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
