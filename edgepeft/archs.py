"""Supported architectures, kept as data.

One row per Hugging Face ``model_type``. Writers look up what they need here (the GGUF
architecture name, whether llama.cpp permutes Q/K rows) instead of branching on strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgepeft.errors import EdgepeftError


@dataclass(frozen=True)
class Arch:
    model_type: str
    gguf_arch: str  # name in gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's convert_hf_to_gguf permutes q_proj/k_proj rows for these
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", "LLAMA", permute_qk=True),
    "mistral": Arch("mistral", "LLAMA", permute_qk=True),
    "qwen2": Arch("qwen2", "QWEN2", permute_qk=False),
}


def get_arch(model_type: str | None, where: str = "") -> Arch:
    arch = ARCHS.get(model_type or "")
    if arch is None:
        src = f" ({where})" if where else ""
        raise EdgepeftError(
            f"unsupported architecture {model_type!r}{src}",
            f"Supported model_type values: {', '.join(sorted(ARCHS))}",
        )
    return arch
