"""Training cost on smollm2-135m, CPU: QLoRA 4-bit vs 16-bit (and 32-bit) LoRA, base memory 4-bit vs fp32.

    nice -n 10 python benchmarks/bench_train.py [--steps 8] [--out benchmarks/results/train.json]

Every measurement runs in a fresh subprocess so peak RSS belongs to that configuration alone.
Training throughput is reported per wall second and per CPU second of the process: on a
shared machine the wall figure moves with the load, the CPU figure much less (both are kept,
with the load average, so readers can judge).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_MODES = {"qlora-4bit": 4, "lora-16bit": 16, "lora-32bit": 32}
RESIDENT_MODES = {"base-4bit": 4, "base-fp32": 32}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _shared_mb() -> float:
    # file-backed resident pages: the checkpoint read through mmap. Clean page cache the kernel can
    # drop, not memory the model holds, so "anon" (rss - shared) is the model's own footprint.
    import psutil

    return psutil.Process().memory_info().shared / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _malloc_trim() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def worker_resident(bits: int) -> dict:
    import gc

    import torch

    from edgepeft.models import resolve_base
    from edgepeft.train.config import TrainConfig
    from edgepeft.train.trainer import load_model, pick_recipe

    base = resolve_base("smollm2-135m")
    recipe = pick_recipe(TrainConfig(out="x", task="demo", bits=bits, device="cpu"))
    import bitsandbytes  # noqa: F401  (same libraries resident in both modes: the delta is the weights)
    import transformers.integrations.bitsandbytes  # noqa: F401

    gc.collect()
    before, before_sh = _rss_mb(), _shared_mb()
    model = load_model(base, recipe)
    # page in every tensor (an mmap-backed fp32 load is only partly resident until touched) and give
    # the loader's freed scratch (the fp32 copy bitsandbytes quantizes from) back to the OS
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.float().sum() if t.is_floating_point() else t.sum()
    gc.collect()
    _malloc_trim()
    after, after_sh = _rss_mb(), _shared_mb()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    del torch
    return {"bits": bits, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "resident_delta_mb": round(after - before, 1),
            "anon_delta_mb": round((after - after_sh) - (before - before_sh), 1),
            "file_backed_delta_mb": round(after_sh - before_sh, 1), "tensor_bytes_mb": round(weight_bytes / 2**20, 1)}


def worker_train(bits: int, steps: int) -> dict:
    from edgepeft.train.config import TrainConfig
    from edgepeft.train.run import run_training

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(out=tmp + "/run", task="demo", bits=bits, device="cpu", max_steps=steps, batch_size=4,
                          save_steps=10_000, logging_steps=1, seed=0)
        _, r = run_training(cfg, say=lambda m: None, log_lines=False)
    import torch

    return {"bits": bits, "torch_threads": torch.get_num_threads(), "steps": r["steps"], "batch_size": 4, "tokens": r["tokens_seen"], "wall_s": r["wall_s"],
            "cpu_s": r["cpu_s"], "s_per_step": r["s_per_step"], "tokens_per_s": r["tokens_per_s"],
            "tokens_per_cpu_s": round(r["tokens_seen"] / r["cpu_s"], 1) if r["cpu_s"] else None,
            "final_loss": r["final_loss"], "peak_rss_mb": round(_peak_rss_mb(), 1),
            "quantization": r["quantization"]}


def run_worker(args: list[str]) -> dict:
    t0 = time.time()
    p = subprocess.run([sys.executable, str(Path(__file__)), "--worker", *args], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{p.stderr[-3000:]}")
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    rec["load_avg"] = round(os.getloadavg()[0], 2)
    rec["elapsed_s"] = round(time.time() - t0, 1)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=str(HERE / "results" / "train.json"))
    ap.add_argument("--worker", nargs="+")
    ap.add_argument("--resident-only", action="store_true",
                    help="remeasure base memory only; keep the training rows of the existing --out file")
    a = ap.parse_args()
    if a.worker:
        kind, name = a.worker[0], a.worker[1]
        rec = worker_resident(RESIDENT_MODES[name]) if kind == "resident" else worker_train(TRAIN_MODES[name], a.steps)
        print(json.dumps({"name": name, **rec}))
        return
    from edgepeft.train.manifest import library_versions

    resident = {name: run_worker(["resident", name]) for name in RESIDENT_MODES}
    if a.resident_only:
        previous = json.loads(Path(a.out).read_text())
        train, a.steps = previous["train"], previous["steps"]
    else:
        train = {}
        for name in TRAIN_MODES:
            train[name] = run_worker(["train", name, "--steps", str(a.steps)])
            print(json.dumps(train[name]), file=sys.stderr)
    q, f = train["qlora-4bit"], train["lora-16bit"]
    result = {
        "benchmark": "train", "base": "smollm2-135m", "device": "cpu", "cpu_count": os.cpu_count(),
        "task": "demo", "steps": a.steps, "libraries": library_versions(), "resident": resident, "train": train,
        "ratios": {
            "tensor_bytes_4bit_over_fp32": round(resident["base-4bit"]["tensor_bytes_mb"]
                                                 / resident["base-fp32"]["tensor_bytes_mb"], 3),
            "tokens_per_cpu_s_4bit_over_16bit": round(q["tokens_per_cpu_s"] / f["tokens_per_cpu_s"], 3),
            "peak_rss_4bit_over_16bit": round(q["peak_rss_mb"] / f["peak_rss_mb"], 3),
        },
        "note": "2 CPU cores; wall-clock tokens/s depends on other load (load_avg per row), tokens per CPU-second "
                "less so. lora-16bit is bfloat16 weights, which this CPU has no fast matmul for. The fp32 base stays "
                "mmap-backed (file pages), so compare tensor bytes, not RSS, for the base's footprint.",
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE.parent))
    from edgepeft.atomic import write_json

    write_json(out, result)
    print(markdown(result))
    from plots import plot_train  # benchmarks/plots.py: the README's picture of these numbers

    print(f"wrote {plot_train(result, out.with_suffix('.png'))}")


def markdown(r: dict) -> str:
    rows = ["| config | tokens/s (wall) | tokens / CPU-s | s/step | peak RSS MiB | load avg |",
            "|---|---|---|---|---|---|"]
    for name, t in r["train"].items():
        rows.append(f"| {name} | {t['tokens_per_s']} | {t['tokens_per_cpu_s']} | {t['s_per_step']} | "
                    f"{t['peak_rss_mb']} | {t['load_avg']} |")
    rows += ["", "| base held as | tensor MiB | anonymous RSS delta MiB | file-backed (page cache) MiB |",
             "|---|---|---|---|"]
    for name, m in r["resident"].items():
        rows.append(f"| {name} | {m['tensor_bytes_mb']} | {m['anon_delta_mb']} | {m['file_backed_delta_mb']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
