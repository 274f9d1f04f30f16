"""ONNX exports of smollm2-135m + the demo adapter: int4/int8/fp32 x merged/separate.

Per artifact: build time, bytes on disk, decode tok/s (onnxruntime-genai, greedy, one stream,
after a warm-up), perplexity on the bundled WikiText-2 slice (ORT logits, adapter active) and
demo-task exact-match accuracy (onnxruntime-genai greedy). The PyTorch fp32 reference row
(PEFT, same prompts, same metric) comes from the same run; GGUF rows are copied side by side
from ``benchmarks/results/gguf.json`` when the GGUF benchmark has written it.

    nice -n 10 python benchmarks/bench_onnx.py --adapter RUN_DIR/adapter [--eval-n 50]

Writes ``benchmarks/results/onnx.json`` and prints the Markdown table for docs/onnx.md.
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

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DEFAULT_ADAPTER = Path("/work/runs/demo/adapter")


def perplexity(lm, tok, adapter=None, max_tokens: int = 2048, window: int = 256) -> float:
    from importlib.resources import files

    text = (files("edgepeft") / "data" / "wikitext2-valid-slice.txt").read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    nll, n = 0.0, 0
    for i in range(0, len(ids) - 1, window):
        chunk = ids[i:i + window + 1]
        if len(chunk) < 2:
            break
        logits = lm(chunk[:-1], adapter)
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        n += len(chunk) - 1
    return math.exp(nll / n)


class Genai:
    """onnxruntime-genai greedy generation with an optional active adapter."""

    def __init__(self, folder: Path, adapter_file: Path | None):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))
        self.adapters = None
        if adapter_file is not None:
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter_file), "demo")

    def generate(self, ids: list[int], max_new: int, ignore_eos: bool = False) -> tuple[list[int], float, float]:
        """(new tokens, prefill seconds, decode seconds)."""
        og = self.og
        params = og.GeneratorParams(self.model)
        opts = {"max_length": len(ids) + max_new, "do_sample": False}
        if ignore_eos:
            opts["min_length"] = len(ids) + max_new
        params.set_search_options(**opts)
        gen = og.Generator(self.model, params)
        if self.adapters is not None:
            gen.set_active_adapter(self.adapters, "demo")
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        t1 = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        t2 = time.perf_counter()
        seq = list(gen.get_sequence(0))
        return seq[len(ids):], t1 - t0, t2 - t1


def decode_tok_s(g: Genai, tok, n_new: int = 64, reps: int = 3) -> float:
    ids = tok("The history of the city begins", add_special_tokens=False)["input_ids"]
    g.generate(ids, 8, ignore_eos=True)  # warm-up
    rates = []
    for _ in range(reps):
        new, _, dt = g.generate(ids, n_new, ignore_eos=True)
        rates.append((len(new) - 1) / dt)  # the first new token comes out of the prefill
    return float(np.median(rates))


def demo_accuracy(gen_fn, tok, n: int) -> dict:
    from edgepeft.evaluate import eval_prompts, score
    from edgepeft.train.tasks import get_task

    task = get_task("demo")
    examples = task.examples("eval")[:n]
    preds = [gen_fn(p, task.max_new_tokens) for p in eval_prompts(examples, tok)]
    return score(preds, examples).as_dict()


def bench_artifact(quant: str, mode: str, adapter: Path, work: Path, args) -> dict:
    from edgepeft.calib import runtime_logits
    from edgepeft.export.onnx import export
    from edgepeft.export.request import ExportRequest
    from edgepeft.models import resolve_base
    from edgepeft.runtimes.base import Artifact, get_runtime

    out = work / f"{mode}-{quant}"
    req = ExportRequest(format="onnx", base=args.base, adapters=[adapter], names=["demo"], out=out, mode=mode,
                        quant=quant, merge_into=args.merge_into)
    t0 = time.perf_counter()
    rec = export(req)
    build_s = time.perf_counter() - t0
    tok = resolve_base(args.base).load_tokenizer()
    ad_file = out / "adapters" / "demo.onnx_adapter" if mode == "separate" else None
    rt = get_runtime("onnxruntime")
    rt.load(Artifact(out, "onnx-genai", out, {"demo": ad_file} if ad_file else {}, quant), None, n_ctx=300)
    rt.set_adapter("demo" if ad_file else None)
    ppl = perplexity(lambda ids, a: runtime_logits(rt)(ids), tok, None, args.ppl_tokens)
    rt.close()
    g = Genai(out, ad_file)
    tps = decode_tok_s(g, tok)

    def gen_fn(text, max_new):
        return tok.decode(g.generate(tok(text, add_special_tokens=False)["input_ids"], max_new)[0],
                          skip_special_tokens=True)

    acc = demo_accuracy(gen_fn, tok, args.eval_n)
    row = {"format": "onnx", "mode": mode, "quant": quant, "runtime": "onnxruntime-genai (cpu)",
           "build_s": round(build_s, 1), "bytes": rec["bytes"],
           "adapter_bytes": (ad_file.stat().st_size if ad_file else None), "decode_tok_s": round(tps, 1),
           "perplexity": round(ppl, 3), "demo_accuracy": acc["accuracy"], "demo_n": acc["total"],
           "verification": rec.get("verification") or rec.get("verifications"),
           "merge": rec.get("merge")}
    print(json.dumps(row), flush=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def pytorch_row(adapter: Path, args) -> dict:
    import torch
    from peft import PeftModel

    from edgepeft.evaluate import hf_generate_batch
    from edgepeft.models import resolve_base

    base = resolve_base(args.base)
    tok = base.load_tokenizer()
    model = PeftModel.from_pretrained(base.load_model(torch.float32), adapter).eval()

    def logits(ids, _a):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()

    ppl = perplexity(logits, tok, None, args.ppl_tokens)
    run = hf_generate_batch(model, tok, 48, batch_size=16)
    from edgepeft.evaluate import eval_prompts, score
    from edgepeft.train.tasks import get_task

    examples = get_task("demo").examples("eval")[:args.eval_n]
    acc = score(run(eval_prompts(examples, tok)), examples).as_dict()
    return {"format": "pytorch", "mode": "peft", "quant": "fp32", "runtime": "transformers+peft (cpu)",
            "perplexity": round(ppl, 3), "demo_accuracy": acc["accuracy"], "demo_n": acc["total"]}


def table(rows: list[dict]) -> str:
    head = "| format | mode | quant | build s | MB on disk | adapter KB | decode tok/s | perplexity | demo acc |\n"
    head += "|---|---|---|---:|---:|---:|---:|---:|---:|\n"

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "–"

    lines = []
    for r in rows:
        mb = r["bytes"] / 1e6 if r.get("bytes") else None
        kb = r["adapter_bytes"] / 1e3 if r.get("adapter_bytes") else None
        lines.append(f"| {r['format']} | {r['mode']} | {r['quant']} | {f(r.get('build_s'), '.1f')} | {f(mb, '.1f')} | "
                     f"{f(kb, '.0f')} | {f(r.get('decode_tok_s'), '.1f')} | {f(r.get('perplexity'), '.2f')} | "
                     f"{f(r.get('demo_accuracy'), '.0%')} |")
    return head + "\n".join(lines)


def gguf_rows() -> list[dict]:
    path = RESULTS / "gguf.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    rows = data if isinstance(data, list) else data.get("rows") or []
    out = []
    speed = data.get("speed") if isinstance(data, dict) else None
    if speed and speed.get("best", {}).get("edgepeft"):  # the GGUF benchmark's build-speed record
        best = speed["best"]["edgepeft"]
        out.append({"format": "gguf", "mode": "merged", "quant": speed.get("quant", "?"), "build_s": best.get("seconds"),
                    "bytes": best.get("bytes"), "source": "benchmarks/results/gguf.json (speed)"})
    for r in rows:
        if not isinstance(r, dict):
            continue
        out.append({"format": "gguf", "mode": r.get("mode", "?"), "quant": r.get("quant", "?"),
                    "build_s": r.get("build_s"), "bytes": r.get("bytes"), "adapter_bytes": r.get("adapter_bytes"),
                    "decode_tok_s": r.get("decode_tok_s"), "perplexity": r.get("perplexity"),
                    "demo_accuracy": r.get("demo_accuracy"), "source": "benchmarks/results/gguf.json"})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, default=DEFAULT_ADAPTER)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--quants", default="int4,int8,fp32")
    ap.add_argument("--modes", default="merged,separate")
    ap.add_argument("--eval-n", type=int, default=50)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--merge-into", default="original")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "onnx.json")
    args = ap.parse_args()
    import onnxruntime
    import onnxruntime_genai

    from edgepeft.atomic import write_json

    def save(rows, done: bool):
        result = {"benchmark": "onnx", "base": args.base, "adapter": str(args.adapter), "complete": done,
                  "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                              "onnxruntime": onnxruntime.__version__,
                              "onnxruntime_genai": onnxruntime_genai.__version__},
                  "settings": {"eval_n": args.eval_n, "ppl_tokens": args.ppl_tokens, "merge_into": args.merge_into,
                               "block_size": 32, "accuracy_level": 4, "quant_algo": "k_quant_last"},
                  "rows": rows + gguf_rows()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)  # after every row: a long run that is cut short still leaves its numbers

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as work:
        for quant in args.quants.split(","):
            for mode in args.modes.split(","):
                rows.append(bench_artifact(quant, mode, args.adapter, Path(work), args))
                save(rows, False)
    rows.append(pytorch_row(args.adapter, args))
    print(json.dumps(rows[-1]), flush=True)
    save(rows, True)
    from plots import plot_onnx  # benchmarks/plots.py: the README's picture of these numbers

    print(f"wrote {plot_onnx(json.loads(args.out.read_text()), args.out.with_suffix('.png'))}")
    rows += gguf_rows()
    print(table(rows))


if __name__ == "__main__":
    main()
