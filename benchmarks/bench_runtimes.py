"""Runtime benchmark, side by side in one run, on this machine (see docs/bench.md).

1. Our Q4_K_M GGUF of SmolLM2-135M vs the same model converted by llama.cpp's own
   convert_hf_to_gguf.py and quantized by llama.cpp's quantizer (the llama-quantize binary
   when built, else llama_model_quantize, the function it calls). Target: tg >= 0.98x.
2. Adapter swap in separate mode (llama_set_adapters_lora + KV clear) vs loading the merged
   GGUF for the other adapter. Target: >= 20x faster. Both times reported.
3. bw_util for every run, against this machine's measured copy bandwidth.

Cases are interleaved (A B A B ...) so background load hits both sides alike; each number
is the mean of all repetitions over all rounds.

    nice -n 10 python benchmarks/bench_runtimes.py [--adapter /work/runs/demo/adapter] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "benchmarks" / "results"
WORK = Path("/tmp/edgepeft-bench-runtimes")


def sh(*argv, **kw):
    print("+", " ".join(map(str, argv)), file=sys.stderr)
    return subprocess.run([str(a) for a in argv], check=True, **kw)


def synthetic_adapter(base_dir: Path, out: Path) -> Path:
    """Stand-in when no trained demo adapter exists: a rank-8 LoRA with non-zero B."""
    from bench_artifacts import make_peft

    if not (out / "adapter_config.json").is_file():
        make_peft(base_dir, out, seed=7, r=8)
    return out


def export(fmt, base, adapter, out, mode, quant):
    if not (out / ("gguf-export.json" if fmt == "gguf" else "edgepeft-onnx.json")).is_file():
        sh(sys.executable, "-m", "edgepeft", "export", "--format", fmt, "--base", base, "--adapter", adapter,
           "--name", "demo", "--mode", mode, "--quant", quant, "--out", out, "--quiet", "--no-verify")
    return out


def peer_q4km(base_dir: Path, work: Path) -> tuple[Path, str]:
    """Base model through llama.cpp's own converter + quantizer."""
    from peers import peer_dir

    out = work / "peer-q4_k_m.gguf"
    f32 = work / "peer-f32.gguf"
    quantizer = "llama-quantize binary"
    if not out.is_file():
        src = peer_dir()
        if not f32.is_file():
            sh(sys.executable, src / "convert_hf_to_gguf.py", base_dir, "--outfile", f32, "--outtype", "f32")
        binary = Path("/tmp/b8/build/bin/llama-quantize")
        if binary.is_file():
            sh(binary, f32, out, "Q4_K_M", stdout=subprocess.DEVNULL)
        else:
            import ctypes

            import llama_cpp

            quantizer = "llama_model_quantize (what llama-quantize calls)"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
            rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params))
            assert rc == 0, rc
    return out, quantizer


