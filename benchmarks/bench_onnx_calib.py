"""ONNX int4 with and without calibration (GPTQ on the adapter's own training data vs the builder's k-quant).

smollm2-135m with two adapters trained here (the quickstart's recipe: 48 QLoRA steps, rank 16):
- ``demo``: the bundled parcel-order task;
- ``chat``: a ``{"messages": ...}`` task generated below (system prompt, one worked turn, then the asked
  date in ISO 8601), 1500 train / 100 held-out conversations.

For each adapter, ONNX int4 merged and separate, each with ``--quant-algo k_quant_last`` (today's
default, no data) and ``gptq_last`` (calibrated on the run's training data by edgepeft.calib's selector;
separate: with the adapter active). Per artifact: exact match on the task's held-out examples (the
same ones PyTorch fp32 + the adapter is scored on, by edgepeft.evaluate.score_task: one rendering and
stopping rule), perplexity on /work/shared/data/wikitext2-valid.txt (text calibration never saw:
the run's training data calibrates), MB on disk and export seconds. Per mode, k-quant then GPTQ back to
back (``--modes`` splits merged and separate over two processes side by side); the load average is recorded
with every row.

    nice -n 10 python benchmarks/bench_onnx_calib.py [--work DIR] [--eval-n 100] [--ppl-tokens 2048]

Writes ``benchmarks/results/onnx_calib.json`` and prints the Markdown rows for the README's
task-aware quantization table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WIKITEXT = Path("/work/shared/data/wikitext2-valid.txt")
BASE = "smollm2-135m"

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SYSTEM = "Reply with the date in ISO 8601 (YYYY-MM-DD) and nothing else."
FORMS = ["{month} {d}, {y}", "the {d}{sfx} of {month} {y}", "{d} {mon} {y}", "{mon}. {d} {y}", "{d}/{m}/{y} (day first)"]


def _date(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1950, 2035), rng.randint(1, 12), rng.randint(1, 28)
    sfx = "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    text = rng.choice(FORMS).format(month=MONTHS[m - 1], mon=MONTHS[m - 1][:3], d=d, y=y, m=m, sfx=sfx)
    return text, f"{y:04d}-{m:02d}-{d:02d}"


def chat_splits(n_train: int = 1500, n_eval: int = 100, seed: int = 7) -> dict[str, list[dict]]:
    """Deterministic chat-format conversations; the asked dates of eval never appear in train."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n_train + n_eval:
        (q1, a1), (q2, a2) = _date(rng), _date(rng)
        if a2 in seen:
            continue
        seen.add(a2)
        rows.append({"messages": [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": f"Date: {q1}"}, {"role": "assistant", "content": a1},
                                  {"role": "user", "content": f"Date: {q2}"}, {"role": "assistant", "content": a2}]})
    return {"eval": rows[:n_eval], "train": rows[n_eval:]}


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_adapter(name: str, data: str, work: Path) -> Path:
    """The quickstart's QLoRA recipe; a finished run is reused."""
    from edgepeft.quickstart import FULL
    from edgepeft.train.config import TrainConfig
    from edgepeft.train.run import train

    run = work / "runs" / name
    if (run / "adapter" / "adapter_model.safetensors").is_file():
        return run
    shutil.rmtree(run, ignore_errors=True)
    p = FULL
    cfg = TrainConfig(out=str(run), base=BASE, data=data, bits=4, rank=p.rank, alpha=2.0 * p.rank,
                      max_steps=p.train_steps, batch_size=p.batch_size, lr=p.lr, max_seq_len=128, warmup_ratio=0.05,
                      logging_steps=8, save_steps=p.train_steps, save_total_limit=1)
    t = time.perf_counter()
    train(cfg, say=print, bar=False, log_lines=True)
    print(f"trained {name} in {time.perf_counter() - t:.0f} s", flush=True)
    return run


# ----------------------------------------------------------------------------- measuring
def ppl_and_acc(rt, template, task: str, args) -> dict:
    """Perplexity on the held-out wikitext-2 text and exact match on the task, on any runtime."""
    from edgepeft import evaluate
    from edgepeft.calib import token_nll
    from edgepeft.train.tasks import get_task

    t = get_task(task)
    gen = evaluate.runtime_generate_batch(rt, t.max_new_tokens, evaluate.stop_markers(template))
    acc = evaluate.score_task(t, gen, template, limit=args.eval_n)
    return {"perplexity": _ppl(rt, token_nll, args), "accuracy": acc["accuracy"], "correct": acc["correct"],
            "total": acc["total"]}


