"""Verified GGUF export vs llama.cpp's unverified pipeline, side by side on this machine (issue 19).

For each base (default smollm2-135m and gemma3-270m) a rank-8 all-linear LoRA (non-zero B) is
merged into the original base once (``merge_into_folder``); the same merged Hugging Face folder
then goes through, interleaved round by round (A B C, A B C, ...):

- ``ours``: ``edgepeft export --format gguf --base FOLDER --quant q4_k_m`` (the default: verified in
  llama.cpp against the PyTorch fp32 reference);
- ``peer``: llama.cpp's ``convert_hf_to_gguf.py FOLDER --outtype f32`` (the vendored sdist, as
  tests/peers.py finds it) then ``llama_model_quantize`` to Q4_K_M (the function llama-quantize
  calls), unverified; f32 is the intermediate our writer uses for an fp32 base;
- ``ours_no_imatrix``: the same with ``--imatrix none`` (the importance matrix of issue 18, which the
  peer has no counterpart of, off; still verified);
- ``ours_no_verify``: ``--imatrix none --no-verify`` (what the verification costs).

Per run: wall time, peak RSS of the largest single process (``wait4``; what the export record's
``peak_rss_mb`` reports) and of the whole process tree (sampled every 20 ms), the artifact size
and ``os.getloadavg()``. Medians over rounds, and ratios ours/peer. Targets: time ratio <= 1.0;
peak RSS <= max(peer, 1.5 x the largest artifact written). Threads are left to each tool's
default (all cores), as a user runs them.

    python benchmarks/bench_export_peer.py [--rounds 2] [--rounds-per-base gemma3-270m=1] [--bases ...] [--parity]

``--parity`` also records the streamed reference against the full fp32 model on each base (the
oracle of tests/test_reference.py): max |Δlogit|, top-1 and NLL equality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "benchmarks" / "results" / "export_peer.json"
WORK = Path(os.environ.get("EDGEPEFT_BENCH_WORK", "/tmp/edgepeft-bench-export-peer"))
QUANT = "q4_k_m"
PEER_QUANTIZE = """
import ctypes, sys
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


# Linux carries a process's peak RSS across fork and exec (this script holds torch after preparing the
# folders), so each command is forked from a small trampoline and wait4 on that child reports its own
# peak and its CPU seconds (user + system, the waited-for descendants included).
_TRAMPOLINE = """
import os, sys
report, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execv(argv[0], argv)
_, status, ru = os.wait4(pid, 0)
with open(report, "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {ru.ru_maxrss} {ru.ru_utime + ru.ru_stime}")
"""


def measured(argv, env=None) -> dict:
    """Run ``argv``: wall seconds, CPU seconds, the largest single process's peak RSS and the tree's (sampled)."""
    import tempfile

    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se, tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rusage"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _TRAMPOLINE, report, *map(str, argv)], stdout=so, stderr=se,
                                env=env)  # files, not pipes: nothing blocks on a full pipe
        done, tree_peak = threading.Event(), [0]
        th = threading.Thread(target=_sample_tree, args=(proc.pid, done, tree_peak), daemon=True)
        th.start()
        proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        th.join()
        rc, maxrss, cpu = report.read_text().split()
        so.seek(0), se.seek(0)
        out, err = so.read(), se.read()
    if int(rc) != 0:
        raise RuntimeError(f"{argv[:4]} failed ({rc}): {err.decode()[-2000:]}")
    return {"seconds": wall, "cpu_seconds": float(cpu), "peak_rss_mib": int(maxrss) / 1024,
            "tree_peak_mib": tree_peak[0] / 2**20, "stdout": out.decode()}


def _sample_tree(pid: int, done: threading.Event, peak: list) -> None:
    """The largest summed RSS of ``pid`` and its descendants, every 20 ms."""
    import psutil

    try:
        root = psutil.Process(pid)
        while not done.is_set():
            total = 0
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            peak[0] = max(peak[0], total)
            done.wait(0.02)
    except psutil.NoSuchProcess:
        pass


