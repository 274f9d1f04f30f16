"""What bench can run: find model + adapters in what the user passed, the bytes a decode step reads,
and the fit checks that refuse an artifact a device cannot hold or run."""

from __future__ import annotations

from pathlib import Path

from edgepeft.errors import EdgepeftError
from edgepeft.keys import QNN_DECODE_GRAPH
from edgepeft.profiles import DeviceProfile
from edgepeft.runtimes.base import FORMAT_RUNTIMES, Artifact


def discover(path: str | Path, adapters: dict[str, Path] | None = None) -> Artifact:
    """What bench loads for ``path``: :func:`edgepeft.artifacts.runtime_artifact` (the one detector)."""
    from edgepeft.artifacts import runtime_artifact

    return runtime_artifact(path, adapters)


def merged_adapters(artifact: Artifact) -> list[str]:
    """Names of the adapters merged into the artifact's weights (its export metadata says), else []."""
    import json

    from edgepeft.errors import IntegrityError

    try:
        if artifact.format == "gguf":
            from edgepeft.keys import EdgepeftKeys
            from edgepeft.security import check_gguf_header

            raw = check_gguf_header(artifact.model).metadata.get(EdgepeftKeys.ADAPTERS)
            listed = json.loads(raw) if isinstance(raw, str) else []
        else:
            from edgepeft.keys import ONNX_SIDECAR as ONNX_MANIFEST
            from edgepeft.readers import read_json

            folder = artifact.model if artifact.model.is_dir() else artifact.model.parent
            manifest = read_json(folder / ONNX_MANIFEST, "ONNX export manifest") \
                if (folder / ONNX_MANIFEST).is_file() else {}
            listed = manifest.get("adapters", []) if manifest.get("mode") == "merged" else []
    except (OSError, ValueError, IntegrityError, EdgepeftError):
        return []
    if not isinstance(listed, list):
        return []
    return [a["name"] for a in listed if isinstance(a, dict) and isinstance(a.get("name"), str)]


def task_template(artifact: Artifact):
    """The chat template task prompts are rendered with: the artifact's own, never a base alias."""
    from edgepeft.train.chat import ChatTemplate, folder_template

    if artifact.format == "gguf":
        from edgepeft.security import check_gguf_header

        meta = check_gguf_header(artifact.model).metadata
        tokens = meta.get("tokenizer.ggml.tokens") or []

        def tok(key: str) -> str:
            i = meta.get(key)
            ok = isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens)
            return tokens[i] if ok and isinstance(tokens[i], str) else ""

        template = meta.get("tokenizer.chat_template")
        return ChatTemplate(template if isinstance(template, str) else None, tok("tokenizer.ggml.bos_token_id"),
                            tok("tokenizer.ggml.eos_token_id"))
    return folder_template(artifact.model if artifact.model.is_dir() else artifact.model.parent)


def bytes_per_token(artifact: Artifact, adapter: str | None) -> int:
    """Weight bytes one decode step reads: every tensor but gathered embedding tables, plus the adapter."""
    extra = artifact.adapters[adapter].stat().st_size if adapter else 0
    if artifact.format == "gguf":
        from edgepeft.security import check_gguf_header

        tensors = {n: t.nbytes for n, t in check_gguf_header(artifact.model).tensors.items()}
        tied = "output.weight" not in tensors
        return sum(b for n, b in tensors.items() if tied or n != "token_embd.weight") + extra
    if artifact.format == "onnx-static":  # the decode graph's QNN context binary holds its weights
        return sum(p.stat().st_size for p in artifact.model.glob(QNN_DECODE_GRAPH.replace(".onnx", "*.bin"))) + extra
    model_file = artifact.model / "model.onnx" if artifact.model.is_dir() else artifact.model
    from edgepeft.security import load_onnx_graph

    m = load_onnx_graph(model_file)
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
    check_adapters(artifact)
    weights = artifact.model_bytes + sum(artifact.adapter_bytes.values())
    kv = _kv_bytes(artifact, n_ctx)
    need = weights + kv
    if need > profile.usable_bytes:
        raise EdgepeftError(
            f"{artifact.path.name} needs {need / 1e9:.2f} GB (weights {weights / 1e9:.2f} GB + KV cache "
            f"{kv / 1e9:.2f} GB at {n_ctx} tokens) but {profile.name} has {profile.memory_gb:g} GB "
            f"({profile.usable_bytes / 1e9:.2f} GB usable)", "Pick a smaller quant, or a device with more memory")
    return {"need_bytes": need, "usable_bytes": profile.usable_bytes}


