"""What bench can run: find model + adapters in what the user passed, the bytes a decode step reads,
and the fit checks that refuse an artifact a device cannot hold or run."""

from __future__ import annotations

import json
from pathlib import Path

from edgepeft.bench.config import GGUF_RECORD, ONNX_MANIFEST
from edgepeft.errors import EdgepeftError
from edgepeft.profiles import DeviceProfile
from edgepeft.runtimes.base import FORMAT_RUNTIMES, Artifact


def discover(path: str | Path, adapters: dict[str, Path] | None = None) -> Artifact:
    """Find model + adapters in what the user passed (a .gguf, an export folder, a bundle, an .onnx)."""
    p = Path(path)
    extra = {n: Path(a) for n, a in (adapters or {}).items()}
    for n, a in extra.items():
        if not a.is_file():
            raise EdgepeftError(f"--adapter {n}={a} does not exist", "Pass NAME=PATH to an adapter file")
    if not p.exists():
        raise EdgepeftError(f"artifact {p} does not exist", "Pass a .gguf, an export folder, or an .onnx file")
    if p.is_dir() and (p / "manifest.json").is_file():  # a bundle: hashes and fit checked first, no bypass
        from edgepeft.bundle import as_artifact

        return as_artifact(p, extra)
    if p.is_file() and p.suffix == ".gguf":
        return Artifact(p, "gguf", p, extra, _gguf_quant(p, None))
    if p.is_file() and p.suffix == ".onnx":
        return Artifact(p, "onnx", p, extra, None)
    if p.is_dir() and (p / "prefill_ctx.onnx").is_file() and (p / "decode_ctx.onnx").is_file():
        if extra:
            raise EdgepeftError(f"{p} is a QNN static export; it has no adapter inputs",
                                "QNN artifacts are merged; bench each merged export instead")
        return Artifact(p, "onnx-static", p, {}, "qnn-ctx")
    if p.is_dir() and (p / "genai_config.json").is_file():
        found = {a.name[: -len(".onnx_adapter")]: a for a in sorted(p.rglob("*.onnx_adapter"))}
        quant = _json(p / ONNX_MANIFEST).get("quant")
        return Artifact(p, "onnx-genai", p, {**found, **extra}, quant)
    if p.is_dir():
        record = _json(p / GGUF_RECORD)
        ggufs = sorted(p.glob("*.gguf"))
        found = {a.name[: -len(".lora.gguf")]: a for a in ggufs if a.name.endswith(".lora.gguf")}
        for a in record.get("adapter_files", []):
            found[a["name"]] = Path(a["path"]) if Path(a["path"]).is_absolute() else p / a["path"]
        models = [g for g in ggufs if g not in found.values()]
        if len(models) == 1:
            return Artifact(p, "gguf", models[0], {**found, **extra}, _gguf_quant(models[0], record.get("quant")))
        if (p / "model.onnx").is_file():
            return Artifact(p, "onnx", p / "model.onnx", extra, None)
        if len(models) > 1:
            raise EdgepeftError(f"{p} holds {len(models)} model GGUFs ({', '.join(m.name for m in models)})",
                                "Pass the one to benchmark")
    raise EdgepeftError(f"{p} is not a benchmarkable artifact",
                        "Pass a .gguf file, a GGUF/ONNX export folder, or an .onnx file")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _gguf_quant(path: Path, recorded: str | None) -> str | None:
    if recorded:
        return recorded.lower()
    from gguf import LlamaFileType

    from edgepeft.gguf_meta import _reader, check_gguf, field_value

    check_gguf(path)
    ft = field_value(_reader(path), "general.file_type")
    if ft is None:
        return None
    try:
        name = LlamaFileType(int(ft)).name
    except ValueError:
        return None
    return {"ALL_F32": "f32", "MOSTLY_F16": "f16", "MOSTLY_BF16": "bf16"}.get(name, name.replace("MOSTLY_", "").lower())


def task_template(artifact: Artifact):
    """The chat template task prompts are rendered with: the artifact's own, never a base alias."""
    from edgepeft.train.chat import ChatTemplate, folder_template

    if artifact.format == "gguf":
        from edgepeft.gguf_meta import _reader, check_gguf, field_value

        check_gguf(artifact.model)
        r = _reader(artifact.model)
        tokens = field_value(r, "tokenizer.ggml.tokens") or []

        def tok(key: str) -> str:
            i = field_value(r, key)
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

        return ChatTemplate(field_value(r, "tokenizer.chat_template"), tok("tokenizer.ggml.bos_token_id"),
                            tok("tokenizer.ggml.eos_token_id"))
    return folder_template(artifact.model if artifact.model.is_dir() else artifact.model.parent)