def swap_vs_reload(sep, merged, profile, cycles: int) -> dict:
    """Separate: set_adapter(demo) then back to none, KV cache reset included. Merged: load the other GGUF."""
    from edgepeft.runtimes.base import get_runtime

    rt = get_runtime("llama.cpp")
    rt.load(sep, profile, n_ctx=1024)
    rt.set_adapter("demo")
    swaps = []
    for _ in range(cycles):
        for name in (None, "demo"):
            t = time.perf_counter()
            rt.set_adapter(name)
            swaps.append((time.perf_counter() - t) * 1e3)
    rt.close()
    loads = []
    for _ in range(cycles):
        m = get_runtime("llama.cpp")
        m.load(merged, profile, n_ctx=1024)
        loads.append(m.load_ms)  # engine load only (our fit checks excluded, which favours the merged side)
        m.close()
    return {"swap_ms_median": round(statistics.median(swaps), 4), "swap_samples": len(swaps),
            "merged_load_ms_median": round(statistics.median(loads), 2), "load_samples": len(loads),
            "speedup": round(statistics.median(loads) / statistics.median(swaps), 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default="/work/runs/demo/adapter")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--onnx", action="store_true", help="also bench the ONNX int4 export on onnxruntime-genai")
    ap.add_argument("--quality", action="store_true", help="also demo-task accuracy (20 examples) and top-1 vs PyTorch")
    args = ap.parse_args()

    from edgepeft import bench
    from edgepeft.models import resolve_base
    from edgepeft.profiles import load_profile

    WORK.mkdir(parents=True, exist_ok=True)
    base = resolve_base("smollm2-135m")
    adapter = Path(args.adapter)
    adapter_kind = "trained demo adapter"
    if not (adapter / "adapter_config.json").is_file():
        adapter, adapter_kind = synthetic_adapter(base.path, WORK / "synthetic-adapter"), "synthetic rank-8 adapter"
    sep = bench.discover(export("gguf", "smollm2-135m", adapter, WORK / "ours-sep", "separate", "q4_k_m"))
    merged = bench.discover(export("gguf", "smollm2-135m", adapter, WORK / "ours-merged", "merged", "q4_k_m"))
    peer_path, quantizer = peer_q4km(base.path, WORK)
    peer = bench.discover(peer_path)
    arts = [("ours q4_k_m (separate base)", sep), ("llama.cpp tools q4_k_m", peer), ("ours q4_k_m merged", merged)]
    if args.onnx:
        arts.append(("ours onnx int4 (separate)",
                     bench.discover(export("onnx", "smollm2-135m", adapter, WORK / "ours-onnx", "separate", "int4"))))

    profile = load_profile("x86-64-cpu")
    gb_s = bench.measure_bandwidth()
    quality = {"task": "demo", "task_limit": 20, "reference": "smollm2-135m",
               "reference_adapters": {"demo": str(adapter)}} if args.quality else {}
    cfg = bench.BenchConfig(repetitions=args.repetitions, ppl_tokens=512, **quality)
    runs: dict[str, list] = {label: [] for label, _ in arts}
    ref_cache: dict = {}
    for rnd in range(args.rounds):
        for label, art in (arts if rnd % 2 == 0 else arts[::-1]):
            print(f"round {rnd + 1}: {label}", file=sys.stderr)
            runtime = "onnxruntime-genai" if art.format == "onnx-genai" else "llama.cpp"
            quality = rnd == 0  # perplexity/accuracy/top-1 are deterministic: measure once
            c = cfg if quality else bench.BenchConfig(repetitions=args.repetitions, ppl_file=None)
            recs = bench.run_case(art, runtime, profile, c, gb_s, "local", ref_cache)
            runs[label].append(recs)
    records = []
    for label, rounds in runs.items():
        for i, rec in enumerate(rounds[0]):
            tg = [v for rnd in rounds for v in [rnd[i]["tg"]["mean"]]]
            pp = [rnd[i]["pp"]["mean"] for rnd in rounds]
            rec = dict(rec, label=label)
            rec["tg"] = {**rec["tg"], "mean": round(statistics.fmean(tg), 2), "rounds": tg}
            rec["pp"] = {**rec["pp"], "mean": round(statistics.fmean(pp), 2), "rounds": pp}
            rec["bw_util"] = round(rec["tg"]["mean"] * rec["bytes_per_token"] / (gb_s * 1e9), 4)
            records.append(rec)
    by = {(r["label"], r["adapter"]): r for r in records}
    ours, theirs = by[("ours q4_k_m (separate base)", "none")], by[("llama.cpp tools q4_k_m", "none")]
    swap = swap_vs_reload(sep, merged, profile, cycles=5)
    bandwidth = {"bandwidth_gb_s": gb_s, "bandwidth_source": "numpy copy of 256 MiB, best of 5, read+write bytes"}
    doc = bench.document(records, profile, cfg, bandwidth)
    doc["summary"] = {
        "adapter": f"{adapter_kind} ({adapter})",
        "peer_quantizer": quantizer,
        "tg_ratio_ours_vs_llamacpp_tools": round(ours["tg"]["mean"] / theirs["tg"]["mean"], 4),
        "pp_ratio_ours_vs_llamacpp_tools": round(ours["pp"]["mean"] / theirs["pp"]["mean"], 4),
        "tg_target": 0.98,
        "swap": swap, "swap_target_speedup": 20,
        "bw_util": {f"{r['label']} / {r['adapter']}": r["bw_util"] for r in records},
        "machine_bandwidth_gb_s": gb_s,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    from edgepeft import atomic

    atomic.write_json(OUT / "bench_runtimes.json", doc)
    bench.chart(doc, OUT / "bench_runtimes.png")
    from rich.console import Console

    Console(width=220).print(bench.table(doc))
    print(json.dumps(doc["summary"], indent=2))


if __name__ == "__main__":
    main()
