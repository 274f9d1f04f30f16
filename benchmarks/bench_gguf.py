"""GGUF export: speed/peak RSS vs llama.cpp's own pipeline, and quality per quant type.

    nice -n 10 python benchmarks/bench_gguf.py [--adapter /work/runs/demo/adapter] [--quick]

Speed: ``edgepeft export --mode merged --quant q4_k_m`` against llama.cpp's pipeline
(the pinned sdist's ``convert_hf_to_gguf.py`` to an F32 GGUF, then ``llama_model_quantize``),
both on the same merged smollm2-135m folder, alternated in one run, each in a fresh process
(peak RSS from ``wait4``). Quality: perplexity on edgepeft/data/wikitext2-valid-slice.txt and
demo-task exact match, per quant type, merged and separate (base + adapter GGUF), in llama.cpp.
Writes benchmarks/results/gguf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results" / "gguf.json"
QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
WIKI = ROOT / "edgepeft" / "data" / "wikitext2-valid-slice.txt"


# Runs the command and reports its wall time and peak RSS. A fresh small launcher process does
# the fork: Linux carries a forking parent's RSS into the child's ru_maxrss across exec, so
# children forked straight from this (large) benchmark process would all report at least its size.
_LAUNCHER = """
import json, os, subprocess, sys, tempfile, time
with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would block the child
    t0 = time.perf_counter()
    p = subprocess.Popen(sys.argv[1:], stdout=log, stderr=log)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    log.seek(0)
    tail = log.read().decode(errors="replace")[-2000:]
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "seconds": wall, "maxrss_kb": ru.ru_maxrss, "tail": tail}))
"""


def timed(cmd: list[str], env=None) -> dict:
    """Run ``cmd`` in a fresh process; wall time and that process's own peak RSS."""
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True, env=env,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({r['rc']}): {r['tail']}")
    return {"seconds": round(r["seconds"], 2), "peak_rss_mb": round(r["maxrss_kb"] / 1024, 1)}


def ours(base: Path, out: Path, cache: Path, adapter: Path | None = None) -> dict:
    """One export in a fresh process. ``cache`` is its EDGEPEFT_CACHE: an empty one makes a cold
    run (the tokenizer is resolved through transformers); one a previous run filled, a warm run."""
    cmd = [sys.executable, "-m", "edgepeft", "export", "--format", "gguf", "--base", str(base), "--mode", "merged",
           "--quant", "q4_k_m", "--merge-into", "original", "--no-verify", "--quiet", "--out", str(out)]
    if adapter:
        cmd += ["--adapter", str(adapter)]
    r = timed(cmd, env=dict(os.environ, EDGEPEFT_CACHE=str(cache)))
    r["bytes"] = sum(f.stat().st_size for f in out.glob("*.gguf"))
    return r


