"""Does `edgepeft bench` agree with llama.cpp's own `llama-bench` on the same file?

`llama-bench` is built here from the llama.cpp sources vendored in the pinned llama-cpp-python sdist
(the same version the runtime loads), into the peer cache (`~/.cache/edgepeft/peers/llama-bench-VER`),
never into the repo and never as a runtime dependency. Then, for Q4_K_M, Q8_0 and F16 GGUFs of
smollm2-135m, the two tools run on the same file one after the other, A B / B A alternating per round,
with the same shape (pp 512 tokens, tg 128 tokens, 5 repetitions after a warm-up, physical-core threads).
Each round gives one edgepeft/llama-bench ratio per metric; the result is the median over rounds.

    nice -n 10 python benchmarks/bench_llama_bench.py [--rounds 3] [--quants q4_k_m,q8_0,f16]

Writes benchmarks/results/llama_bench.json. The first run builds llama-bench (~10-20 min on 2 cores);
later runs take about 4 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "benchmarks" / "results"
WORK = Path(os.environ.get("EDGEPEFT_BENCH_WORK", "/tmp/edgepeft-bench-llama-bench"))
SHAPE = {"prompt_tokens": 512, "gen_tokens": 128, "repetitions": 5}


def sh(*argv, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, argv)), file=sys.stderr)
    return subprocess.run([str(a) for a in argv], check=True, **kw)


def build_llama_bench() -> tuple[Path, dict]:
    """llama-bench from the pinned sdist's vendor/llama.cpp, built once (Release, native CPU flags: the
    same GGML_NATIVE default the llama-cpp-python wheel was compiled with here)."""
    from peers import cache_root, sdist

    ver = version("llama_cpp_python")
    root = cache_root() / f"llama-bench-{ver}"
    src = root / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp"
    build = root / "build"
    binary = build / "bin" / "llama-bench"
    info = {"llama_cpp_python": ver, "source": f"llama-cpp-python {ver} sdist, vendor/llama.cpp", "binary": str(binary),
            "cmake": ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                      "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                      "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF"]}
    if binary.is_file():
        return binary, info
    if not (root / ".extracted").is_file():
        root.mkdir(parents=True, exist_ok=True)
        prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
        with tarfile.open(sdist()) as tf:
            tf.extractall(root, members=[m for m in tf.getmembers()
                                         if m.name.startswith(prefix) and (m.isfile() or m.isdir())], filter="data")
        (root / ".extracted").write_text(ver)
    t = time.perf_counter()
    sh("cmake", "-S", src, "-B", build, *info["cmake"], stdout=subprocess.DEVNULL)
    sh("cmake", "--build", build, "--target", "llama-bench", "-j", str(os.cpu_count() or 2), stdout=subprocess.DEVNULL)
    info["build_s"] = round(time.perf_counter() - t, 1)
    return binary, info


def base_gguf(quant: str) -> Path:
    """smollm2-135m alone at ``quant``, exported by edgepeft (no adapter: llama-bench has no LoRA)."""
    out = WORK / quant
    if not (out / "gguf-export.json").is_file():
        sh(sys.executable, "-m", "edgepeft", "export", "--format", "gguf", "--base", "smollm2-135m", "--quant", quant,
           "--out", out, "--quiet", "--no-verify")
    return next(p for p in sorted(out.glob("*.gguf")) if not p.name.endswith(".lora.gguf"))


def run_edgepeft(model: Path) -> dict:
    proc = sh(sys.executable, "-m", "edgepeft", "bench", model, "--prompt-tokens", SHAPE["prompt_tokens"],
              "--gen-tokens", SHAPE["gen_tokens"], "-r", SHAPE["repetitions"], "--no-ppl", "--swap-cycles", 1,
              "--json", "-", "--quiet", capture_output=True, text=True)
    rec = json.loads(proc.stdout)["records"][0]
    return {"pp": rec["pp"]["mean"], "tg": rec["tg"]["mean"], "pp_std": rec["pp"]["std"], "tg_std": rec["tg"]["std"]}


def run_llama_bench(binary: Path, model: Path, threads: int, repack: bool) -> dict:
    from edgepeft.bench.remote import parse_llama_bench

    proc = sh(binary, "-m", model, "-p", SHAPE["prompt_tokens"], "-n", SHAPE["gen_tokens"], "-r", SHAPE["repetitions"],
              "-t", threads, "--repack", int(repack), "-o", "json", capture_output=True, text=True)
    rows = parse_llama_bench(proc.stdout, "json")
    pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return {"pp": round(pp["avg_ts"], 2), "tg": round(tg["avg_ts"], 2), "pp_std": round(pp["stddev_ts"], 2),
            "tg_std": round(tg["stddev_ts"], 2),
            "settings": {k: pp.get(k) for k in ("n_threads", "n_batch", "n_ubatch", "flash_attn", "type_k", "type_v",
                                                "repack", "build_commit", "cpu_info", "model_type")}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quants", default="q4_k_m,q8_0,f16")
    args = ap.parse_args()

    from edgepeft import atomic
    from edgepeft.runtimes.llamacpp import amx_build, physical_cores
    from edgepeft.train.kernels import cpu_model

    WORK.mkdir(parents=True, exist_ok=True)
    binary, build = build_llama_bench()
    quants = args.quants.split(",")
    models = {q: base_gguf(q) for q in quants}
    threads = physical_cores()  # what edgepeft's llama.cpp runtime uses; llama-bench's default is the same count
    import llama_cpp

    repack = not amx_build(llama_cpp)  # the runtime's own rule: an AMX build crashes with weights repacked
    runs: dict = {q: {"edgepeft": [], "llama-bench": [], "load": []} for q in quants}
    t0 = time.perf_counter()
    for rnd in range(args.rounds):
        for q in quants:
            order = ["edgepeft", "llama-bench"] if rnd % 2 == 0 else ["llama-bench", "edgepeft"]
            for tool in order:
                print(f"round {rnd + 1}/{args.rounds} {q}: {tool}", file=sys.stderr)
                runs[q]["load"].append(os.getloadavg()[0])
                res = run_edgepeft(models[q]) if tool == "edgepeft" else run_llama_bench(binary, models[q], threads, repack)
                runs[q][tool].append(res)
    rows = {}
    for q in quants:
        ours, theirs = runs[q]["edgepeft"], runs[q]["llama-bench"]
        row = {"file": models[q].name, "bytes": models[q].stat().st_size}
        for m in ("pp", "tg"):
            ratios = [a[m] / b[m] for a, b in zip(ours, theirs)]
            row[m] = {"edgepeft_median": round(statistics.median(a[m] for a in ours), 2),
                      "llama_bench_median": round(statistics.median(b[m] for b in theirs), 2),
                      "ratio_per_round": [round(r, 4) for r in ratios], "ratio_median": round(statistics.median(ratios), 4)}
            row[m]["within_5pct"] = abs(row[m]["ratio_median"] - 1) <= 0.05
        row["llama_bench_settings"] = theirs[0]["settings"]
        row["rounds"] = {"edgepeft": ours, "llama-bench": [{k: v for k, v in b.items() if k != "settings"} for b in theirs]}
        row["loadavg_1m"] = runs[q]["load"]
        rows[q] = row
    doc = {"what": "edgepeft bench vs llama-bench (built from the pinned sdist) on the same GGUF, interleaved",
           "shape": SHAPE, "threads": threads, "rounds": args.rounds, "build": build, "cpu": cpu_model(),
           "wall_s": round(time.perf_counter() - t0, 1), "loadavg_end": os.getloadavg(), "quants": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    atomic.write_json(OUT / "llama_bench.json", doc)
    for q, r in rows.items():
        print(f"{q:7s} pp {r['pp']['edgepeft_median']:8.1f} vs {r['pp']['llama_bench_median']:8.1f} "
              f"ratio {r['pp']['ratio_median']:.3f}   tg {r['tg']['edgepeft_median']:7.1f} vs "
              f"{r['tg']['llama_bench_median']:7.1f} ratio {r['tg']['ratio_median']:.3f}")

if __name__ == "__main__":
    main()
