"""``--prune auto``: the smallest adapter, by modules and ranks, whose task accuracy stays within
``tolerance`` points of the unpruned adapter's.

Why modules first: in separate mode llama.cpp runs two extra small matmuls per adapted module per
token, and that per-op cost, not the adapter's bytes, is most of what a separate adapter costs in
decode (benchmarks/bench_adapter_cost.py). So the search drops whole module kinds (q_proj, ...,
down_proj; least important first by ‖ΔW‖/‖W‖) while accuracy holds, then halves the rank cap of
what is left while accuracy holds. That is at most ``kinds - 1 + log2(rank)`` scored candidates.

Accuracy is greedy exact match (edgepeft.evaluate, the metric every runtime is scored with) in
PyTorch fp32 with ΔW added to the weights: on the held-out split of the task the adapter's training
run names, else on the run's calibration data (edgepeft.calib: held-out part or a sample of its
training data, or ``--calib``). The chosen spec is an ordinary ``--prune`` string, recorded with
every trial in ``prune_report["auto"]``, so the result can be reproduced without the search.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from edgepeft.errors import ConfigError, EdgepeftError
from edgepeft.export.merge import merged_in_place
from edgepeft.export.plan import AdapterPlan
from edgepeft.export.prune import PruneSpec, factor, module_kind, prune, weight_norms

_ALLOWED = "auto, optionally ,tolerance=POINTS (default 1) and ,examples=N (default 50), e.g. auto,tolerance=1"


def is_auto(spec) -> bool:
    return isinstance(spec, str) and re.split(r"\s*,\s*", spec.strip().lower(), maxsplit=1)[0] == "auto"


@dataclass(frozen=True)
class AutoSpec:
    tolerance: float = 1.0  # accuracy points (of 100) the pruned adapter may lose
    examples: int = 50  # eval examples scored per candidate

    def __post_init__(self):
        if not 0 <= self.tolerance <= 100:
            raise ConfigError("--prune auto tolerance", self.tolerance, "0 <= points <= 100")
        if not 1 <= self.examples <= 10000:
            raise ConfigError("--prune auto examples", self.examples, "an integer in [1, 10000]")

    @classmethod
    def parse(cls, text: str) -> AutoSpec:
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        fields: dict = {}
        for part in parts[1:]:
            key, sep, value = (x.strip().lower() for x in part.partition("="))
            if not sep or key not in ("tolerance", "examples") or key in fields:
                raise ConfigError("--prune", text, _ALLOWED)
            try:
                fields[key] = float(value) if key == "tolerance" else int(value)
            except ValueError:
                raise ConfigError(f"--prune auto {key}", value, _ALLOWED) from None
        return cls(**fields)


Scorer = Callable[[AdapterPlan], float]


def auto_prune(plan: AdapterPlan, base, auto: AutoSpec, score: Scorer | None = None, calib=None) -> AdapterPlan:
    """The pruned plan (``prune_report["auto"]`` holds the search); ``score(plan) -> accuracy in [0, 1]``
    defaults to :func:`task_scorer` on the plan's own task data."""
    from edgepeft.ui import info, stage

    close = None
    if score is None:
        score, source, close = task_scorer(plan, base, auto.examples, calib)
    else:
        source = "given scorer"
    try:
        with stage(f"prune auto: search adapter {plan.name}") as st:
            ref = score(plan)
            trials = [_trial("none", plan, ref, True)]
            ok = ref - auto.tolerance / 100 - 1e-9
            kinds = _kinds_by_importance(plan, base)
            keep = list(kinds)
            for kind in kinds:  # least important first
                if len(keep) == 1:
                    break
                cand = [k for k in keep if k != kind]
                st.update(note=f"without {kind}")
                p = prune(plan, PruneSpec(modules=tuple(cand)), base=base)
                acc = score(p)
                trials.append(_trial(str(PruneSpec(modules=tuple(cand))), p, acc, acc >= ok))
                if acc >= ok:
                    keep = cand
            modules = tuple(k for k in kinds if k in keep) if len(keep) < len(kinds) else None
            best_rank = None
            cap = max(plan.ranks.values()) // 2
            while cap >= 1:
                spec = PruneSpec(rank=cap, modules=modules)
                st.update(note=f"rank {cap}")
                p = prune(plan, spec, base=base)
                acc = score(p)
                trials.append(_trial(str(spec), p, acc, acc >= ok))
                if acc < ok:
                    break
                best_rank, cap = cap, cap // 2
    finally:
        if close:
            close()
    chosen = PruneSpec(rank=best_rank, modules=modules) if (best_rank or modules) else PruneSpec(energy=1.0)
    out = prune(plan, chosen, base=base)
    acc = next((t["accuracy"] for t in reversed(trials) if t["spec"] == str(chosen)), ref)
    out.prune_report["auto"] = {"chosen": str(chosen), "reference_accuracy": ref, "accuracy": acc,
                                "tolerance_points": auto.tolerance, "examples": auto.examples, "data": source,
                                "kinds_by_importance": kinds, "trials": trials}
    info(f"prune auto: {plan.name} -> {chosen} ({out.prune_report['modules_after']}/"
         f"{out.prune_report['modules_before']} modules, {out.prune_report['bytes_after'] / 1e6:.2f} MB of "
         f"{out.prune_report['bytes_before'] / 1e6:.2f}); accuracy {acc:.0%} vs {ref:.0%} unpruned")
    return out


