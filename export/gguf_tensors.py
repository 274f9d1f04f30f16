"""Hugging Face tensors and hyper-parameters -> GGUF, as data from gguf-py's tables.

Names come from ``gguf.get_tensor_name_map`` (gguf-py's per-architecture mapping), keys from
``GGUFWriter``'s typed setters (which use ``gguf.Keys``). The only transform Llama-family
weights need is llama.cpp's Q/K row permutation (HF stores rotary halves split; ggml's
rope expects them interleaved per head); ``permute_qk`` applies it to a weight or to a
LoRA B, which are both indexed by output rows.

Writing is streamed: tensor infos are declared from the safetensors headers first, then
each tensor is converted and written on its own, so peak memory is the tensors of one
safetensors shard plus one converted tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepeft.archs import Arch
from edgepeft.errors import EdgepeftError

# rope_type values llama.cpp needs no extra tensor for; "llama3" (Llama 3.1/3.2) also works on the
# llama architecture, through the generated rope_freqs tensor below
_PLAIN_ROPE = (None, "default", "linear", "yarn")
# rope types llama.cpp reads from generated tensors (see generated_tensors), per GGUF architecture
_TENSOR_ROPE = {("llama3", "LLAMA"), ("longrope", "PHI3"), ("su", "PHI3")}


@dataclass(frozen=True)
class TensorOut:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # torch order: (out_features, in_features)
    qtype: object  # gguf.GGMLQuantizationType


def gguf_arch(arch: Arch):
    import gguf

    return gguf.MODEL_ARCH[arch.gguf_arch]


def name_map(arch: Arch, n_blocks: int):
    import gguf

    return gguf.get_tensor_name_map(gguf_arch(arch), n_blocks)


def map_name(tmap, hf_name: str) -> str:
    name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise EdgepeftError(f"tensor {hf_name} has no GGUF name in gguf-py's mapping",
                            "This checkpoint layout is not supported for GGUF export")
    return name


def tensor_type(gguf_name: str, ndim: int, float_type):
    """llama.cpp's rule: 1-D tensors and norms stay F32, matrices take the file's float type."""
    import gguf

    if ndim <= 1 or gguf_name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    return float_type


def heads(cfg: dict) -> tuple[int, int]:
    n_head = cfg["num_attention_heads"]
    return n_head, cfg.get("num_key_value_heads") or n_head


def permute_qk(w, hf_name: str, arch: Arch, cfg: dict):
    """Reorder Q/K output rows the way llama.cpp's converter does (identity for other tensors)."""
    if not arch.permute_qk:
        return w
    n_head, n_kv = heads(cfg)
    if ".q_proj." in hf_name:
        n = n_head
    elif ".k_proj." in hf_name:
        n = n_kv
    else:
        return w
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(w, hf_name: str, arch: Arch, cfg: dict):
    """A base tensor (or a merged W + ΔW) as llama.cpp stores it: Q/K permutation, Gemma's norm +1."""
    w = permute_qk(w, hf_name, arch, cfg)
    if arch.norm_shift and hf_name.endswith("norm.weight"):
        w = w + arch.norm_shift
    return w


def lora_b_to_gguf(b, target: str, arch: Arch, cfg: dict):
    """LoRA B for ``target`` as llama.cpp applies it: the output-row permutation only.

    The norm shift needs no counterpart: norms are not LoRA targets, and +1 on W + ΔW is +1 on W.
    """
    return permute_qk(b, target + ".weight", arch, cfg)


def encode(t, qtype) -> np.ndarray:
    """Torch tensor or numpy array -> the bytes/array GGUFWriter writes for ``qtype`` (F32, F16, BF16, Q8_0)."""
    import gguf

    if isinstance(t, np.ndarray):
        data = np.ascontiguousarray(t, dtype=np.float32)
    else:
        data = t.detach().float().contiguous().numpy()
    return gguf.quants.quantize(data, qtype)


