"""``edgepeft quickstart``: the whole story on the embedded base, on CPU, in one command.

train (QLoRA 4-bit) -> evaluate (PyTorch) -> export GGUF merged Q4_K_M, GGUF base Q4_K_M +
adapter, ONNX int4 merged, ONNX int4 base + .onnx_adapter -> bench each with its runtime
(llama.cpp, onnxruntime-genai) -> comparison table, chart, and a verified bundle.

Every step calls the library function the matching command calls (``train``,
``evaluate_hf``, the GGUF/ONNX writers, ``bench.run``, ``bundle.pack``), never our
own CLI in a subprocess. Sizes live in two :class:`Plan` records: the full run fits the
20-minute budget on 2 cores, ``--fast`` is the CI smoke run. Everything lands in ``--out``:

    run/            training run (adapter/, manifest.json, loss.png)
    gguf-merged/  gguf-separate/  onnx-merged/  onnx-separate/
    bench.json  quickstart.png  summary.json
    bundle/         base + adapter GGUF + ONNX separate folder, verified
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgepeft import atomic
from edgepeft.errors import EdgepeftError
from edgepeft.paths import to_record
from edgepeft.quiet import silence_progress_bars
from edgepeft.ui import STATE, info, show_progress, stage

ADAPTER_NAME = "demo"


@dataclass(frozen=True)
class Plan:
    """How big each step is. Numbers are sized for 2 CPU cores (see docs/bundle.md for timings)."""

    train_steps: int
    batch_size: int
    lr: float
    rank: int
    prompt_tokens: int
    gen_tokens: int
    repetitions: int
    ppl_tokens: int
    task_limit: int  # demo eval examples: every row (PyTorch and each artifact) is scored on these
    swap_cycles: int
    verify_exports: bool  # run each exporter's parity check against PyTorch
    merge_into: str  # auto: pick original vs dequantized base by task + generic-text loss (two extra builds)


FULL = Plan(train_steps=48, batch_size=4, lr=1e-3, rank=16, prompt_tokens=128, gen_tokens=32,
            repetitions=3, ppl_tokens=256, task_limit=50, swap_cycles=3, verify_exports=True, merge_into="auto")
# FAST differs from FULL in counts only (steps, examples, tokens, repetitions), so the CI run, and the
# README test that runs `edgepeft quickstart` as --fast, take every code path the full run takes.
FAST = Plan(train_steps=3, batch_size=4, lr=1e-3, rank=16, prompt_tokens=32, gen_tokens=8,
            repetitions=1, ppl_tokens=64, task_limit=4, swap_cycles=1, verify_exports=True, merge_into="auto")

ARTIFACTS = (  # (folder, format, mode, quant)
    ("gguf-merged", "gguf", "merged", "q4_k_m"),
    ("gguf-separate", "gguf", "separate", "q4_k_m"),
    ("onnx-merged", "onnx", "merged", "int4"),
    ("onnx-separate", "onnx", "separate", "int4"),
)


def run(out: Path, fast: bool = False, base: str = "smollm2-135m") -> dict:
    """Run every step into ``out``; return the summary (also written to out/summary.json)."""
    plan = FAST if fast else FULL
    out = atomic.ensure_writable_dir(Path(out))
    if (out / "summary.json").exists() or (out / "bundle").exists():
        raise EdgepeftError(f"--out {out} already holds a quickstart run", "Pass a new --out directory")
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    if not STATE.debug:
        silence_progress_bars()

    with _step("train", timings):
        trained = train_demo(base, out / "run", plan)
    adapter = Path(trained["adapter"])
    cfg = bench_config(base, adapter, plan)
    with _step("evaluate", timings):
        reference = evaluate_demo(cfg)
    evals = _evals(reference)
    exports, skipped = {}, skipped_artifacts(base)
    for folder, fmt, mode, quant in ARTIFACTS:
        if folder in skipped:
            info(f"skip {folder}: {skipped[folder]}")
            continue
        with _step(f"export {folder}", timings):
            exports[folder] = export_one(base, adapter, out / folder, fmt, mode, quant, plan)
    with _step("bench", timings):
        doc = bench_all(out, [out / f for f in exports], cfg, reference)
    with _step("chart + bundle", timings):
        chart = _chart(doc, out / "quickstart.png")
        bundle_dir = make_bundle(out)
    timings["total"] = round(time.perf_counter() - t_all, 1)
    summary = {"base": base, "fast": fast, "plan": asdict(plan), "train": _train_summary(trained),
               "evaluate": evals, "accuracy": task_scores(doc), "exports": {k: _export_summary(v) for k, v in exports.items()},
               "skipped": skipped,
               "bench": str(out / "bench.json"), "chart": str(chart), "bundle": str(bundle_dir),
               "seconds": timings}
    where = out / "summary.json"  # stored paths are relative to it; the returned summary's open from here
    atomic.write_json(where, {**summary, "train": {**summary["train"], "adapter": to_record(adapter, where)},
                              **{k: to_record(summary[k], where) for k in ("bench", "chart", "bundle")}})
    return summary


def skipped_artifacts(base: str) -> dict[str, str]:
    """Artifacts the installed tools cannot build for ``base``, each with the reason (ONNX for an
    architecture the onnxruntime-genai builder refuses): reported and left out, not a failed run."""
    from edgepeft.models import resolve_base

    refusal = resolve_base(base).arch.onnx_refusal
    return {f: f"ONNX export is not supported for this architecture: {refusal}"
            for f, fmt, *_ in ARTIFACTS if fmt == "onnx" and refusal}


# ----------------------------------------------------------------------------- steps
@contextlib.contextmanager
def _step(name: str, timings: dict):
    """One quickstart step: a ui stage (the progress rule every command uses), timed into ``timings``."""
    t0 = time.perf_counter()
    try:
        with stage(name):
            yield
    finally:
        timings[name] = round(time.perf_counter() - t0, 1)


def train_demo(base: str, run_dir: Path, plan: Plan) -> dict:
    """QLoRA: NF4 4-bit base (bitsandbytes, fp32 compute on CPU), LoRA on every linear layer."""
    from edgepeft.train.config import TrainConfig
    from edgepeft.train.run import train

    cfg = TrainConfig(out=str(run_dir), base=base, task="demo", bits=4, rank=plan.rank, alpha=2.0 * plan.rank,
                      max_steps=plan.train_steps, batch_size=plan.batch_size, lr=plan.lr, max_seq_len=128,
                      warmup_ratio=0.05, logging_steps=max(1, plan.train_steps // 8),
                      save_steps=max(plan.train_steps, 1), save_total_limit=1)
    return train(cfg, say=info, bar=show_progress(), log_lines=True)


def bench_config(base: str, adapter: Path, plan: Plan):
    """The one benchmark configuration: PyTorch (base alone and with the adapter) is the reference
    every artifact's top-1 agreement is measured against, and every row is scored on the same
    ``plan.task_limit`` demo examples by the same loop."""
    from edgepeft import bench

    return bench.BenchConfig(prompt_tokens=plan.prompt_tokens, gen_tokens=plan.gen_tokens,
                             repetitions=plan.repetitions, ppl_tokens=plan.ppl_tokens,
                             ppl_ctx=min(256, plan.ppl_tokens), swap_cycles=plan.swap_cycles, task="demo",
                             task_limit=plan.task_limit, reference=base,
                             reference_adapters={ADAPTER_NAME: str(adapter)})


def evaluate_demo(cfg) -> dict:
    """Exact match with PyTorch, the base alone and with the adapter: the benchmark's reference rows."""
    from edgepeft.bench.measure import measure_reference

    ref = measure_reference(cfg)
    ev = _evals(ref)
    info(f"demo exact match (PyTorch, {ev['adapter']['total']} examples): with adapter "
         f"{ev['adapter']['accuracy']:.0%}, base alone {ev['base']['accuracy']:.0%}")
    return ref