def bytes_per_token(artifact: Artifact, adapter: str | None) -> int:
    """Weight bytes one decode step reads: every tensor but gathered embedding tables, plus the adapter."""
    extra = artifact.adapters[adapter].stat().st_size if adapter else 0
    if artifact.format == "gguf":
        from edgepeft.gguf_meta import _reader

        tensors = {t.name: int(t.n_bytes) for t in _reader(artifact.model).tensors}
        tied = "output.weight" not in tensors
        return sum(b for n, b in tensors.items() if tied or n != "token_embd.weight") + extra
    if artifact.format == "onnx-static":  # the decode graph's QNN context binary holds its weights
        return sum(p.stat().st_size for p in artifact.model.glob("decode_ctx*.bin")) + extra
    import onnx

    model_file = artifact.model / "model.onnx" if artifact.model.is_dir() else artifact.model
    m = onnx.load(str(model_file), load_external_data=False)
    gathered = {n.input[0] for n in m.graph.node if n.op_type == "Gather"}
    matmuls = {i for n in m.graph.node if n.op_type != "Gather" for i in n.input}
    total = 0
    for init in m.graph.initializer:
        if init.name in gathered and init.name not in matmuls:
            continue
        ext = {e.key: e.value for e in init.external_data}
        total += int(ext["length"]) if "length" in ext else len(init.raw_data)
    return total + extra


# ------------------------------------------------------------------ fit checks
def check_fits(artifact: Artifact, profile: DeviceProfile, runtime: str, n_ctx: int) -> dict:
    """Refuse an artifact the device cannot hold or run; return the numbers checked."""
    fmt = "gguf" if artifact.format == "gguf" else "onnx"
    if runtime not in profile.runtimes:
        raise EdgepeftError(f"device {profile.name} has no runtime {runtime} (artifact {artifact.path.name})",
                            f"Runtimes there: {', '.join(profile.runtimes)}")
    if runtime not in FORMAT_RUNTIMES[artifact.format]:
        raise EdgepeftError(f"runtime {runtime} cannot run {artifact.format} artifact {artifact.path.name}",
                            f"Use: {', '.join(FORMAT_RUNTIMES[artifact.format])}")
    if fmt not in profile.formats:
        raise EdgepeftError(f"device {profile.name} does not run {fmt} artifacts ({artifact.path.name})",
                            f"Formats there: {', '.join(profile.formats)}")
    if artifact.quant and artifact.quant not in profile.formats[fmt]:
        raise EdgepeftError(f"device {profile.name} does not support {fmt} quant {artifact.quant} "
                            f"({artifact.path.name})", f"Supported there: {', '.join(profile.formats[fmt])}")
    weights = artifact.model_bytes + sum(artifact.adapter_bytes.values())
    kv = _kv_bytes(artifact, n_ctx)
    need = weights + kv
    if need > profile.usable_bytes:
        raise EdgepeftError(
            f"{artifact.path.name} needs {need / 1e9:.2f} GB (weights {weights / 1e9:.2f} GB + KV cache "
            f"{kv / 1e9:.2f} GB at {n_ctx} tokens) but {profile.name} has {profile.memory_gb:g} GB "
            f"({profile.usable_bytes / 1e9:.2f} GB usable)", "Pick a smaller quant, or a device with more memory")
    return {"need_bytes": need, "usable_bytes": profile.usable_bytes}


def _kv_bytes(artifact: Artifact, n_ctx: int) -> int:
    """f16 KV cache size from the model's own metadata (0 when it cannot be read)."""
    try:
        if artifact.format == "gguf":
            from edgepeft.gguf_meta import _reader, field_value

            r = _reader(artifact.model)
            arch = field_value(r, "general.architecture")
            layers = field_value(r, f"{arch}.block_count")
            heads = field_value(r, f"{arch}.attention.head_count")
            kv_heads = field_value(r, f"{arch}.attention.head_count_kv") or heads
            head_dim = field_value(r, f"{arch}.embedding_length") // heads
        else:
            folder = artifact.model if artifact.model.is_dir() else artifact.model.parent
            dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
            layers, kv_heads, head_dim = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
        return 2 * int(layers) * int(kv_heads) * int(head_dim) * n_ctx * 2
    except (KeyError, TypeError, ValueError, OSError, ZeroDivisionError):
        return 0