def from_safetensors_bytes(buf, dtype: str, shape) -> np.ndarray:
    """A float safetensors tensor's raw bytes as a numpy array (BF16 widened exactly to F32)."""
    if dtype == "BF16":  # numpy has no bfloat16; its bits are the top half of an F32
        return (np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(buf, dtype={"F32": np.float32, "F16": np.float16}[dtype]).reshape(shape)


def declare(writer, outs: list[TensorOut]) -> None:
    import gguf

    floats = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
    for o in outs:
        byte_shape = gguf.quant_shape_to_byte_shape(o.shape, o.qtype)
        nbytes = int(np.prod(byte_shape))
        if o.qtype in floats:
            writer.add_tensor_info(o.gguf_name, o.shape, np.dtype(floats[o.qtype]), nbytes, raw_dtype=o.qtype)
        else:
            writer.add_tensor_info(o.gguf_name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=o.qtype)


def add_hparams(writer, cfg: dict, arch: Arch, file_type) -> None:
    """The architecture keys llama.cpp reads, as llama.cpp's converter writes them for ``arch``."""
    rope = rope_params(cfg)
    rope_type = rope_kind(cfg)
    if rope_type not in _PLAIN_ROPE and (rope_type, arch.gguf_arch) not in _TENSOR_ROPE:
        raise EdgepeftError(f"rope_type {rope_type!r} is not supported by the GGUF writer for {arch.gguf_arch.lower()}",
                            f"Supported: {', '.join(str(r) for r in _PLAIN_ROPE if r)}, llama3 on llama, "
                            "longrope on phi3")
    n_head, n_kv = heads(cfg)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    swa_rope = rope_params(cfg, "sliding_attention")
    if swa_rope is not rope and swa_rope.get("rope_theta") is not None:  # a separate base for sliding layers
        writer.add_rope_freq_base_swa(float(swa_rope["rope_theta"]))
    if rope_type in ("linear", "yarn") and rope.get("factor"):
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType[rope_type.upper()])
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if rope_type == "yarn":
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if cfg.get("head_dim"):
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
    writer.add_file_type(file_type)
    if arch.permute_qk:  # llama.cpp's llama converter also records these
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    extra = _ARCH_HPARAMS.get(arch.gguf_arch)
    if extra is not None:
        extra(writer, cfg)


def _gemma3_hparams(writer, cfg: dict) -> None:
    """Sliding window (interleaved sliding/global layers), final soft-capping; what llama.cpp hard-codes is checked."""
    head_dim = cfg.get("head_dim", 256)
    if cfg.get("query_pre_attn_scalar", head_dim) != head_dim:
        raise EdgepeftError(f"gemma3_text query_pre_attn_scalar {cfg['query_pre_attn_scalar']} differs from head_dim "
                            f"{head_dim}; llama.cpp scales queries by 1/sqrt(head_dim)",
                            "This Gemma 3 variant is not supported for GGUF export")
    if cfg.get("attn_logit_softcapping") is not None:
        raise EdgepeftError("gemma3_text with attn_logit_softcapping is not supported by llama.cpp",
                            "Export a Gemma 3 checkpoint without attention soft-capping")
    if cfg.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    types = layer_types(cfg)
    if "sliding_attention" in types:
        writer.add_sliding_window(int(cfg["sliding_window"]))
        # llama.cpp's default is 5 sliding then 1 global (the converter writes no pattern);
        # any other interleave is written out per layer so llama.cpp follows the config
        if types != _gemma3_default_types(len(types)):
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])


def _gemma3_default_types(n: int) -> list[str]:
    return ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]


def layer_types(cfg: dict) -> list[str]:
    """Per-layer attention kind ("sliding_attention" / "full_attention") as the HF config states it."""
    types = cfg.get("layer_types")
    if types:
        return list(types)
    return ["full_attention"] * cfg["num_hidden_layers"]


def _phi3_rope(cfg: dict) -> tuple[int, int | None]:
    """(rotary dims per head, original context) of a Phi-3 / Phi-4-mini config."""
    rope = rope_params(cfg)
    rot = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0
    orig = rope.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    return int(rot * cfg["hidden_size"]) // cfg["num_attention_heads"], orig


def _phi3_hparams(writer, cfg: dict) -> None:
    dims, orig = _phi3_rope(cfg)
    if orig is not None:
        writer.add_rope_scaling_orig_ctx_len(int(orig))
    writer.add_rope_dimension_count(dims)
    writer.add_sliding_window(int(cfg.get("sliding_window") or 0))
    factors = longrope_factors(cfg)
    if factors is not None:
        writer.add_rope_scaling_attn_factors(factors[2])


