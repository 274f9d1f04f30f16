"""What the verifier's task check reads on real trained adapters (export/verify.py ``task_kept``).

For each trained adapter (a training run dir: the check takes that run's own data, as the export's
importance matrix does) and each format/quant/mode, one verified export through the CLI; the record's
``task`` entry holds the top-1 agreement over the completion positions of up to TASK_EXAMPLES examples,
and how many examples each side gets exactly right (teacher-forced). The bounds in
export/tolerances.py are set from these rows against the demo accuracy measured on the same files
(benchmarks/results/imatrix.json, onnx_mixed.json: the exports are deterministic).

    python benchmarks/bench_task_check.py --adapter demo=RUN_DIR [--adapter chat=RUN_DIR] [--out results/task_check.json]
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

ROOT = Path(__file__).resolve().parents[1]
# (format, quant, mode, extra CLI arguments)
ROWS = [
    ("gguf", "f16", "separate", []),
    ("gguf", "q8_0", "merged", []),
    ("gguf", "q4_k_m", "separate", []),
    ("gguf", "q4_k_m", "separate", ["--imatrix", "none"]),
    ("gguf", "q4_k_m", "merged", []),
    ("gguf", "q4_k_m", "merged", ["--imatrix", "none"]),
    ("gguf", "iq4_xs", "merged", []),
    ("gguf", "q3_k_m", "merged", []),
    ("gguf", "q3_k_m", "merged", ["--imatrix", "none"]),
    ("onnx", "fp32", "merged", []),
    ("onnx", "int8", "merged", []),
    ("onnx", "int4", "separate", []),
    ("onnx", "int4", "merged", []),
    ("onnx", "int4", "separate", ["--quant-algo", "k_quant_mixed"]),
    ("onnx", "int4", "merged", ["--quant-algo", "k_quant_mixed"]),
]


def one(base: str, run: Path, fmt: str, quant: str, mode: str, extra: list, work: Path) -> dict:
    out = work / f"{fmt}-{quant}-{mode}-{'-'.join(a.strip('-') for a in extra) or 'default'}"
    cmd = [sys.executable, "-m", "edgepeft", "export", "--format", fmt, "--base", base, "--adapter", str(run),
           "--mode", mode, "--quant", quant, "--merge-into", "original", "--out", str(out), "--json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    row = {"format": fmt, "quant": quant, "mode": mode, "extra": extra, "seconds": round(time.perf_counter() - t0, 1),
           "exit": proc.returncode}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        return row
    rec = json.loads(proc.stdout)
    for v in rec.get("verifications") or [rec["verification"]]:
        if v.get("task"):
            row.update(task=v["task"], checks={c["metric"]: c["value"] for c in v["checks"]}, passed=v["passed"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", action="append", required=True, help="NAME=RUN_DIR (a training run dir)")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "task_check.json")
    args = ap.parse_args()
    from edgepeft.train.kernels import cpu_model

    doc = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_before": os.getloadavg(), "base": args.base,
           "adapters": {}}
    with tempfile.TemporaryDirectory(prefix="edgepeft-task-check-") as tmp:
        for spec in args.adapter:
            name, run = spec.split("=", 1)
            rows = doc["adapters"][name] = []
            for fmt, quant, mode, extra in ROWS:
                rows.append(one(args.base, Path(run).resolve(), fmt, quant, mode, extra, Path(tmp) / name))
                r = rows[-1]
                t = r.get("task", {})
                print(f"{name:5s} {fmt} {quant:7s} {mode:8s} {' '.join(extra):26s} exit {r['exit']} "
                      f"task top-1 {t.get('top1_agreement')} agree {t.get('examples_agreeing')}/{t.get('examples')} "
                      f"exact {t.get('exact_match')} ({r['seconds']} s)", flush=True)
    doc["load_after"] = os.getloadavg()
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
