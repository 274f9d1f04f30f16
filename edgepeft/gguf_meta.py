"""Reading GGUF headers and metadata safely, before any file reaches llama.cpp.

gguf-py's GGUFReader memory-maps the file and trusts its offsets; a truncated or
bit-flipped file can make it raise odd errors or allocate absurd arrays. ``check_gguf``
bounds the header first (magic, version, counts, offsets within the file), then the
reader is used for everything else.
"""

from __future__ import annotations

from pathlib import Path

from edgepeft.errors import IntegrityError

GGUF_MAGIC = b"GGUF"
_MAX_TENSORS = 1 << 20
_MAX_KV = 1 << 16


def check_gguf(path: Path):
    """Bounded header walk (edgepeft.security): magic, version, counts, every offset and size."""
    from edgepeft.security import check_gguf_header

    return check_gguf_header(path)


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path), "r")
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct.error on corrupt input
        raise IntegrityError(f"{path} is a corrupt or truncated GGUF ({type(e).__name__}: {e})",
                             "Re-export or re-download it") from e


def field_value(reader, key: str):
    """Decode one metadata value from a GGUFReader (strings, scalars, arrays)."""
    from gguf import GGUFValueType

    f = reader.fields.get(key)
    if f is None:
        return None
    if not f.types:
        return None
    t = f.types[0]
    if t == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
    if t == GGUFValueType.ARRAY:
        sub = f.types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    v = f.parts[f.data[0]].tolist()
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def read_metadata(path: Path, prefix: str = "") -> dict:
    check_gguf(path)
    reader = _reader(path)
    out = {}
    for key in reader.fields:
        if key.startswith(prefix) and not key.startswith("tokenizer.ggml."):
            if key.startswith("GGUF."):
                continue
            out[key] = field_value(reader, key)
    return out


def read_gguf_summary(path: Path) -> dict:
    check_gguf(path)
    reader = _reader(path)
    arch = field_value(reader, "general.architecture")
    kind = field_value(reader, "general.type") or "model"
    types = {}
    n_params = 0
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        n_params += int(t.n_elements)
    edgepeft = {k[len("edgepeft."):]: field_value(reader, k) for k in reader.fields if k.startswith("edgepeft.")}
    info = {
        "kind": f"gguf-{kind}",
        "path": str(path),
        "architecture": arch,
        "name": field_value(reader, "general.name"),
        "parameters": n_params,
        "tensor_types": types,
        "tensors": len(reader.tensors),
        "layers": field_value(reader, f"{arch}.block_count"),
        "context_length": field_value(reader, f"{arch}.context_length"),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None,
        "file_bytes": path.stat().st_size,
    }
    if kind == "adapter":
        info["lora_alpha"] = field_value(reader, "adapter.lora.alpha")
    if "fingerprint" in edgepeft or "base_fingerprint" in edgepeft:
        info["fingerprint"] = edgepeft.get("base_fingerprint") or edgepeft.get("fingerprint")
    if edgepeft:
        info["edgepeft"] = edgepeft
    return info