def _ppl(rt, token_nll, args) -> float:
    text = WIKITEXT.read_text()
    if args.ppl_offset:  # from the first line start at or after the offset
        text = text[text.index("\n", args.ppl_offset) + 1:]
    toks = rt.tokenize(text[: args.ppl_tokens * 8])[: args.ppl_tokens + 1]
    nll, n = 0.0, 0
    for s in range(0, len(toks) - 1, 256):
        chunk = toks[s: s + 257]
        if len(chunk) < 2:
            break
        rt.reset()
        rt.prefill(chunk[:-1], all_logits=True)
        nll += float(token_nll(rt.logits(), chunk[1:]).sum())
        n += len(chunk) - 1
    return round(math.exp(nll / n), 4)


def pytorch_row(name: str, run: Path, task: str, args) -> dict:
    from edgepeft.bench import BenchConfig
    from edgepeft.bench.measure import reference_accuracy
    from edgepeft.bench.reference import TorchReference
    from edgepeft.calib import token_nll

    rt = TorchReference(BASE, {name: str(run)})
    rt.set_adapter(name)
    cfg = BenchConfig(task=task, task_limit=args.eval_n, ppl_file=None)
    acc = reference_accuracy(rt, cfg)
    row = {"adapter": name, "format": "pytorch", "mode": "peft", "quant": "fp32", "algo": None,
           "perplexity": _ppl(rt, token_nll, args), "accuracy": acc["accuracy"], "correct": acc["correct"],
           "total": acc["total"], "loadavg": os.getloadavg()}
    rt.close()
    print(json.dumps(row), flush=True)
    return row


