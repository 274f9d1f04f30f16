"""The format-independent plan every writer consumes.

Surgery (load, validate, prune, merge) produces these; the GGUF and ONNX writers only read
them. Orientation follows Hugging Face ``nn.Linear``: W has shape (out_features, in_features)
and an adapter changes it by ΔW = scale · B @ A with A (rank, in) and B (out, rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: runtimes import the writers' fit checks on devices without torch
    import torch


@dataclass(frozen=True)
class LoraModule:
    target: str  # HF module path, e.g. "model.layers.0.self_attn.q_proj" (its weight is target + ".weight")
    a: torch.Tensor  # (rank, in_features), float32
    b: torch.Tensor  # (out_features, rank), float32
    scale: float  # multiplier on B @ A: alpha/r, or alpha/sqrt(r) for rsLoRA, per module. Authoritative:
    #               after pruning the rank changes but the scale is kept, so writers must not recompute it
    alpha: float  # the configured alpha for this module (before any folding)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.a.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.b.shape[0])

    def delta(self) -> torch.Tensor:
        """ΔW in fp32. Forms the full (out, in) matrix: for merging and tests only."""
        return self.scale * (self.b.float() @ self.a.float())

    def nbytes(self, bytes_per_el: int = 2) -> int:
        return (self.a.numel() + self.b.numel()) * bytes_per_el


@dataclass
class AdapterPlan:
    """One adapter, normalised: per-module rank, scale and orientation stated explicitly."""

    name: str
    modules: dict[str, LoraModule]  # keyed by target, in model order
    adapter_sha256: str  # sha256 of adapter_model.safetensors as loaded
    base_fingerprint: str | None = None  # from the training manifest, if any
    source: Path | None = None
    prune_report: dict | None = None  # settings and per-module ranks/errors, when pruned
    train_summary: dict = field(default_factory=dict)  # task, data hash, etc. from the training manifest
    base_path: Path | None = None  # the HF folder it was validated against (prune reads ‖W‖ from it)

    @property
    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}

    def nbytes(self, bytes_per_el: int = 2) -> int:
        return sum(m.nbytes(bytes_per_el) for m in self.modules.values())