def _trial(spec: str, p: AdapterPlan, acc: float, kept: bool) -> dict:
    return {"spec": spec, "accuracy": round(acc, 4), "modules": len(p.modules), "bytes": p.nbytes(),
            "within_tolerance": kept}


def _kinds_by_importance(plan: AdapterPlan, base) -> list[str]:
    """Module kinds, least important first: mean ‖ΔW‖/‖W‖ over the modules of that kind."""
    from edgepeft.export.prune import _base_folder

    norms = weight_norms(_base_folder(plan, base), [t + ".weight" for t in plan.modules])
    rel: dict[str, list[float]] = {}
    for t, m in plan.modules.items():
        rel.setdefault(module_kind(t), []).append(factor(m).norm / max(norms[t + ".weight"], 1e-30))
    return sorted(rel, key=lambda k: sum(rel[k]) / len(rel[k]))


# ------------------------------------------------------------------ the scorer
def task_scorer(plan: AdapterPlan, base, limit: int, calib=None) -> tuple[Scorer, str, Callable[[], None]]:
    """(score, data description, close): exact match of greedy PyTorch fp32 generations, ΔW added in place.

    Data: ``calib`` (a ``--calib`` JSONL) if given, else the eval split of the task the adapter's training
    run names, else the run's calibration data (held-out part, or a sample of its training data)."""
    import torch

    from edgepeft import evaluate
    from edgepeft.train.chat import Example
    from edgepeft.train.tasks import TASKS

    if base is None or not hasattr(base, "load_tokenizer"):
        raise EdgepeftError("--prune auto needs the resolved base", "Call auto_prune(plan, resolve_base(...), ...)")
    tok = base.load_tokenizer()
    task = plan.train_summary.get("task")
    if not calib and isinstance(task, str) and task in TASKS:
        examples = TASKS[task].examples("eval")[:limit]
        prompts = evaluate.eval_prompts(examples, tok)
        max_new, source = TASKS[task].max_new_tokens, f"task {task} eval split, {len(examples)} examples"
    else:
        from edgepeft.calib import CalibRequest, select_calibration

        calib = select_calibration(CalibRequest(adapters=[plan.source] if plan.source else [], calib=calib,
                                                calib_limit=limit), tok)
        if calib.kind == "bundled" or not all(p for p, _ in calib.pairs):
            raise EdgepeftError(f"--prune auto: adapter {plan.name} names no task, and its calibration data "
                                f"({calib.source}) has no prompts to score",
                                "Pass a training run trained with --task or --data, or use a fixed --prune")
        examples = [Example(prompt=p, completion=c) for p, c in calib.pairs]
        prompts = [p for p, _ in calib.pairs]
        # a right answer needs as many tokens as the longest completion (it need not emit the end marker:
        # normalize() cuts there anyway); more would only let wrong answers run on
        max_new = max(len(tok(c, add_special_tokens=False)["input_ids"]) for _, c in calib.pairs)
        source = f"{calib.source}, {len(examples)} pairs"
    model = base.load_model(torch.float32).eval()
    generate = evaluate.hf_generate_batch(model, tok, max_new)

    def score(p: AdapterPlan) -> float:
        with merged_in_place(model, [p]):
            return evaluate.score(generate(prompts), examples).accuracy

    def close() -> None:
        nonlocal model
        model = None

    return score, source, close