def _evals(ref: dict) -> dict:
    by = {r["adapter"]: r["accuracy"] for r in ref["records"]}
    return {"adapter": _acc(by[ADAPTER_NAME]), "base": _acc(by["none"])}


def task_scores(doc: dict) -> list[dict]:
    """Demo exact match of PyTorch (with the adapter) and of every artifact with it (the merged one, the
    separate one with the adapter active), all on the same examples, with the gap to PyTorch in points."""
    rows = [r for r in doc["records"] if isinstance(r.get("accuracy"), dict)
            and (r["adapter"] == ADAPTER_NAME or (r["adapter"] == "none" and ADAPTER_NAME in (r.get("merged_adapters") or [])))]
    ref = next((r["accuracy"] for r in rows if r.get("reference")), None)
    out = []
    for r in rows:
        a = r["accuracy"]
        out.append({"artifact": "pytorch" if r.get("reference") else Path(r["artifact"]).name, "runtime": r["runtime"],
                    **_acc(a), "points_vs_pytorch": None if ref is None or r.get("reference")
                    else round(100 * (a["accuracy"] - ref["accuracy"]), 1)})
    if ref is not None and any(o["total"] != ref["total"] for o in out):
        raise EdgepeftError("the quickstart scored its rows on different example counts", "Report this as a bug")
    return out


