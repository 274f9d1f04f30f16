"""One full ``edgepeft quickstart --base BASE`` from a fresh empty directory, measured (issue 17).

The quickstart runs as a user types it (relative default ``--out``, threads at the tools' defaults)
under ``/usr/bin/time -v`` and ``timeout``. Recorded beside its own summary.json:

- peak RSS of the largest single process (``/usr/bin/time``'s maximum resident set size) and of the
  whole process tree (the verifier's reference child, llama.cpp, ...; psutil, every 50 ms), with the
  stage the tree peak fell in (the summary's stage timings laid end to end from the start);
- a one-second timeline of the tree's RSS and ``os.getloadavg()`` every 10 s (the machine is shared:
  every time is only meaningful beside its load).

    python benchmarks/run_quickstart.py --base gemma3-270m --out benchmarks/results/quickstart_gemma3.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class TreeSampler(threading.Thread):
    """Summed RSS of a process and its descendants: the peak (every 50 ms), a 1 s timeline, load every 10 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.done = pid, threading.Event()
        self.peak_mib, self.peak_at_s, self.timeline, self.load = 0.0, 0.0, [], []

    def run(self) -> None:
        import psutil

        t0, last_line, last_load = time.perf_counter(), -1.0, -10.0
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            now = time.perf_counter() - t0
            mib = total / 2**20
            if mib > self.peak_mib:
                self.peak_mib, self.peak_at_s = mib, now
            if now - last_line >= 1:
                self.timeline.append([round(now, 1), round(mib)])
                last_line = now
            if now - last_load >= 10:
                self.load.append([round(now, 1), *[round(x, 2) for x in os.getloadavg()]])
                last_load = now
            self.done.wait(0.05)


def stage_at(seconds: dict, t: float) -> str | None:
    """The quickstart stage running ``t`` seconds after its start (stages laid end to end)."""
    end = 0.0
    for name, s in seconds.items():
        if name == "total":
            continue
        end += s
        if t <= end:
            return name
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="gemma3-270m")
    ap.add_argument("--timeout", type=int, default=3000)
    ap.add_argument("--out", type=Path, required=True, help="results JSON")
    ap.add_argument("--workdir", type=Path, help="empty directory to run in (default: a new temp dir, kept)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgepeft-quickstart-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        sys.exit(f"{work} is not empty")
    edgepeft = shutil.which("edgepeft", path=str(Path(sys.executable).parent)) or "edgepeft"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    argv = ["/usr/bin/time", "-v", "timeout", str(args.timeout), edgepeft, "quickstart", "--base", args.base]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with open(work / "quickstart.stdout", "wb") as so, open(work / "quickstart.stderr", "wb") as se:
        proc = subprocess.Popen(argv, cwd=work, stdout=so, stderr=se, env=env)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    err = (work / "quickstart.stderr").read_text(errors="replace")
    maxrss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    summary_path = work / "edgepeft-quickstart" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    loads = [row[1] for row in sampler.load]
    doc = {
        "command": f"edgepeft quickstart --base {args.base}",
        "cwd": "a fresh empty directory (relative default --out edgepeft-quickstart)",
        "returncode": rc,
        "wall_s": round(wall, 1),
        "peak_rss_mib": {
            "largest_process": round(int(maxrss.group(1)) / 1024) if maxrss else None,
            "process_tree": round(sampler.peak_mib),
            "process_tree_at_s": round(sampler.peak_at_s, 1),
            "process_tree_stage": stage_at(summary["seconds"], sampler.peak_at_s) if summary else None,
        },
        "threads": "tools' defaults (OMP_NUM_THREADS unset)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "note": "shared by other developers' sessions during the run; see load_average"},
        "load_average": {"at_start": [round(x, 2) for x in load0],
                         "1min_min": min(loads, default=None), "1min_max": max(loads, default=None),
                         "1min_mean": round(sum(loads) / len(loads), 2) if loads else None,
                         "samples_s_1_5_15": sampler.load},
        "rss_timeline_s_mib": sampler.timeline,
        "summary": summary,
        "stderr_tail": err[-3000:] if rc else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"rc {rc}, {wall:.0f} s, tree peak {sampler.peak_mib:.0f} MiB, largest process "
          f"{doc['peak_rss_mib']['largest_process']} MiB; {work}")


if __name__ == "__main__":
    main()