def ours(folder: Path, out: Path, verify: bool, *extra) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "edgepeft", "export", "--format", "gguf", "--base", folder, "--quant", QUANT,
            "--out", out, "--quiet", "--json", *extra] + ([] if verify else ["--no-verify"])
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    r = measured(argv, env)
    rec = json.loads(r.pop("stdout"))
    art = Path(rec["files"][0])
    r["artifact_bytes"] = art.stat().st_size
    r["verification"] = rec["verification"]
    r["record_seconds"], r["record_peak_rss_mb"] = rec["seconds"], rec["peak_rss_mb"]
    shutil.rmtree(out, ignore_errors=True)
    return r


def peer(folder: Path, out: Path) -> dict:
    from peers import peer_dir

    src = peer_dir()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NO_LOCAL_GGUF")}
    env.update(PYTHONPATH=str(src / "gguf-py"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    f32, q = out / "peer-f32.gguf", out / f"peer-{QUANT}.gguf"
    a = measured([sys.executable, src / "convert_hf_to_gguf.py", folder, "--outtype", "f32", "--outfile", f32], env)
    env.pop("PYTHONPATH")
    b = measured([sys.executable, "-c", PEER_QUANTIZE, f32, q], env)
    r = {"seconds": a["seconds"] + b["seconds"], "convert_seconds": a["seconds"], "quantize_seconds": b["seconds"],
         "cpu_seconds": a["cpu_seconds"] + b["cpu_seconds"],
         "peak_rss_mib": max(a["peak_rss_mib"], b["peak_rss_mib"]),
         "tree_peak_mib": max(a["tree_peak_mib"], b["tree_peak_mib"]),
         "artifact_bytes": q.stat().st_size, "intermediate_bytes": f32.stat().st_size}
    shutil.rmtree(out, ignore_errors=True)
    return r


def prepare(alias: str) -> tuple[Path, dict]:
    """The merged folder: ``alias`` + a rank-8 all-linear LoRA (seed 7, B ~ N(0, 0.02)), merged into the original."""
    from lora_factory import make_lora

    from edgepeft.export.adapter import load_adapters
    from edgepeft.export.merge import merge_into_folder
    from edgepeft.models import param_count, resolve_base

    base = resolve_base(alias)
    adapter = WORK / f"{alias}-r8"
    if not (adapter / "adapter_config.json").is_file():
        make_lora(base.path, adapter, seed=7, r=8, b_std=0.02, targets=base.arch.lora_targets)
    folder = WORK / f"{alias}-r8-merged"
    if not (folder / "config.json").is_file():
        merge_into_folder(base, load_adapters([str(adapter)], base, ["r8"]), folder, "original")
    cfg = base.config
    return folder, {"alias": alias, "params": param_count(base), "layers": cfg["num_hidden_layers"],
                    "hidden": cfg["hidden_size"], "vocab": cfg["vocab_size"], "architecture": base.model_type,
                    "folder_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                    "adapter": "rank-8 LoRA on every linear, alpha 16, B ~ N(0, 0.02), seed 7, merged into the original"}


def parity(folder: Path) -> dict:
    """The streamed reference vs the full fp32 model (tests/test_reference.py's oracle) on the verifier's sequences."""
    import numpy as np
    from test_reference import full_model_reference

    from edgepeft.calib import token_nll
    from edgepeft.export import verify as V
    from edgepeft.export.reference import reference_stats
    from edgepeft.models import resolve_base

    base = resolve_base(str(folder))
    tok = base.load_tokenizer()
    seqs = [V._ids(tok, p) for p in V.PROMPTS] + V.held_out_ids(tok)
    got = reference_stats(base, [], "original", {}, [None], seqs, keep_rows=[True] * len(seqs),
                          nll=[True] * len(seqs))[None]
    want = full_model_reference(base, [], "original", {}, [None], seqs)[None]
    return {"max_abs_logit_diff": max(float(np.abs(g.rows - w).max()) for g, w in zip(got, want)),
            "max_abs_logit": max(float(np.abs(w).max()) for w in want),
            "top1_identical": all(bool((g.argmax == w.argmax(-1)).all()) for g, w in zip(got, want)),
            "max_nll_rel_diff": max(abs(g.nll - float(token_nll(w[:-1], ids[1:]).sum())) / abs(g.nll)
                                    for g, w, ids in zip(got, want, seqs)),
            "positions": sum(len(s) for s in seqs)}


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bases", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--rounds-per-base", default="", help="e.g. gemma3-270m=1 (overrides --rounds)")
    ap.add_argument("--parity", action="store_true")
    ap.add_argument("--skip-default", action="store_true", help="leave out the default (importance matrix) case")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    from edgepeft.train.kernels import cpu_model

    doc = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
           "loadavg_start": os.getloadavg(), "rounds": args.rounds, "quant": QUANT, "bases": {}}
    # the default export collects an importance matrix (issue 18) that the peer has no counterpart of:
    # ours_no_imatrix is the same verified export without it, ours_no_verify without both
    cases = [("ours", lambda f, o: ours(f, o, True)), ("peer", peer),
             ("ours_no_imatrix", lambda f, o: ours(f, o, True, "--imatrix", "none")),
             ("ours_no_verify", lambda f, o: ours(f, o, False, "--imatrix", "none"))]
    if args.skip_default:  # the matrix collection alone took minutes per run on the loaded machine
        cases = cases[1:]
    rounds = {k: int(v) for k, v in (x.split("=") for x in args.rounds_per_base.split(",") if x)}
    for alias in args.bases.split(","):
        folder, info = prepare(alias)
        runs: dict[str, list] = {name: [] for name, _ in cases}
        for rnd in range(rounds.get(alias, args.rounds)):
            for name, fn in cases:
                load = os.getloadavg()
                r = fn(folder, WORK / f"out-{name}")
                r.update(round=rnd, loadavg_before=load, loadavg_after=os.getloadavg())
                runs[name].append(r)
                print(f"{alias} round {rnd} {name}: {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} CPU-s), "
                      f"{r['peak_rss_mib']:.0f} MiB "
                      f"(tree {r['tree_peak_mib']:.0f}), load {load[0]:.1f}", file=sys.stderr)
        summary = {name: {"seconds": med(rs, "seconds"), "cpu_seconds": med(rs, "cpu_seconds"),
                          "peak_rss_mib": med(rs, "peak_rss_mib"),
                          "tree_peak_mib": med(rs, "tree_peak_mib"), "artifact_bytes": rs[0]["artifact_bytes"]}
                   for name, rs in runs.items()}
        o, p = summary.get("ours", summary["ours_no_imatrix"]), summary["peer"]
        rss_bound = max(p["peak_rss_mib"], 1.5 * o["artifact_bytes"] / 2**20)
        ni = summary["ours_no_imatrix"]
        verdict = {"time_ratio": o["seconds"] / p["seconds"], "cpu_ratio": o["cpu_seconds"] / p["cpu_seconds"],
                   "no_imatrix_time_ratio": ni["seconds"] / p["seconds"],
                   "no_imatrix_cpu_ratio": ni["cpu_seconds"] / p["cpu_seconds"],
                   "no_imatrix_rss_ratio": ni["peak_rss_mib"] / p["peak_rss_mib"],
                   "rss_ratio": o["peak_rss_mib"] / p["peak_rss_mib"],
                   "tree_rss_ratio": o["tree_peak_mib"] / p["tree_peak_mib"],
                   "no_verify_time_ratio": summary["ours_no_verify"]["seconds"] / p["seconds"],
                   "verification_seconds": ni["seconds"] - summary["ours_no_verify"]["seconds"],
                   "verification_cpu_seconds": ni["cpu_seconds"] - summary["ours_no_verify"]["cpu_seconds"],
                   "rss_bound_mib": rss_bound,
                   "time_target_met": o["seconds"] <= p["seconds"],
                   "rss_target_met": o["peak_rss_mib"] <= rss_bound,
                   "tree_rss_target_met": o["tree_peak_mib"] <= max(p["tree_peak_mib"],
                                                                    1.5 * o["artifact_bytes"] / 2**20),
                   "no_imatrix_rss_target_met": ni["peak_rss_mib"] <= rss_bound,
                   "no_imatrix_time_target_met": ni["seconds"] <= p["seconds"],
                   "verified": all(r["verification"]["passed"] for n in ("ours", "ours_no_imatrix")
                                   for r in runs.get(n, []))}
        entry = {**info, "median": summary, "verdict": verdict, "runs": runs}
        if args.parity:
            entry["reference_parity"] = parity(folder)
        doc["bases"][alias] = entry
        print(json.dumps({alias: verdict}, indent=1), file=sys.stderr)
    doc["loadavg_end"] = os.getloadavg()
    doc["bench_seconds"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(args.out)

if __name__ == "__main__":
    main()
