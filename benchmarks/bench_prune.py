"""Pruning and merge-target benchmark on the smollm2-135m demo adapter.

    python benchmarks/bench_prune.py --adapter /work/runs/demo/adapter

Part 1 (prune sweep, PyTorch fp32, adapter merged into the original base): for each
``--prune`` level, adapter bytes (f16, as both writers store it) vs demo-task exact-match
accuracy vs perplexity on the bundled wikitext-2 slice, plus the base alone.

Part 2 (merge targets): the unpruned adapter merged into the ``dequantized`` (NF4 round
trip) and the ``original`` base, each in PyTorch fp32 and then exported with
``edgepeft.export.gguf`` to Q4_K_M and Q8_0 and run in llama.cpp (accuracy, perplexity,
and the held-out calibration loss that ``--merge-into auto`` uses to choose).

Writes benchmarks/results/prune.json and prune.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
LEVELS = ["none", "energy=0.99", "energy=0.95", "energy=0.9", "energy=0.8", "energy=0.6", "rank=4", "rank=2",
          "rank=1", "energy=0.9,drop=1e-3"]
PPL_WINDOW = 512


def wikitext_ids(tok, n_tokens: int) -> list[int]:
    from edgepeft.bench import DEFAULT_TEXT

    return tok(DEFAULT_TEXT.read_text(), add_special_tokens=False)["input_ids"][:n_tokens]


def ppl_from_nll(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count)


# --- PyTorch ------------------------------------------------------------------------------------

def torch_ppl(model, ids: list[int]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, PPL_WINDOW):
            x = torch.tensor([ids[i:i + PPL_WINDOW]])
            if x.shape[1] < 2:
                break
            logits = model(input_ids=x).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += x.shape[1] - 1
    return ppl_from_nll(total, count)


def torch_accuracy(model, tok, examples, max_new: int) -> float | None:
    from edgepeft.evaluate import exact_match_detail, hf_generate_batch

    if not examples:  # --limit 0: no generation (an untrained adapter scores 0 anyway)
        return None
    return exact_match_detail(hf_generate_batch(model, tok, max_new, batch_size=16), examples, tok).accuracy


# --- llama.cpp ----------------------------------------------------------------------------------

class LlamaEval:
    """Greedy generation, perplexity and completion loss in llama.cpp on HF-tokenized ids."""

    def __init__(self, path: Path, tok, threads: int, n_ctx: int = 640):
        from edgepeft.runtimes.base import Artifact
        from edgepeft.runtimes.llamacpp import LlamaCppRuntime

        self.rt = LlamaCppRuntime()
        device = SimpleNamespace(runtimes={"llama.cpp": SimpleNamespace(options={"n_threads": threads})})
        self.rt.load(Artifact(path=path, format="gguf", model=path), device, n_ctx=n_ctx)
        self.tok = tok
        self.stops = {tok.eos_token_id} | {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>",)
                                           if t in tok.get_vocab()}

    def generate(self, text: str, max_new: int) -> str:
        self.rt.reset()
        self.rt.prefill(self.tok(text, add_special_tokens=False)["input_ids"])
        out = []
        for _ in range(max_new):
            t = self.rt.decode(1)[0]  # feeds (and returns) the greedy argmax
            if t in self.stops:
                break
            out.append(t)
        return self.tok.decode(out, skip_special_tokens=True)

    def nll(self, ids: list[int], first: int = 1) -> tuple[float, int]:
        """Sum of NLL of ids[first:] given the prefix, and the count."""
        self.rt.reset()
        self.rt.prefill(ids, all_logits=True)
        logits = self.rt.logits()[:-1].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll = -logp[np.arange(len(ids) - 1), ids[1:]][first - 1:]
        return float(nll.sum()), int(nll.size)

    def ppl(self, ids: list[int]) -> float:
        total = count = 0
        for i in range(0, len(ids) - 1, PPL_WINDOW):
            chunk = ids[i:i + PPL_WINDOW]
            if len(chunk) < 2:
                break
            s, n = self.nll(chunk)
            total, count = total + s, count + n
        return ppl_from_nll(total, count)

    def accuracy(self, examples, max_new: int) -> float | None:
        from edgepeft.evaluate import eval_prompts, score

        if not examples:
            return None
        preds = [self.generate(p, max_new) for p in eval_prompts(examples, self.tok)]
        return score(preds, examples).accuracy

    def calib_loss(self, pairs) -> float:
        total = count = 0
        for prompt, completion in pairs:
            p = self.tok(prompt, add_special_tokens=False)["input_ids"]
            c = self.tok(completion, add_special_tokens=False)["input_ids"]
            s, n = self.nll(p + c, first=len(p))
            total, count = total + s, count + n
        return total / count

    def close(self):
        self.rt.close()


# --- the two parts ------------------------------------------------------------------------------

def load_merged(model, sd: dict) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied lm_head


def prune_sweep(base, plan, model, tok, examples, max_new, ppl_ids, levels, pairs, rows: list, save) -> list[dict]:
    from edgepeft.calib import completion_nll, torch_logits
    from edgepeft.export.merge import merged_state_dict
    from edgepeft.export.prune import prune

    original = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    model.load_state_dict(original)
    rows.append({"level": "base (no adapter)", "adapter_bytes": 0, "ranks": [], "modules": 0,
                 "accuracy": torch_accuracy(model, tok, examples, max_new), "ppl": torch_ppl(model, ppl_ids),
                 "demo_loss": completion_nll(torch_logits(model), tok, pairs)})
    print(rows[-1], f"{time.perf_counter() - t0:.0f}s", flush=True)
    save()
    for level in levels:
        t0 = time.perf_counter()
        p = plan if level == "none" else prune(plan, level, base)
        load_merged(model, merged_state_dict(base, [p], "original"))
        rep = p.prune_report or {}
        rows.append({"level": level, "adapter_bytes": p.nbytes(2), "modules": len(p.modules),
                     "ranks": sorted(set(p.ranks.values())), "mean_rank": float(np.mean(list(p.ranks.values()))),
                     "total_rel_error": rep.get("total_rel_error", 0.0), "max_rel_error": rep.get("max_rel_error", 0.0),
                     "accuracy": torch_accuracy(model, tok, examples, max_new), "ppl": torch_ppl(model, ppl_ids),
                     "demo_loss": completion_nll(torch_logits(model), tok, pairs)})
        print(rows[-1], f"{time.perf_counter() - t0:.0f}s", flush=True)
        save()
    model.load_state_dict(original)
    return rows


def merge_targets(base, plan, adapter: Path, tok, examples, max_new, ppl_ids, pairs, quants, work: Path,
                  skip_gguf: bool, rows: list, save) -> list[dict]:
    from edgepeft.calib import completion_nll, torch_logits
    from edgepeft.export.merge import merged_state_dict

    model = base.load_model(torch.float32).eval()
    for target in ("dequantized", "original"):
        t0 = time.perf_counter()
        load_merged(model, merged_state_dict(base, [plan], target))
        rows.append({"target": target, "format": "pytorch-fp32", "file_bytes": None,
                     "accuracy": torch_accuracy(model, tok, examples, max_new), "ppl": torch_ppl(model, ppl_ids),
                     "calib_loss": completion_nll(torch_logits(model), tok, pairs)})
        print(rows[-1], f"{time.perf_counter() - t0:.0f}s", flush=True)
        save()
    del model
    if skip_gguf:
        return rows
    from edgepeft.export.gguf import export
    from edgepeft.export.request import ExportRequest

    for target in ("dequantized", "original"):
        for quant in quants:
            t0 = time.perf_counter()
            out = work / f"{target}-{quant}"
            rec = export(ExportRequest(format="gguf", base=base.spec, adapters=[adapter], out=out, mode="merged",
                                       quant=quant, merge_into=target, verify=False))
            path = Path(rec["files"][0])
            ev = LlamaEval(path, tok, torch.get_num_threads())
            try:
                rows.append({"target": target, "format": f"gguf-{quant}", "file_bytes": path.stat().st_size,
                             "accuracy": ev.accuracy(examples, max_new), "ppl": ev.ppl(ppl_ids),
                             "calib_loss": ev.calib_loss(pairs)})
            finally:
                ev.close()
                shutil.rmtree(out, ignore_errors=True)
            print(rows[-1], f"{time.perf_counter() - t0:.0f}s", flush=True)
            save()
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    task_key = "accuracy" if any(r.get("accuracy") is not None for r in result["prune"]) else "demo_loss"
    task_label = "demo exact-match accuracy" if task_key == "accuracy" else "demo completion loss (nats/token)"
    merge_key = "accuracy" if any(r.get("accuracy") is not None for r in result["merge"]) else "calib_loss"
    merge_label = "demo exact-match accuracy" if merge_key == "accuracy" else "demo completion loss (nats/token)"
    sweep = [r for r in result["prune"] if r["adapter_bytes"] > 0]
    base_row = next(r for r in result["prune"] if r["adapter_bytes"] == 0)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    x = [r["adapter_bytes"] / 1e6 for r in sweep]
    for ax, key, label in ((axes[0], task_key, task_label), (axes[1], "ppl", "wikitext-2 perplexity")):
        ax.plot(x, [r[key] for r in sweep], "o", color="C0")
        for r, xi in zip(sweep, x):
            ax.annotate(r["level"], (xi, r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(base_row[key], color="gray", ls="--", lw=1, label="base, no adapter")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("adapter size (MB, f16)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"prune level: adapter bytes vs {task_key} (PyTorch fp32)")
    axes[1].set_title("prune level: adapter bytes vs perplexity")
    merge = result["merge"]
    formats = list(dict.fromkeys(r["format"] for r in merge))
    w = 0.38
    for j, target in enumerate(("dequantized", "original")):
        vals = [next((r[merge_key] for r in merge if r["format"] == f and r["target"] == target), np.nan)
                for f in formats]
        bars = axes[2].bar(np.arange(len(formats)) + (j - 0.5) * w, vals, w, label=f"merge into {target}")
        for b_, r in zip(bars, [next((r for r in merge if r["format"] == f and r["target"] == target), None)
                                for f in formats]):
            if r:
                axes[2].annotate(f"{r[merge_key]:.3f}\nppl {r['ppl']:.1f}", (b_.get_x() + b_.get_width() / 2, b_.get_height()),
                                 ha="center", fontsize=7, xytext=(0, 2), textcoords="offset points")
    axes[2].set_xticks(np.arange(len(formats)), formats)
    axes[2].set_ylabel(merge_label)
    axes[2].set_title("merge target, then quantization")
    axes[2].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{result['base']} + {result['adapter_name']}: {result['eval_examples']} demo eval examples, "
                 f"{result['ppl_tokens']} wikitext tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def combine(parts: list[Path], out: Path) -> None:
    from edgepeft import atomic

    result: dict = {}
    for p in parts:
        data = json.loads(p.read_text())
        for key, value in data.items():
            if isinstance(value, list) and result.get(key):
                result[key] = result[key] + value
            elif value or key not in result:
                result[key] = value
    atomic.write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"wrote": str(out)}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", default="/work/runs/demo/adapter")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=50, help="demo eval examples")
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--levels", default=";".join(LEVELS), help="';'-separated --prune levels ('none' = unpruned)")
    ap.add_argument("--quants", default="q4_k_m,q8_0")
    ap.add_argument("--skip-gguf", action="store_true")
    ap.add_argument("--part", choices=("all", "sweep", "merge"), default="all",
                    help="run one part (two processes get more of a shared CPU); then --combine")
    ap.add_argument("--combine", nargs="+", type=Path, help="merge part JSONs into --out and plot")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/llama.cpp threads; 1 is several times faster on a shared, oversubscribed CPU")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "prune.json")
    args = ap.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)

    from edgepeft import atomic
    from edgepeft.calib import demo_calibration
    from edgepeft.export.adapter import load_adapter
    from edgepeft.models import resolve_base
    from edgepeft.train.tasks import get_task

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base = resolve_base(args.base)
    plan = load_adapter(args.adapter, base)
    tok = base.load_tokenizer()
    task = get_task("demo")
    examples = task.examples("eval")[:args.limit]
    ppl_ids = wikitext_ids(tok, args.ppl_tokens)
    pairs = demo_calibration(tok)
    result = {
        "benchmark": "prune", "base": args.base, "base_fingerprint": base.fingerprint, "adapter": str(plan.source),
        "adapter_name": plan.name, "adapter_sha256": plan.adapter_sha256, "eval_examples": len(examples),
        "ppl_tokens": len(ppl_ids), "ppl_window": PPL_WINDOW, "calib_pairs": len(pairs),
        "calib_note": "calibration = first 24 demo eval examples (what --merge-into auto scores by default)",
        "adapter_bytes_note": "A+B elements x 2 bytes (f16, as the GGUF/ONNX writers store adapters)",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                    "note": "shared 2-core CPU, heavily oversubscribed: no timings are reported"},
        "prune": [], "merge": [],
    }

    def save():
        atomic.write_json(args.out, result)
        if result["prune"] and result["merge"]:
            plot(result, args.out.with_suffix(".png"))

    if args.part in ("all", "sweep"):
        model = base.load_model(torch.float32).eval()
        prune_sweep(base, plan, model, tok, examples, task.max_new_tokens, ppl_ids, args.levels.split(";"), pairs,
                    result["prune"], save)
        del model
    if args.part == "sweep":
        save()
        return
    work = Path(tempfile.mkdtemp(prefix="bench-prune-", dir=args.out.parent))
    try:
        merge_targets(base, plan, Path(args.adapter), tok, examples, task.max_new_tokens, ppl_ids, pairs,
                      args.quants.split(","), work, args.skip_gguf, result["merge"], save)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save()
    print(json.dumps({"wrote": str(args.out)}))


if __name__ == "__main__":
    main()
