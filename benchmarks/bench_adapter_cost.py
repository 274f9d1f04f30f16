"""The cost of keeping an adapter separate: llama.cpp decode/prefill with the adapter over the base alone
(``adapter_tg_ratio`` / ``adapter_pp_ratio`` from ``edgepeft bench``), per rank, targets, adapter tensor
type and pruning.

Every variant is the same adapter exported by ``edgepeft export --mode separate`` (Q4_K_M base) with a
different ``--prune`` / ``--adapter-type``; one ``edgepeft bench`` run then measures the base and every
adapter interleaved within each repetition (the paired ratios of edgepeft.bench.measure), and the script
repeats that in ``--rounds`` separate processes and takes the median ratio per variant.

    nice -n 10 python benchmarks/bench_adapter_cost.py [--adapter RUN_DIR/adapter] [--rounds 2]

Without ``--adapter`` (or when it does not exist) it uses a synthetic adapter of the demo adapter's shape
(rank 16, all-linear, non-zero B): decode cost depends on shapes and module count, not on values; the
accuracy side of pruning is ``export --prune auto``'s job (its report is kept when --prune-auto is given).
Writes benchmarks/results/adapter_cost.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results"
WORK = Path(os.environ.get("EDGEPEFT_BENCH_WORK", "/tmp/edgepeft-bench-adapter-cost"))
# name -> (--prune or None, --adapter-type)
VARIANTS = {
    "r16 all-linear f16": (None, "f16"),
    "r16 all-linear q8_0": (None, "q8_0"),
    "r8 all-linear": ("rank=8", "f16"),
    "r4 all-linear": ("rank=4", "f16"),
    "r16 q+v": ("modules=q_proj+v_proj", "f16"),
    "prune auto": ("auto", "f16"),  # export --prune auto: the smallest ranks/modules within 1 point on its eval
}


def sh(*argv, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, argv)), file=sys.stderr)
    return subprocess.run([str(a) for a in argv], check=True, **kw)


def synthetic_adapter(out: Path) -> Path:
    from lora_factory import make_lora

    from edgepeft.models import resolve_base

    if not (out / "adapter_config.json").is_file():
        make_lora(resolve_base("smollm2-135m").path, out, seed=7, r=16, b_std=0.02)
    return out


def export(adapter: Path, name: str, prune: str | None, adapter_type: str) -> Path:
    """One variant's separate export, reused on a rerun of the same adapter (folders are per adapter: a rerun
    with another --adapter once measured the earlier adapter's files)."""
    import hashlib

    key = hashlib.sha256(str(adapter.resolve()).encode()).hexdigest()[:10]
    out = WORK / key / name.replace(" ", "_").replace("+", "")
    if not (out / "gguf-export.json").is_file():
        sh(sys.executable, "-m", "edgepeft", "export", "--format", "gguf", "--base", "smollm2-135m", "--adapter",
           adapter, "--name", "a", "--mode", "separate", "--quant", "q4_k_m", "--adapter-type", adapter_type,
           *(["--prune", prune] if prune else []), "--out", out, "--quiet", "--no-verify")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default="")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--task-limit", type=int, default=100, help="demo examples scored per variant (trained adapter)")
    args = ap.parse_args()

    from plots import plot_adapter_cost

    from edgepeft import atomic
    from edgepeft.security import check_gguf_header
    from edgepeft.train.kernels import cpu_model

    WORK.mkdir(parents=True, exist_ok=True)
    adapter = Path(args.adapter) if args.adapter else None
    kind = "trained adapter"
    if adapter is None or not (adapter / "adapter_config.json").is_file():
        adapter, kind = synthetic_adapter(WORK / "synthetic-r16"), "synthetic rank-16 all-linear adapter"
    variants_wanted = {n: v for n, v in VARIANTS.items() if kind == "trained adapter" or v[0] != "auto"}
    outs = {name: export(adapter, name, prune, t) for name, (prune, t) in variants_wanted.items()}
    # the task column: only a trained adapter has one (prune auto needs it too)
    task = ["--task", "demo", "--task-limit", args.task_limit] if kind == "trained adapter" else []
    first = next(iter(outs.values()))
    base_file = first / Path(json.loads((first / "gguf-export.json").read_text())["files"][0]).name  # not the .imatrix.gguf
    files = {name: out / "a.lora.gguf" for name, out in outs.items()}
    extra = [x for i, (name, f) in enumerate(files.items()) for x in ("--adapter", f"v{i}={f}")]
    keys = {f"v{i}": name for i, name in enumerate(files)}
    rounds, loads = [], []
    t0 = time.perf_counter()
    for rnd in range(args.rounds):
        loads.append(os.getloadavg())
        proc = sh(sys.executable, "-m", "edgepeft", "bench", base_file, *extra, "--prompt-tokens", 128, "--gen-tokens",
                  64, "-r", args.repetitions, "--no-ppl", "--swap-cycles", 1, "--json", "-", "--quiet",
                  *(task if rnd == 0 else []), capture_output=True, text=True)
        rounds.append({r["adapter"]: r for r in json.loads(proc.stdout)["records"]})
    variants = {}
    for key, name in keys.items():
        f = files[name]
        meta = check_gguf_header(f)
        rec = json.loads((outs[name] / "gguf-export.json").read_text())
        acc = rounds[0][key].get("accuracy") or {}
        variants[name] = {
            "prune": VARIANTS[name][0], "adapter_type": VARIANTS[name][1], "adapter_bytes": f.stat().st_size,
            "modules": len(meta.tensors) // 2, "adapter_sha256": rec["adapters"][0]["adapter_sha256"],
            "demo_accuracy": acc.get("accuracy"), "demo_examples": acc.get("total"),
            "adapter_tg_ratio": round(statistics.median(r[key]["adapter_tg_ratio"] for r in rounds), 4),
            "adapter_pp_ratio": round(statistics.median(r[key]["adapter_pp_ratio"] for r in rounds), 4),
            "tg_ratio_per_round": [r[key]["adapter_tg_ratio"] for r in rounds],
            "tg": statistics.median(r[key]["tg"]["mean"] for r in rounds)}
    doc = {"what": "separate-mode adapter decode/prefill over the base alone, llama.cpp, interleaved per repetition",
           "adapter": f"{kind} ({adapter})", "base_file": base_file.name, "cpu": cpu_model(), "rounds": args.rounds,
           "shape": {"prompt_tokens": 128, "gen_tokens": 64, "repetitions": args.repetitions},
           "base_tg": statistics.median(r["none"]["tg"]["mean"] for r in rounds), "target": 0.9,
           "base_demo_accuracy": (rounds[0]["none"].get("accuracy") or {}).get("accuracy"),
           "loadavg": loads, "loadavg_end": os.getloadavg(), "wall_s": round(time.perf_counter() - t0, 1),
           "variants": variants}
    OUT.mkdir(parents=True, exist_ok=True)
    atomic.write_json(OUT / "adapter_cost.json", doc)
    plot_adapter_cost(doc, OUT / "adapter_cost.png")
    for name, v in variants.items():
        print(f"{name:22s} {v['adapter_bytes'] / 1e6:6.2f} MB {v['modules']:4d} modules  tg {v['adapter_tg_ratio']:.3f}x"
              f"  pp {v['adapter_pp_ratio']:.3f}x  demo {v['demo_accuracy']}")

if __name__ == "__main__":
    main()
