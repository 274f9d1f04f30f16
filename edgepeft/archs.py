"""Supported architectures, kept as data.

One row per Hugging Face ``model_type``. Writers look up what they need here (the GGUF
architecture name, whether llama.cpp permutes Q/K rows, Gemma's norm shift) instead of
branching on strings.

Per-tensor transforms llama.cpp's converter applies, and why LoRA B needs the same or none:
- ``permute_qk`` (llama, mistral, smollm3): Q/K output rows reordered. LoRA B is indexed by the
  same output rows, so it gets the same permutation.
- ``norm_shift`` (gemma3_text): every ``*norm.weight`` is stored +1 (Gemma's RMSNorm computes
  ``x * (1 + w)``). Norms are never LoRA targets and the shift is applied after a merge, so the
  +1 lands on W (or W + ΔW) exactly once; LoRA B gets nothing.
- Gemma's embedding scale (sqrt(hidden)) is applied by llama.cpp's graph, not to a tensor.
- Qwen3's q/k norms are plain RMSNorm weights (no shift, no permutation): mapped by name only.
- Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` stay fused in llama.cpp (``attn_qkv``,
  ``ffn_up`` of 2·n_ff rows), so base weights and LoRA A/B on them are written as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgepeft.errors import EdgepeftError

_SPLIT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    model_type: str
    gguf_arch: str  # name in gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's convert_hf_to_gguf permutes q_proj/k_proj rows for these
    lora_targets: tuple[str, ...] = _SPLIT
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma's 1 + w RMSNorm)
    tied_default: bool = False  # tie_word_embeddings when a config leaves it out
    onnx_refusal: str | None = None  # why the installed onnxruntime-genai builder cannot export it


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", "LLAMA", permute_qk=True),
    "mistral": Arch("mistral", "LLAMA", permute_qk=True),
    "qwen2": Arch("qwen2", "QWEN2", permute_qk=False),
    "qwen3": Arch("qwen3", "QWEN3", permute_qk=False),
    "gemma3_text": Arch("gemma3_text", "GEMMA3", permute_qk=False, norm_shift=1.0, tied_default=True),
    # Phi-3 / Phi-4-mini fuse Q/K/V and gate/up into one Linear each: PEFT adapters for them
    # target qkv_proj, o_proj, gate_up_proj, down_proj (a q_proj adapter cannot exist)
    "phi3": Arch("phi3", "PHI3", permute_qk=False, lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "smollm3": Arch("smollm3", "SMOLLM3", permute_qk=True,
                    onnx_refusal="onnxruntime-genai 0.18's builder cannot build SmolLM3's NoPE layers: it "
                                 "gives them a separate RotaryEmbedding op instead of none (KeyError 'position_ids' "
                                 "under GroupQueryAttention; with position_ids they would be rotated, unlike "
                                 "the model)"),
}


# llama.cpp's sliding-window interleave per GGUF architecture when a file states no per-layer
# pattern: a period n means layers n-1, 2n-1, ... are global and the others slide (Gemma 3: 5 + 1)
GGUF_SWA_PERIOD: dict[str, int] = {"gemma3": 6}


def get_arch(model_type: str | None, where: str = "") -> Arch:
    arch = ARCHS.get(model_type or "")
    if arch is None:
        src = f" ({where})" if where else ""
        raise EdgepeftError(
            f"unsupported architecture {model_type!r}{src}",
            f"Supported model_type values: {', '.join(sorted(ARCHS))}",
        )
    return arch