def check_adapters(artifact: Artifact) -> None:
    """Every adapter the artifact carries fits its model (names, shapes, a merged base refused): the same
    check the runtime load makes, run before any measurement so a wrong pairing costs seconds, not minutes."""
    if not artifact.adapters or artifact.names:  # a bundle's pairs were checked, through descriptors, by verify
        return
    from edgepeft.fit import check_gguf_pair, check_onnx_adapter_fits

    for name, path in artifact.adapters.items():
        if artifact.format == "gguf":
            check_gguf_pair(artifact.model, path)
        elif artifact.format in ("onnx", "onnx-genai"):
            check_onnx_adapter_fits(artifact.model, path, adapter_label=f"adapter {name}")


def accepts_adapters(artifact: Artifact) -> bool:
    """Whether extra ``--adapter`` files can be applied to the artifact (not one with adapters merged in)."""
    return not merged_adapters(artifact)


def _kv_bytes(artifact: Artifact, n_ctx: int) -> int:
    """f16 KV cache size from the model's own metadata (0 when it cannot be read).

    GGUF: what llama.cpp allocates. Per layer K and V of key_length/value_length per KV head;
    the context is padded to 256 cells; with a sliding window (Gemma 3) the sliding layers keep
    only window + ubatch cells (padded to 256), because the runtime creates its context with
    ``swa_full`` off, and the global layers keep the whole context.
    """
    try:
        if artifact.format == "gguf":
            from edgepeft.security import check_gguf_header

            return gguf_kv_bytes(check_gguf_header(artifact.model).metadata, n_ctx)
        from edgepeft.readers import read_json

        folder = artifact.model if artifact.model.is_dir() else artifact.model.parent
        dec = read_json(folder / "genai_config.json", "genai config")["model"]["decoder"]
        layers, kv_heads, head_dim = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
        return 2 * int(layers) * int(kv_heads) * int(head_dim) * n_ctx * 2
    except (KeyError, TypeError, ValueError, OSError, ZeroDivisionError, EdgepeftError):
        return 0


def kv_cells(n_ctx: int, n_swa: int, swa_layers: list[bool], n_ubatch: int = 512) -> list[int]:
    """Cells llama.cpp's KV cache gives each layer (llama-kv-cache-iswa.cpp with swa_full off)."""
    def pad(n: int) -> int:
        return -(-n // 256) * 256

    full = pad(n_ctx)
    swa = min(full, pad(n_swa + n_ubatch)) if n_swa else full
    return [swa if n_swa and is_swa else full for is_swa in swa_layers]


def gguf_kv_bytes(meta: dict, n_ctx: int, n_ubatch: int = 512) -> int:
    from edgepeft.archs import GGUF_SWA_PERIOD

    arch = meta.get("general.architecture")
    layers = int(meta[f"{arch}.block_count"])
    heads = meta[f"{arch}.attention.head_count"]
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv") or heads)
    head_dim = meta[f"{arch}.embedding_length"] // heads
    k_len = int(meta.get(f"{arch}.attention.key_length") or head_dim)
    v_len = int(meta.get(f"{arch}.attention.value_length") or head_dim)
    n_swa = int(meta.get(f"{arch}.attention.sliding_window") or 0) if arch in GGUF_SWA_PERIOD else 0
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        swa_layers = [bool(x) for x in pattern][:layers]
    else:
        period = GGUF_SWA_PERIOD.get(arch, 0)
        swa_layers = [bool(period) and (i % period) < period - 1 for i in range(layers)]
    cells = kv_cells(n_ctx, n_swa, swa_layers, min(n_ubatch, n_ctx))
    return sum(cells) * kv_heads * (k_len + v_len) * 2