def _acc(r: dict) -> dict:
    return {k: r[k] for k in ("accuracy", "correct", "total")}


def export_one(base: str, adapter: Path, out: Path, fmt: str, mode: str, quant: str, plan: Plan) -> dict:
    """One artifact through the same writer ``edgepeft export`` dispatches to."""
    from edgepeft.export import export
    from edgepeft.export.request import ExportRequest

    # ONNX: --quant-algo auto, as `edgepeft export` (source_grid separate on a 4-bit GGUF base, GPTQ merged)
    req = ExportRequest(format=fmt, base=base, adapters=[adapter], names=[ADAPTER_NAME], out=out, mode=mode,
                        quant=quant, verify=plan.verify_exports, merge_into=plan.merge_into)
    return export(req).record


def bench_all(out: Path, folders: list[Path], cfg, reference: dict) -> dict:
    """Benchmark every artifact on its runtime (llama.cpp for GGUF, onnxruntime-genai for ONNX)."""
    from edgepeft import bench
    from edgepeft.profiles import load_profile, local_profile_name

    profile = load_profile(local_profile_name())
    doc = bench.run([bench.discover(f) for f in folders], [], profile, cfg, reference=reference)
    bench.write_document(doc, out / "bench.json")
    return doc


def _chart(doc: dict, path: Path) -> Path:
    from edgepeft import bench

    return bench.chart(doc, path)


def make_bundle(out: Path) -> Path:
    """Base Q4_K_M + demo adapter GGUF + the ONNX separate folder, packed and verified."""
    from edgepeft.artifacts import GGUFFolder, discover
    from edgepeft.bundle import PackInput, load_checked, pack

    sep = out / "gguf-separate"
    found = discover(sep)  # the one detector: base model, adapter files (the importance matrix is neither)
    if not isinstance(found, GGUFFolder) or ADAPTER_NAME not in found.adapters:
        raise EdgepeftError(f"{sep} is not a GGUF export folder with adapter {ADAPTER_NAME!r}",
                            "Re-run the quickstart into a new --out")
    onnx = [out / "onnx-separate"] if (out / "onnx-separate").is_dir() else []  # absent when skipped
    pack(PackInput(base=found.model, adapters=[found.adapters[ADAPTER_NAME]], onnx=onnx), out / "bundle")
    load_checked(out / "bundle")
    return out / "bundle"


# --------------------------------------------------------------------------- summary
def _train_summary(t: dict) -> dict:
    return {k: t.get(k) for k in ("steps", "wall_s", "s_per_step", "final_loss", "adapter")}


def _export_summary(r: dict) -> dict:
    # what the verification table needs (edgepeft.verification_view) plus the cost of the step
    keep = ("format", "mode", "quant", "seconds", "peak_rss_mb", "out", "files", "adapters", "adapter_files",
            "merge", "verify", "verification", "verifications")
    return {k: r.get(k) for k in keep if k in r}


def print_table(doc: dict) -> None:
    from edgepeft import bench
    from edgepeft.ui import print_result

    print_result(bench.table(doc))