def peer(merged: Path, out: Path) -> dict:
    from peers import peer_dir

    src = peer_dir()
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    f32 = out / "peer-f32.gguf"
    conv = timed([sys.executable, str(src / "convert_hf_to_gguf.py"), str(merged), "--outtype", "f32",
                  "--outfile", str(f32)], env=env)
    code = ("import sys, os, llama_cpp as l; p = l.llama_model_quantize_default_params(); "
            "p.ftype = l.LLAMA_FTYPE_MOSTLY_Q4_K_M; p.nthread = os.cpu_count(); "
            "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
    quant = timed([sys.executable, "-c", code, str(f32), str(out / "peer-q4_k_m.gguf")])
    f32.unlink()
    return {"seconds": round(conv["seconds"] + quant["seconds"], 2),
            "peak_rss_mb": max(conv["peak_rss_mb"], quant["peak_rss_mb"]),
            "convert": conv, "quantize": quant, "bytes": (out / "peer-q4_k_m.gguf").stat().st_size}


_PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[3])
"""


def peer_with_merge(base: Path, adapter: Path, out: Path) -> dict:
    """What a llama.cpp user does with an adapter: PEFT merge_and_unload + save, then convert + quantize."""
    merged = out / "peft-merged"
    m = timed([sys.executable, "-c", _PEFT_MERGE, str(base), str(adapter), str(merged)])
    r = peer(merged, out)
    return {"seconds": round(m["seconds"] + r["seconds"], 2), "peak_rss_mb": max(m["peak_rss_mb"], r["peak_rss_mb"]),
            "merge": m, "convert": r["convert"], "quantize": r["quantize"], "bytes": r["bytes"]}


def speed(base, plans, adapter: Path | None, work: Path, reps: int) -> dict:
    from edgepeft.export.merge import merge_into_folder

    merged = merge_into_folder(base, plans, work / "merged", target="original")
    runs = {"edgepeft": [], "llama.cpp": [], "edgepeft_warm": [], "edgepeft_with_merge": [],
            "peft_merge_then_llama.cpp": []}
    for i in range(reps):  # alternate so machine load hits both sides alike
        cache = Path(tempfile.mkdtemp(dir=work))  # empty: the headline run is cold
        for side in (("edgepeft", "llama.cpp") if i % 2 == 0 else ("llama.cpp", "edgepeft")):
            out = Path(tempfile.mkdtemp(dir=work))
            runs[side].append(ours(merged, out, cache) if side == "edgepeft" else peer(merged, out))
        runs["edgepeft_warm"].append(ours(merged, Path(tempfile.mkdtemp(dir=work)), cache))
        if adapter:
            runs["edgepeft_with_merge"].append(ours(base.path, Path(tempfile.mkdtemp(dir=work)),
                                                    Path(tempfile.mkdtemp(dir=work)), adapter))
            runs["peft_merge_then_llama.cpp"].append(peer_with_merge(base.path, adapter,
                                                                     Path(tempfile.mkdtemp(dir=work))))
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items() if v}
    e, w, p = best["edgepeft"], best["edgepeft_warm"], best["llama.cpp"]
    return {"input": "smollm2-135m merged (fp32 HF folder)", "quant": "q4_k_m", "reps": reps, "runs": runs,
            "best": best, "time_ratio_edgepeft_over_llamacpp": round(e["seconds"] / p["seconds"], 3),
            "rss_ratio_edgepeft_over_llamacpp": round(e["peak_rss_mb"] / p["peak_rss_mb"], 3),
            "time_ratio_warm_over_llamacpp": round(w["seconds"] / p["seconds"], 3),
            "rss_ratio_warm_over_llamacpp": round(w["peak_rss_mb"] / p["peak_rss_mb"], 3),
            **({"time_ratio_with_merge": round(best["edgepeft_with_merge"]["seconds"]
                                               / best["peft_merge_then_llama.cpp"]["seconds"], 3),
                "rss_ratio_with_merge": round(best["edgepeft_with_merge"]["peak_rss_mb"]
                                              / best["peft_merge_then_llama.cpp"]["peak_rss_mb"], 3)} if adapter else {})}


def open_llama(model: Path, lora: Path | None = None):
    """llama-cpp-python's high-level ``Llama`` (logits of every position), under the runtime's AMX rule:
    weight repacking stays off on an AMX build, which segfaults in ``llama_decode`` with it on
    (runtimes/llamacpp.py ``amx_build``). ``Llama`` takes no such option, so its default params are wrapped."""
    import llama_cpp
    import llama_cpp.llama_cpp as C

    from edgepeft.runtimes.llamacpp import amx_build

    defaults = C.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = not amx_build(C)
        return p

    C.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(model), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                               n_threads=2, lora_path=str(lora) if lora else None)
    finally:
        C.llama_model_default_params = defaults


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def perplexity(llm, ids: list[int], window: int = 256) -> float:
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s:s + window]
        if len(chunk) < 2:
            break
        lg = llama_logits(llm, chunk)[:-1].astype(np.float64)
        m = lg.max(-1, keepdims=True)
        logp = lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        n += len(chunk) - 1
    return float(np.exp(nll / n))


def accuracy(llm, tok, examples, max_tokens: int) -> float:
    from edgepeft.evaluate import exact_match

    def generate(text: str) -> str:
        llm.reset()
        out = llm.create_completion(text, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                    stop=["<|im_end|>", "<|endoftext|>"])
        return out["choices"][0]["text"]

    return exact_match(generate, examples, tokenizer=tok)


def quality(base, adapter: Path | None, work: Path, quants, n_eval: int, wiki_tokens: int) -> list[dict]:
    from edgepeft.export.gguf import export
    from edgepeft.export.request import ExportRequest
    from edgepeft.train.tasks import get_task

    tok = base.load_tokenizer()
    ids = tok(WIKI.read_text(), add_special_tokens=False)["input_ids"][:wiki_tokens]
    task = get_task("demo")
    examples = task.examples("eval")[:n_eval]
    rows = []
    for q in quants:
        for mode in (("merged", "separate") if adapter else ("merged",)):
            out = Path(tempfile.mkdtemp(dir=work))
            t0 = time.perf_counter()
            rec = export(ExportRequest(format="gguf", base=str(base.path), adapters=[adapter] if adapter else [],
                                       out=out, mode=mode, quant=q, merge_into="original", verify=False,
                                       adapter_type="f16"))
            secs = time.perf_counter() - t0
            model = Path(rec["files"][0])
            lora = Path(rec["files"][1]) if mode == "separate" and adapter else None
            llm = open_llama(model, lora)
            row = {"quant": q, "mode": mode, "export_seconds": round(secs, 1),
                   "bytes": sum(Path(f).stat().st_size for f in rec["files"]),
                   "perplexity": round(perplexity(llm, ids), 3)}
            if adapter:
                row["demo_exact_match"] = round(accuracy(llm, tok, examples, task.max_new_tokens), 3)
            llm.close()
            rows.append(row)
            print(json.dumps(row), flush=True)
            for f in out.iterdir():
                f.unlink()
    return rows


def markdown(result: dict) -> str:
    """The tables docs/gguf.md shows, rendered from the results JSON."""
    lines = []
    sp = result.get("speed")
    if sp:
        e, p = sp["best"]["edgepeft"], sp["best"]["llama.cpp"]
        lines += [(f"Speed, {sp['input']} → {sp['quant']} ({sp['machine']['cpus']} shared CPUs, load average "
                  f"{sp['machine']['load_avg_at_start'][0]:.1f} at start; best of {sp['reps']}):"), "",
                  "| pipeline | seconds | peak RSS (MiB) | bytes |", "|---|---|---|---|",
                  (f"| edgepeft export --mode merged --quant q4_k_m, first export of this base | {e['seconds']} | "
                   f"{e['peak_rss_mb']} | {e['bytes']} |")]
        if sp["best"].get("edgepeft_warm"):
            w = sp["best"]["edgepeft_warm"]
            lines.append(f"| the same, tokenizer cached by an earlier export | {w['seconds']} | {w['peak_rss_mb']} | "
                         f"{w['bytes']} |")
        lines.append(f"| llama.cpp: convert_hf_to_gguf.py (f32) + llama_model_quantize | {p['seconds']} | "
                     f"{p['peak_rss_mb']} | {p['bytes']} |")
        if sp["best"].get("edgepeft_with_merge"):
            w = sp["best"]["edgepeft_with_merge"]
            lines.append(f"| edgepeft, base + adapter (merge included) | {w['seconds']} | {w['peak_rss_mb']} | "
                         f"{w['bytes']} |")
        if sp["best"].get("peft_merge_then_llama.cpp"):
            w = sp["best"]["peft_merge_then_llama.cpp"]
            lines.append(f"| PEFT merge_and_unload + save, then llama.cpp's convert + quantize | {w['seconds']} | "
                         f"{w['peak_rss_mb']} | {w['bytes']} |")
        lines += ["", (f"Ratio edgepeft / llama.cpp, first export: time {sp['time_ratio_edgepeft_over_llamacpp']}, "
                  f"peak RSS {sp['rss_ratio_edgepeft_over_llamacpp']}"
                  + (f"; tokenizer cached: time {sp['time_ratio_warm_over_llamacpp']}, "
                     f"peak RSS {sp['rss_ratio_warm_over_llamacpp']}." if "time_ratio_warm_over_llamacpp" in sp
                     else ".")
                  + (f" Base + adapter against PEFT merge then llama.cpp: time {sp['time_ratio_with_merge']}, "
                     f"peak RSS {sp['rss_ratio_with_merge']}." if "time_ratio_with_merge" in sp else "")), ""]
    q = result.get("quality")
    if q:
        lines += [(f"Quality (adapter: {q.get('adapter') or 'none, base only'}; perplexity on "
                  f"{q['wikitext_tokens']} wikitext-2 tokens, demo exact match on {q['demo_examples']} eval examples):"),
                  "", "| quant | mode | bytes | perplexity | demo exact match |", "|---|---|---|---|---|"]
        for r in q["rows"]:
            lines.append(f"| {r['quant']} | {r['mode']} | {r['bytes']:,} | {r['perplexity']} | "
                         f"{r.get('demo_exact_match', '–')} |")
    return "\n".join(lines) + "\n"


def update_docs(result: dict) -> None:
    doc = ROOT / "docs" / "gguf.md"
    text = doc.read_text()
    start, end = "<!-- bench_gguf:start -->", "<!-- bench_gguf:end -->"
    if start in text:
        text = text[:text.index(start)] + start + "\n" + markdown(result) + text[text.index(end):]
        doc.write_text(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default="/work/runs/demo/adapter")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer quants/examples (smoke run)")
    ap.add_argument("--quants", default=",".join(QUANTS))
    ap.add_argument("--n-eval", type=int, default=50, help="demo eval examples per row")
    ap.add_argument("--wiki-tokens", type=int, default=8192)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()

    from edgepeft.export.adapter import load_adapters
    from edgepeft.models import resolve_base

    base = resolve_base("smollm2-135m")
    adapter = Path(args.adapter) if Path(args.adapter, "adapter_config.json").is_file() else None
    plans = load_adapters([adapter], base) if adapter else []
    result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        work = Path(tmp)
        if not args.skip_speed:
            result["speed"] = {"machine": machine, "adapter": str(adapter) if adapter else None,
                               **speed(base, plans, adapter, work, args.reps)}
            print(json.dumps(result["speed"]["best"], indent=1), flush=True)
        if not args.skip_quality:
            quants = ("f16", "q8_0", "q4_k_m") if args.quick else tuple(args.quants.split(","))
            n_eval, wiki = (10, 2048) if args.quick else (args.n_eval, args.wiki_tokens)
            result["quality"] = {"machine": machine, "adapter": str(adapter) if adapter else None,
                                 "wikitext_tokens": wiki, "demo_examples": n_eval,
                                 "rows": quality(base, adapter, work, quants, n_eval, wiki)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if RESULTS.is_file():  # re-read: a speed run and a quality run may have been started side by side
        result = {**json.loads(RESULTS.read_text()), **{k: v for k, v in result.items() if k in ("speed", "quality")
                                                        or k not in json.loads(RESULTS.read_text())}}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    update_docs(result)
    print(f"wrote {RESULTS}")
    from plots import plot_gguf  # benchmarks/plots.py: the README's picture of these numbers

    print(f"wrote {plot_gguf(result)}")


if __name__ == "__main__":
    main()
