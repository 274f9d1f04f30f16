"""What the importance matrix adds to a verified GGUF export (issue 18's target: at most +30 % on smollm2-135m).

    python benchmarks/bench_imatrix_cost.py --run RUN_DIR [--before-python PY] [--case NAME=PY ...] [--rounds 2]
                                            [--texts 8,16,32] [--out FILE]

Per round and per mode (merged, separate), interleaved and rotated every round (A B C, B C A, ...):
``edgepeft export --format gguf --base smollm2-135m --adapter RUN --quant q4_k_m --merge-into original``
through the real CLI with ``--imatrix auto`` (this checkout, and ``--before-python``'s edgepeft when
given: a venv with the collector before this change) and with ``--imatrix none``. Threads are each
tool's default (``OMP_NUM_THREADS`` unset), as a user runs them. Per export: wall seconds, the record's
matrix seconds, CPU seconds of the export's process tree, the verifier's checks (top-1 agreement, perplexity ratio vs PyTorch fp32) and
``os.getloadavg()`` before and after. Ratios auto/none come from the same round (the machine is shared:
only ratios are quoted).

``--texts N,...`` adds merged exports whose matrix comes from the first N texts of the run's own seeded
calibration sample (as ``--calib`` files of ``{"messages"}`` rows, so the rendering is the run's), to
see how many calibration texts the matrix needs. Writes benchmarks/results/imatrix_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "imatrix_cost.json"


def export(python: str, run: Path, mode: str, out: Path, *extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    argv = [python, "-m", "edgepeft", "export", "--format", "gguf", "--base", "smollm2-135m", "--adapter", str(run),
            "--quant", "q4_k_m", "--merge-into", "original", "--mode", mode, "--json", "--out", str(out), *extra]
    load = os.getloadavg()
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, cwd=out.parent)
    secs = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)  # the export and every child it waited for
    row = {"seconds": round(secs, 2), "cpu_seconds": round(cpu, 2), "loadavg_before": [round(x, 2) for x in load],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()], "rc": proc.returncode}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1:]
        return row
    rec = json.loads(proc.stdout)
    imx = rec.get("imatrix") or {}
    row["imatrix_seconds"] = imx.get("seconds")
    row["imatrix_texts"] = sum(c.get("texts", 0) for c in imx.get("calibration") or []) or None
    row["verify"] = [{"adapter": v.get("adapter"), **{c["metric"]: c["value"] for c in v.get("checks", [])}}
                     for v in (rec.get("verifications") or [rec.get("verification")]) if v]
    return row


def calib_files(run: Path, folder: Path, counts: list[int]) -> dict[int, Path]:
    """The first N rows of the run's own calibration sample (edgepeft.calib's seeded pick) as --calib files."""
    import random

    from edgepeft.calib import DEFAULT_LIMIT, SAMPLE_SEED, _run_records
    from edgepeft.keys import TRAIN_MANIFEST

    manifest = json.loads((run / TRAIN_MANIFEST).read_text())
    records, _ = _run_records(manifest["data"]["source"], manifest["data"]["sha256"], run / TRAIN_MANIFEST, "data")
    picked = records if len(records) <= DEFAULT_LIMIT else random.Random(SAMPLE_SEED).sample(records, DEFAULT_LIMIT)
    out = {}
    for n in counts:
        out[n] = folder / f"calib-{n}.jsonl"
        out[n].write_text("".join(json.dumps({"messages": r.messages}) + "\n" for r in picked[:n]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True, help="a training RUN_DIR (a copy of the demo adapter's)")
    ap.add_argument("--before-python", default=None, help="a python whose edgepeft has the collector before")
    ap.add_argument("--case", action="append", default=[], metavar="NAME=PYTHON",
                    help="another --imatrix auto case run by that python's edgepeft (repeatable)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="merged,separate")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--texts", default="", help="comma-separated calibration text counts for the merged sweep")
    args = ap.parse_args()
    run = args.run.resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-imatrix-cost-"))
    cases = {"auto": (sys.executable, ()), "none": (sys.executable, ("--imatrix", "none"))}
    if args.before_python:
        cases["auto_before"] = (args.before_python, ())
    for spec in args.case:
        name, _, python = spec.partition("=")
        cases[name] = (python, ())
    doc = {"benchmark": "imatrix_cost", "base": "smollm2-135m", "quant": "q4_k_m", "merge_into": "original",
           "run": str(args.run), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "loadavg_start": os.getloadavg(), "cases": {k: v[0] for k, v in cases.items()}, "runs": [], "texts": []}

    def save():
        doc["loadavg_now"] = os.getloadavg()
        args.out.write_text(json.dumps(doc, indent=1))

    order = list(cases)
    n = 0
    for rnd in range(args.rounds):
        for mode in args.modes.split(","):
            for case in order[rnd % len(order):] + order[:rnd % len(order)]:
                python, extra = cases[case]
                n += 1
                row = {"round": rnd, "mode": mode, "case": case,
                       **export(python, run, mode, work / f"out-{n}", *extra)}
                doc["runs"].append(row)
                print(json.dumps(row), flush=True)
                save()
    if args.texts:
        counts = [int(x) for x in args.texts.split(",")]
        files = calib_files(run, work, counts)
        for k in counts:
            n += 1
            row = {"texts": k, **export(sys.executable, run, "merged", work / f"out-{n}", "--calib", str(files[k]))}
            doc["texts"].append(row)
            print(json.dumps(row), flush=True)
            save()
    summary = {}
    for mode in args.modes.split(","):
        for case in cases:
            if case == "none":
                continue
            ratios, cpu = [], []
            for rnd in range(args.rounds):
                got = {r["case"]: r for r in doc["runs"] if r["round"] == rnd and r["mode"] == mode and r["rc"] == 0}
                if case in got and "none" in got:
                    ratios.append(got[case]["seconds"] / got["none"]["seconds"])
                    cpu.append(got[case]["cpu_seconds"] / got["none"]["cpu_seconds"])
            shares = [r["imatrix_seconds"] / r["seconds"] for r in doc["runs"]
                      if r["mode"] == mode and r["case"] == case and r.get("imatrix_seconds")]
            summary[f"{mode}/{case}"] = {"time_ratio_vs_none": [round(x, 3) for x in ratios],
                                         "median_ratio": round(statistics.median(ratios), 3) if ratios else None,
                                         "cpu_ratio_vs_none": [round(x, 3) for x in cpu],
                                         "matrix_share_of_export": [round(x, 3) for x in shares]}
    doc["summary"] = summary
    doc["loadavg_end"] = os.getloadavg()
    save()
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
