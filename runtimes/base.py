"""The Runtime protocol every benchmark backend implements, and the registry of them.

A runtime loads one :class:`Artifact` (a model plus named adapters) for one device
profile and exposes the few operations a benchmark needs. Each implementation imports its
SDK (llama_cpp, onnxruntime_genai, onnxruntime) only inside its own module, so picking
one never imports the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edgepeft.errors import EdgepeftError
from edgepeft.keys import ADAPTER_SUFFIX_ONNX

if TYPE_CHECKING:
    import numpy as np

    from edgepeft.profiles import DeviceProfile

# runtime name -> "module:Class"; the module is imported only when the runtime is used.
RUNTIMES: dict[str, str] = {
    "llama.cpp": "edgepeft.runtimes.llamacpp:LlamaCppRuntime",
    "onnxruntime-genai": "edgepeft.runtimes.ortgenai:OrtGenaiRuntime",
    "onnxruntime": "edgepeft.runtimes.ort:OrtRuntime",
}

# artifact format -> runtimes that can run it, best first
FORMAT_RUNTIMES: dict[str, tuple[str, ...]] = {
    "gguf": ("llama.cpp",),
    "onnx-genai": ("onnxruntime-genai", "onnxruntime"),
    "onnx": ("onnxruntime",),
    "onnx-static": ("onnxruntime",),  # QNN EPContext prefill/decode graphs (export --target qnn-htp)
}


@dataclass(frozen=True)
class Artifact:
    """What a runtime loads: one model (file or folder) and its named adapter files."""

    path: Path  # as the user named it
    format: str  # gguf | onnx-genai | onnx | onnx-static
    model: Path  # the file (gguf, onnx) or folder (genai) handed to the runtime
    adapters: dict[str, Path] = field(default_factory=dict)
    quant: str | None = None  # gguf file type (q4_k_m...) or onnx quant (int4...)
    names: dict = field(default_factory=dict)  # file handed over -> the name it has for users (bundle path)

    def name_of(self, f: Path) -> str:
        return self.names.get(f) or str(f)

    @property
    def model_files(self) -> list[Path]:
        if self.model.is_dir():
            return sorted(p for p in self.model.rglob("*") if p.is_file() and p.suffix != ADAPTER_SUFFIX_ONNX)
        files = [self.model]
        data = self.model.with_name(self.model.name + ".data")  # ONNX external data
        return files + ([data] if data.exists() else [])

    @property
    def model_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.model_files)

    @property
    def adapter_bytes(self) -> dict[str, int]:
        return {n: p.stat().st_size for n, p in self.adapters.items()}

    @property
    def files(self) -> list[Path]:
        return self.model_files + list(self.adapters.values())


class Runtime(Protocol):
    """One inference engine behind the benchmark. Greedy decoding only."""

    name: str
    load_ms: float  # set by load(): engine load time, without edgepeft's own file checks

    def load(self, artifact: Artifact, device: DeviceProfile) -> None:
        """Load model and adapters (after the exporters' fit checks); no adapter active."""

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """The runtime's own tokenizer (never timed); ``special`` parses <|im_start|>-style markers."""

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids back to text, special tokens kept as text."""

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> None:
        """Append ``tokens`` to the sequence; keep logits for every position if asked."""

    def decode(self, n: int, tokens: Sequence[int] | None = None) -> list[int]:
        """Run ``n`` one-token steps, feeding ``tokens`` or else the greedy argmax; return what was fed."""

    def logits(self) -> np.ndarray:
        """float32 (rows, vocab): the last step's kept positions (one row unless all_logits)."""

    def set_adapter(self, name: str | None) -> None:
        """Activate one adapter (None: the base alone) and reset the KV cache."""

    def reset(self) -> None:
        """Empty the KV cache (same adapter)."""

    def close(self) -> None:
        """Free everything; the runtime may be loaded again."""


def get_runtime(name: str) -> Runtime:
    """A fresh runtime by name; an unknown name lists the known ones."""
    target = RUNTIMES.get(name)
    if target is None:
        raise EdgepeftError(f"unknown runtime {name!r}", f"Known runtimes: {', '.join(RUNTIMES)}")
    module, cls = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise EdgepeftError(f"runtime {name} is not available here ({e})",
                            f"Install its SDK, or pick another runtime: {', '.join(RUNTIMES)}") from e
    return getattr(mod, cls)()


def check_adapter_name(rt_name: str, adapters: dict, name: str | None) -> None:
    if name is not None and name not in adapters:
        raise EdgepeftError(f"{rt_name}: no adapter named {name!r} is loaded",
                            f"Loaded adapters: {', '.join(adapters) or 'none'}")