def longrope_factors(cfg: dict) -> tuple[np.ndarray, np.ndarray, float] | None:
    """LongRoPE (128k Phi-3, Phi-4-mini): (long, short, attention factor), or None without one.

    HF rescales the rotary frequencies by ``short_factor`` up to ``original_max_position_embeddings``
    and by ``long_factor`` beyond, and scales cos/sin by the attention factor; llama.cpp reads the two
    as ``rope_factors_{long,short}.weight`` and picks one by the context size it is given (a context
    above the original one uses the long factors even for a short sequence, where HF would not).
    Same values and formula as the pinned convert_hf_to_gguf.py (the peer test holds them equal).
    """
    rope = rope_params(cfg)
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long:
        return None
    kind = (rope.get("rope_type") or rope.get("type") or "").lower()
    dims, orig = _phi3_rope(cfg)
    if kind not in ("longrope", "su") or not short or not orig or not len(long) == len(short) == dims // 2:
        raise EdgepeftError(f"phi3 rope {kind!r} with {len(long)} long / {len(short or [])} short factors and "
                            f"original_max_position_embeddings {orig}: expected longrope with {dims // 2} of each",
                            "Check the checkpoint's config.json rope_parameters")
    scale = cfg["max_position_embeddings"] / orig
    attn = float(np.sqrt(1 + np.log(scale) / np.log(orig))) if scale > 1.0 else 1.0
    return np.asarray(long, dtype=np.float32), np.asarray(short, dtype=np.float32), attn


def _smollm3_hparams(writer, cfg: dict) -> None:
    """llama.cpp hard-codes SmolLM3's NoPE layers as every 4th; refuse a config that says otherwise."""
    n = cfg["num_hidden_layers"]
    want = [0 if (i + 1) % 4 == 0 else 1 for i in range(n)]
    got = cfg.get("no_rope_layers")
    if got is not None and list(got) != want:
        raise EdgepeftError(f"smollm3 no_rope_layers {list(got)} is not every 4th layer, which llama.cpp hard-codes",
                            "This SmolLM3 variant is not supported for GGUF export")


_ARCH_HPARAMS = {"GEMMA3": _gemma3_hparams, "PHI3": _phi3_hparams, "SMOLLM3": _smollm3_hparams}


def rope_params(cfg: dict, kind: str = "full_attention") -> dict:
    """The rope parameters of ``kind`` layers (Gemma 3 nests one dict per attention kind)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if isinstance(rope.get(kind), dict):
        return rope[kind]
    if kind != "full_attention" and any(isinstance(v, dict) for v in rope.values()):
        return {}
    return rope


def rope_kind(cfg: dict) -> str | None:
    rope = rope_params(cfg)
    return rope.get("rope_type") or rope.get("type")


def rope_freqs(cfg: dict) -> np.ndarray | None:
    """Per-frequency divisors for llama3 rope scaling, or None when the model has none.

    HF computes them at load time and stores nothing; llama.cpp reads them from a
    ``rope_freqs.weight`` tensor. Same formula as HF's ``_compute_llama3_parameters`` and
    llama.cpp's converter (the peer test holds the two files equal).
    """
    if rope_kind(cfg) != "llama3":
        return None
    rope = rope_params(cfg)
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen < old_ctx / high, 1.0,
                   np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def generated_tensors(cfg: dict) -> list[tuple[TensorOut, np.ndarray]]:
    """Tensors llama.cpp needs that no checkpoint stores; written first, as llama.cpp's converter does."""
    import gguf

    made = []
    freqs = rope_freqs(cfg)
    if freqs is not None:
        made.append((gguf.MODEL_TENSOR.ROPE_FREQS, freqs))
    if cfg.get("model_type") == "phi3" and (factors := longrope_factors(cfg)) is not None:
        made += [(gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, factors[0]), (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, factors[1])]
    return [(TensorOut(f"(generated) {gguf.TENSOR_NAMES[t]}", gguf.TENSOR_NAMES[t] + ".weight", tuple(v.shape),
                       gguf.GGMLQuantizationType.F32), v) for t, v in made]


def base_tensor_plan(base, arch: Arch, float_type) -> list[TensorOut]:
    """Every base tensor's GGUF name, shape and type, from the safetensors headers (no weights read)."""
    tmap = name_map(arch, base.config["num_hidden_layers"])
    outs = [o for o, _ in generated_tensors(base.config)]
    for t in ordered_entries(base):
        if t.name.endswith(".rotary_emb.inv_freq"):
            continue
        g = map_name(tmap, t.name)
        outs.append(TensorOut(t.name, g, tuple(t.shape), tensor_type(g, len(t.shape), float_type)))
    return outs


FLOAT_DTYPES = ("F32", "F16", "BF16")  # safetensors dtypes the GGUF writer and the merge read


def ordered_entries(base):
    """Safetensors entries in file order (shard, then byte offset): the order tensors are written.

    Refuses a non-float tensor here, before any file is written.
    """
    entries = sorted(base.tensors(), key=lambda t: (str(t.file), t.start))
    for t in entries:
        if t.dtype not in FLOAT_DTYPES:
            raise EdgepeftError(f"base {base.spec}: tensor {t.name} is {t.dtype}, not a float type",
                                "Save the base in float32, float16 or bfloat16")
    return entries
