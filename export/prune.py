"""Prune an adapter (``--prune``): per-module rank reduction and dropping of negligible modules.

Rank reduction never forms the (out × in) ΔW = s·B·A. With B = Q_b R_b and Aᵀ = Q_a R_a
(reduced QR), ΔW = Q_b (s R_b R_aᵀ) Q_aᵀ, so the singular values of ΔW are those of the
small r × r core C = s R_b R_aᵀ = U Σ Vᵀ, and the best rank-k approximation (Eckart–Young) is
B' = Q_b U_k Σ_k^½, A' = Σ_k^½ V_kᵀ Q_aᵀ, with relative error √(Σ_{i>k} σ_i² / Σ σ_i²).

k is chosen per module by an energy threshold, a fixed rank, or a total byte budget, so ranks
differ per module (GGUF and ORT adapters both allow that). Modules whose ‖ΔW‖_F / ‖W‖_F is
below ``drop`` are removed; W norms are read from the base one tensor at a time.

Pruned modules keep their ``scale`` (and ``alpha``): the rank changes, so scale is no longer
alpha/rank and writers must use ``LoraModule.scale`` (they do: they fold it into B).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from edgepeft.errors import ConfigError, EdgepeftError
from edgepeft.export.plan import AdapterPlan, LoraModule

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_ALLOWED = ("auto | energy=0<E<=1 | rank=N | size=N[KB|MB|KiB|MiB], optionally ,drop=T (0<=T<1) and ,modules=K+K "
            "(module kinds to keep, e.g. q_proj+v_proj), e.g. energy=0.99,drop=1e-4")


@dataclass(frozen=True)
class PruneSpec:
    """What ``--prune`` asked for. Exactly one of energy/rank/size, and/or drop."""

    energy: float | None = None  # keep the fewest directions holding this fraction of ‖ΔW‖_F²
    rank: int | None = None  # keep at most this many directions per module
    size: int | None = None  # total adapter bytes (at bytes_per_el) across all modules
    drop: float | None = None  # drop modules with ‖ΔW‖_F / ‖W‖_F below this
    modules: tuple[str, ...] | None = None  # keep only these module kinds (the last name part: q_proj, down_proj)
    bytes_per_el: int = 2  # adapter tensors are stored as f16 by both writers

    def __post_init__(self):
        chosen = [k for k in ("energy", "rank", "size") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ConfigError("--prune", str(self), f"one of energy/rank/size (got {', '.join(chosen)}); {_ALLOWED}")
        if not chosen and self.drop is None and self.modules is None:
            raise ConfigError("--prune", "", _ALLOWED)
        if self.modules is not None and (not self.modules or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", k)
                                                                     for k in self.modules)):
            raise ConfigError("--prune modules", "+".join(self.modules), "module kinds such as q_proj+v_proj")
        if self.energy is not None and not (0 < self.energy <= 1):
            raise ConfigError("--prune energy", self.energy, "0 < energy <= 1 (fraction of ‖ΔW‖² kept)")
        if self.rank is not None and self.rank < 1:
            raise ConfigError("--prune rank", self.rank, "an integer >= 1")
        if self.size is not None and self.size < 1:
            raise ConfigError("--prune size", self.size, "a positive byte count such as 2MB")
        if self.drop is not None and not (0 <= self.drop < 1):
            raise ConfigError("--prune drop", self.drop, "0 <= drop < 1 (threshold on ‖ΔW‖/‖W‖)")

    @classmethod
    def parse(cls, text: str | PruneSpec) -> PruneSpec:
        if isinstance(text, PruneSpec):
            return text
        fields: dict = {}
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            key, sep, value = part.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not sep or key not in ("energy", "rank", "size", "drop", "modules"):
                raise ConfigError("--prune", text, _ALLOWED)
            if key in fields:
                raise ConfigError("--prune", text, f"{key} given twice; {_ALLOWED}")
            fields[key] = _parse_value(key, value, text)
        return cls(**fields)

    def __str__(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("energy", "rank", "size", "drop") if getattr(self, k) is not None]
        if self.modules is not None:
            parts.append("modules=" + "+".join(self.modules))
        return ",".join(parts)


def _parse_value(key: str, value: str, text: str):
    if key == "modules":
        return tuple(k.strip() for k in value.split("+") if k.strip())
    try:
        if key == "rank":
            return int(value)
        if key == "size":
            m = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)\s*([kmg]i?b|b)?", value.lower())
            if not m:
                raise ValueError(value)
            return int(float(m[1]) * _UNITS[m[2] or "b"])
        return float(value)
    except ValueError:
        raise ConfigError(f"--prune {key}", value, _ALLOWED) from None


@dataclass(frozen=True)
class Factored:
    """ΔW = q_b · diag(s) · v_t · q_aᵀ, singular values in descending order (float64)."""

    q_b: object  # (out, p) orthonormal columns, already multiplied by U
    s: object  # (p,) singular values of ΔW
    v_t: object  # (p, in): Vᵀ Q_aᵀ, orthonormal rows

    @property
    def norm(self) -> float:
        return float(self.s.norm())

    def truncated(self, k: int, module: LoraModule) -> LoraModule:
        """Best rank-k module, scale kept; Σ split evenly between A and B to keep both well-scaled for f16."""
        import torch

        sign = 1.0 if module.scale >= 0 else -1.0
        root = torch.sqrt(self.s[:k] / abs(module.scale))
        b = (sign * self.q_b[:, :k] * root).float().contiguous()
        a = (root[:, None] * self.v_t[:k]).float().contiguous()
        return replace(module, a=a, b=b)


def factor(module: LoraModule) -> Factored:
    """SVD of ΔW through QR of B and Aᵀ: O((in+out)·r²) work, ΔW is never formed."""
    import torch

    q_b, r_b = torch.linalg.qr(module.b.double())
    q_a, r_a = torch.linalg.qr(module.a.double().T)
    u, s, v_t = torch.linalg.svd(module.scale * (r_b @ r_a.T))
    return Factored(q_b=q_b @ u, s=s, v_t=v_t @ q_a.T)


def energy_rank(s, energy: float) -> int:
    """Fewest leading singular values holding ``energy`` of Σσ² (all of them at energy 1)."""
    import torch

    if energy >= 1.0:
        return int(s.numel())
    e = torch.cumsum(s.double() ** 2, 0)
    if float(e[-1]) == 0.0:
        return 0
    return int(torch.searchsorted(e, energy * e[-1]).item()) + 1


def prune(plan: AdapterPlan, spec: str | PruneSpec, base=None) -> AdapterPlan:
    """Return a new plan with reduced ranks / dropped modules and ``prune_report`` filled in.

    ``base`` (a ResolvedBase or HF folder) supplies ‖W‖ for ``drop`` and ``size``; it defaults
    to the base the plan was loaded against.
    """
    spec = PruneSpec.parse(spec)
    factors = {t: factor(m) for t, m in plan.modules.items()}
    w_norms = {}
    if spec.drop is not None or spec.size is not None:
        w_norms = weight_norms(_base_folder(plan, base), [t + ".weight" for t in plan.modules])
    dropped = set()
    if spec.drop is not None:
        dropped = {t for t, f in factors.items() if f.norm / max(w_norms[t + ".weight"], 1e-30) < spec.drop}
    by_kind = set()
    if spec.modules is not None:
        kinds = {module_kind(t) for t in plan.modules}
        unknown = [k for k in spec.modules if k not in kinds]
        if unknown:
            raise ConfigError("--prune modules", "+".join(spec.modules),
                              f"kinds adapter {plan.name} has: {'+'.join(sorted(kinds))} (no {unknown[0]})")
        by_kind = {t for t in plan.modules if module_kind(t) not in spec.modules}
        dropped |= by_kind
    kept = {t: f for t, f in factors.items() if t not in dropped}
    ranks = _choose_ranks(plan, spec, kept, w_norms)
    modules, rows = {}, {}
    for target, m in plan.modules.items():
        f = factors[target]
        k = 0 if target in dropped else ranks[target]
        row = {"old_rank": m.rank, "new_rank": k, "rel_error": _rel_error(f.s, k)}
        if w_norms:
            row["delta_over_w"] = f.norm / max(w_norms[target + ".weight"], 1e-30)
        if target in by_kind:
            row["dropped"] = "modules"
        elif target in dropped:
            row["dropped"] = "drop"
        elif k == 0:
            row["dropped"] = "size" if spec.size is not None else "zero"  # ΔW == 0 exactly
        rows[target] = row
        if k == m.rank:
            modules[target] = m  # unchanged, bit for bit
        elif k > 0:
            modules[target] = f.truncated(k, m)
    if not modules:
        raise EdgepeftError(f"--prune {spec} removes every module of adapter {plan.name}",
                            "Use a lower drop threshold or a larger size budget")
    new = replace(plan, modules=modules)
    total = sum(float((f.s ** 2).sum()) for f in factors.values())
    lost = sum(float((f.s[rows[t]["new_rank"]:] ** 2).sum()) for t, f in factors.items())
    new.prune_report = {
        "spec": str(spec), "bytes_per_el": spec.bytes_per_el,
        "bytes_before": plan.nbytes(spec.bytes_per_el), "bytes_after": new.nbytes(spec.bytes_per_el),
        "modules_before": len(plan.modules), "modules_after": len(modules),
        "total_rel_error": math.sqrt(lost / total) if total > 0 else 0.0,
        "max_rel_error": max(r["rel_error"] for r in rows.values()),
        "modules": rows,
    }
    return new


def module_kind(target: str) -> str:
    """The projection a module path names: ``model.layers.3.self_attn.q_proj`` -> ``q_proj``."""
    return target.rsplit(".", 1)[-1]


def prune_plans(plans: list[AdapterPlan], spec: str, base=None, calib=None) -> list[AdapterPlan]:
    """``--prune`` for every writer: a fixed spec, or ``auto`` (:mod:`edgepeft.export.prune_auto`: the
    smallest adapter by modules and ranks whose task accuracy stays within a tolerance of the unpruned one)."""
    from edgepeft.export import prune_auto

    if prune_auto.is_auto(spec):
        auto = prune_auto.AutoSpec.parse(spec)
        return [prune_auto.auto_prune(p, base, auto, calib=calib) for p in plans]
    return [prune(p, spec, base=base) for p in plans]


def _rel_error(s, k: int) -> float:
    """‖ΔW − ΔW_k‖_F / ‖ΔW‖_F from the singular values (Eckart–Young)."""
    total = float((s ** 2).sum())
    return math.sqrt(float((s[k:] ** 2).sum()) / total) if total > 0 else 0.0


def _choose_ranks(plan, spec: PruneSpec, kept: dict, w_norms: dict) -> dict[str, int]:
    if spec.energy is not None:
        return {t: energy_rank(f.s, spec.energy) for t, f in kept.items()}
    if spec.rank is not None:
        return {t: min(spec.rank, plan.modules[t].rank) for t in kept}
    if spec.size is not None:
        return _budget_ranks(plan, spec, kept, w_norms)
    return {t: plan.modules[t].rank for t in kept}


def _budget_ranks(plan, spec: PruneSpec, kept: dict, w_norms: dict) -> dict[str, int]:
    """Greedy under a byte budget: take singular directions by (σ²/‖W‖²) per byte.

    σ²/‖W‖² is the direction's share of the module's relative perturbation, which makes modules
    of different sizes comparable. Within a module the cost per direction is constant and σ is
    sorted, so the greedy choice is always a prefix: a valid rank.
    """
    items = []
    for t, f in kept.items():
        m = plan.modules[t]
        cost = (m.in_features + m.out_features) * spec.bytes_per_el
        w2 = max(w_norms[t + ".weight"], 1e-30) ** 2
        items += [(float(s) ** 2 / w2 / cost, cost, t) for s in f.s]
    items.sort(key=lambda x: -x[0])
    ranks = dict.fromkeys(kept, 0)
    left = spec.size
    for _, cost, t in items:
        if cost <= left:
            ranks[t] += 1
            left -= cost
    return ranks


def _base_folder(plan: AdapterPlan, base) -> Path:
    if base is not None:
        return Path(getattr(base, "path", base))
    if plan.base_path is None:
        raise EdgepeftError(f"--prune drop/size needs the base weights, and adapter {plan.name} has no base recorded",
                            "Call prune(plan, spec, base=...)")
    return Path(plan.base_path)


def weight_norms(folder: Path, names: list[str]) -> dict[str, float]:
    """‖W‖_F for each name, reading one tensor at a time from the folder's safetensors."""
    from safetensors import safe_open

    from edgepeft.fingerprint import tensor_entries

    entries = {e.name: e for e in tensor_entries(sorted(Path(folder).glob("*.safetensors")))}
    missing = [n for n in names if n not in entries]
    if missing:
        raise EdgepeftError(f"base {folder} has no tensor {missing[0]}", "Pass the base the adapter was trained on")
    norms = {}
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(entries[n].file, []).append(n)
    for file, group in by_file.items():
        with safe_open(str(file), "pt") as f:
            for n in group:
                norms[n] = float(f.get_tensor(n).double().norm())
    return norms


def pad_ranks(plan: AdapterPlan, rank: int | None = None) -> AdapterPlan:
    """Zero-pad every module to one rank (default: the largest), leaving ΔW unchanged.

    For consumers that need a single rank across modules (a graph with one symbolic rank
    dimension, PEFT-style hot-swap); it gives back the bytes pruning saved, so prefer
    per-module ranks where the format allows them.
    """
    import torch

    rank = rank or max(plan.ranks.values())
    if rank < max(plan.ranks.values()):
        raise EdgepeftError(f"cannot pad adapter {plan.name} to rank {rank}: it has a module of rank "
                            f"{max(plan.ranks.values())}", "Pad to at least the largest rank")
    modules = {}
    for t, m in plan.modules.items():
        extra = rank - m.rank
        modules[t] = m if extra == 0 else replace(
            m, a=torch.cat([m.a, m.a.new_zeros(extra, m.in_features)]),
            b=torch.cat([m.b, m.b.new_zeros(m.out_features, extra)], dim=1))
    return replace(plan, modules=modules)