def onnx_row(name: str, run: Path, task: str, mode: str, algo: str, work: Path, args) -> dict:
    from edgepeft import calib
    from edgepeft.bench.artifacts import task_template
    from edgepeft.export.onnx import export
    from edgepeft.export.request import ExportRequest
    from edgepeft.runtimes.base import Artifact, get_runtime

    out = work / "onnx" / f"{name}-{mode}-{algo}"
    shutil.rmtree(out, ignore_errors=True)
    load0 = os.getloadavg()
    # "<algo>:task-only": GPTQ's Hessians on the task's data alone, without calib.with_generic_text's chunks;
    # "<algo>:acc1": --accuracy-level 1 (fp32 activations in MatMulNBits; the default 4 quantizes them to int8)
    # "gptq_mixed:mods=A+B[:all]": int8 for those builder modules instead of MORE_BITS_MODULES (":all": every layer)
    algo_name, _, variant = algo.partition(":")
    chunks = calib.GPTQ_TEXT_CHUNKS
    calib.GPTQ_TEXT_CHUNKS = 0 if variant == "task-only" else chunks
    from edgepeft.export import onnx_calib

    mods, rule = onnx_calib.MORE_BITS_MODULES, onnx_calib.use_more_bits
    if variant.startswith("mods="):
        onnx_calib.MORE_BITS_MODULES = tuple(variant.split(":")[0][5:].split("+"))
        if variant.endswith(":all"):
            onnx_calib.use_more_bits = lambda layer, layers: True
    req = ExportRequest(format="onnx", base=BASE, adapters=[run], names=[name], out=out, mode=mode, quant="int4",
                        quant_algo=algo_name, merge_into="original", verify=args.verify,
                        **({"accuracy_level": 1} if variant == "acc1" else {}))
    t = time.perf_counter()
    try:
        rec = export(req).record
    finally:
        calib.GPTQ_TEXT_CHUNKS = chunks
        onnx_calib.MORE_BITS_MODULES, onnx_calib.use_more_bits = mods, rule
    seconds = time.perf_counter() - t
    ad = {name: out / "adapters" / f"{name}.onnx_adapter"} if mode == "separate" else {}
    art = Artifact(out, "onnx-genai", out, ad, "int4")
    rt = get_runtime("onnxruntime-genai")
    rt.load(art, None, n_ctx=320)
    rt.set_adapter(name if ad else None)
    m = ppl_and_acc(rt, task_template(art), task, args)
    rt.close()
    ver = rec.get("verification") or (rec.get("verifications") or [None, None])[-1]
    row = {"adapter": name, "format": "onnx", "mode": mode, "quant": "int4", "algo": algo, **m,
           "bytes": rec["bytes"], "export_s": round(seconds, 1), "calibration": rec.get("calibration"),
           "gptq": rec.get("gptq"), "top1_agreement": _check(ver, "top1_agreement"),
           "verify_ppl_ratio": _check(ver, "ppl_ratio"), "loadavg": [load0, os.getloadavg()]}
    print(json.dumps(row), flush=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def _check(ver, metric):
    for c in (ver or {}).get("checks", []):
        if c.get("metric") == metric:
            return c.get("value")
    return None


def markdown(rows: list[dict]) -> str:
    ref = {r["adapter"]: r for r in rows if r["format"] == "pytorch"}
    out = []
    for r in rows:
        p = ref[r["adapter"]]
        if r["format"] == "pytorch":
            out.append(f"| {r['adapter']} | PyTorch fp32 + adapter | – | {r['accuracy']:.0%} ({r['correct']}/{r['total']}) "
                       f"| {r['perplexity']:.2f} | – | – |")
            continue
        calib = {"gptq_last": "GPTQ: run data + wikitext chunks", "gptq_last:task-only": "GPTQ: run data only",
                 "gptq_last:acc1": "GPTQ, fp32 activations",
                 "gptq_mixed": "GPTQ + Q4_K_M's int8 layers", "source_grid": "none (source_grid)"}.get(
                     r["algo"], f"GPTQ, int8 {r['algo'][16:]}" if r["algo"].startswith("gptq_mixed:mods=")
                     else f"none ({r['algo']})")
        out.append(f"| {r['adapter']} | ONNX int4 {r['mode']} | {calib} | {r['accuracy']:.0%} ({r['correct']}/{r['total']}, "
                   f"{100 * (r['accuracy'] - p['accuracy']):+.0f} pt) | {r['perplexity']:.2f} "
                   f"({100 * (r['perplexity'] / p['perplexity'] - 1):+.1f} %) | {r['bytes'] / 1e6:.1f} | "
                   f"{r['export_s']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgepeft-bench-onnx-calib"))
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--ppl-offset", type=int, default=0,
                    help="score perplexity from this character of the file on (200000: past the bundled slice, "
                         "which GPTQ's generic text chunks come from)")
    ap.add_argument("--adapters", default="demo,chat")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                    help="use this finished training run for adapter NAME (copied into --work) instead of training")
    ap.add_argument("--modes", default="merged,separate")
    ap.add_argument("--algos", default="k_quant_last,gptq_last")
    ap.add_argument("--no-pytorch", action="store_true", help="skip the PyTorch row (another process measures it)")
    ap.add_argument("--verify", action="store_true", help="run the export verifier too (its seconds count in export_s)")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, help="only merge these result files into --out")
    ap.add_argument("--out", type=Path, default=RESULTS / "onnx_calib.json")
    args = ap.parse_args()
    if args.merge:
        rows = [r for f in args.merge for r in json.loads(f.read_text())["rows"]]
        _write(rows, args, json.loads(args.merge[0].read_text()))
        print(markdown(rows))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    for spec in args.run:
        name, _, src = spec.partition("=")
        if not (args.work / "runs" / name / "adapter").is_dir():
            shutil.copytree(src, args.work / "runs" / name)
    chat = chat_splits()
    chat_train = write_jsonl(chat["train"], args.work / "chat-train.jsonl")
    chat_eval = write_jsonl(chat["eval"], args.work / "chat-eval.jsonl")
    tasks = {"demo": ("demo", "demo"), "chat": (str(chat_train), str(chat_eval))}
    wanted = args.adapters.split(",")
    runs = {n: train_adapter(n, tasks[n][0], args.work) for n in wanted}
    if args.train_only:
        return
    rows = []
    for n in wanted:
        task = tasks[n][1]
        if not args.no_pytorch:
            rows.append(pytorch_row(n, runs[n], task, args))
        for mode in args.modes.split(","):
            for algo in args.algos.split(","):  # A B per mode: k-quant and GPTQ side by side
                rows.append(onnx_row(n, runs[n], task, mode, algo, args.work, args))
        _write(rows, args)
    print(markdown(json.loads(args.out.read_text())["rows"]) if not args.no_pytorch else "")


def _write(rows: list[dict], args, like: dict | None = None) -> None:
    from edgepeft import atomic

    doc = like or {"benchmark": "bench_onnx_calib", "base": BASE, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "omp_threads": os.environ.get("OMP_NUM_THREADS")},
           "eval_n": args.eval_n, "ppl_file": str(WIKITEXT), "ppl_tokens": args.ppl_tokens,
           "ppl_offset_chars": args.ppl_offset,
           "recipe": "quickstart FULL: 48 QLoRA steps, rank 16, lr 1e-3, batch 4", "rows": rows}
    doc["rows"] = rows
    if not like and args.out.is_file():  # rows of the adapters this run did not measure are kept (one file, run per adapter)
        done = {r["adapter"] for r in rows}
        doc["rows"] = [r for r in json.loads(args.out.read_text()).get("rows", []) if r["adapter"] not in done] + rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.out, doc)


if __name__ == "__main__":
    main()
