"""Where Gemma 3 270M's 262k-entry vocabulary costs memory and time, in the paths edgepeft runs.

    python benchmarks/bench_gemma_vocab.py [--out benchmarks/results/gemma_vocab.json]

Needs the edgepeft[gemma] extra. Measures, A/B interleaved (3 rounds, medians and ratios quoted,
os.getloadavg() recorded at start and end, the thread count as the shell set it):
1. sizes: the fp32 embedding (tied: it is the lm_head too) against all fp32 weights, one logits row;
2. llama.cpp (the original Q4_K_M GGUF, runtimes/llamacpp.py): a 64-token prefill with logits for
   every position (what the verifier and calibration scoring ask) vs the last one only;
3. our copy of those 64 rows out of llama.cpp: row by row plus a stack (before) vs one block (now);
4. PyTorch fp32 (the reference): the decoder body vs the lm_head over all 64 positions vs the last.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _median(xs):
    return round(float(np.median(xs)), 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gemma_vocab.json"))
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from edgepeft.models import resolve_base
    from edgepeft.runtimes.base import Artifact, get_runtime

    out = {"loadavg_start": os.getloadavg(), "torch_threads": torch.get_num_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    base = resolve_base("gemma3-270m")
    v, h = base.config["vocab_size"], base.config["hidden_size"]
    sizes = {t.name: int(np.prod(t.shape)) * 4 for t in base.tensors()}
    emb = sum(b for n, b in sizes.items() if "embed_tokens" in n)
    out["sizes"] = {"vocab": v, "hidden": h, "fp32_weights_mib": round(sum(sizes.values()) / 2**20, 1),
                    "embedding_fp32_mib": round(emb / 2**20, 1), "embedding_share": round(emb / sum(sizes.values()), 3),
                    "logits_row_fp32_mib": round(v * 4 / 2**20, 3)}

    gguf = Path(json.loads((base.path / "edgepeft-source.json").read_text())["gguf"])
    rt = get_runtime("llama.cpp")
    rt.load(Artifact(gguf, "gguf", gguf, {}, None), None, n_ctx=128)
    ids = [2, *range(1000, 1063)]
    t = {"prefill_all_logits": [], "prefill_last_only": [], "copy_row_by_row": [], "copy_block": []}
    for _ in range(3):
        for mode in ("prefill_all_logits", "prefill_last_only"):
            rt.reset()
            t0 = time.perf_counter()
            rt.prefill(ids, all_logits=mode == "prefill_all_logits")
            t[mode].append(time.perf_counter() - t0)
        rt.reset()
        rt.prefill(ids, all_logits=True)
        t0 = time.perf_counter()
        rows = [np.ctypeslib.as_array(rt._ll.llama_get_logits_ith(rt.ctx, i), shape=(rt.n_vocab,)) for i in range(64)]
        before = np.stack(rows).astype(np.float32, copy=True)
        t["copy_row_by_row"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        now = rt.logits()
        t["copy_block"].append(time.perf_counter() - t0)
        assert np.array_equal(before, now)
    rt.close()
    med = {k: _median(x) for k, x in t.items()}
    out["llama_cpp_q4_k_m_64_tokens_s"] = {"median": med, "runs": {k: [round(x, 4) for x in xs] for k, xs in t.items()},
                                           "all_over_last": round(med["prefill_all_logits"] / med["prefill_last_only"], 2),
                                           "copy_before_over_now": round(med["copy_row_by_row"] / med["copy_block"], 1)}

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    t = {"body": [], "lm_head_all_64": [], "lm_head_last": []}
    with torch.no_grad():
        for _ in range(3):
            t0 = time.perf_counter()
            hid = model.model(input_ids=x).last_hidden_state
            t["body"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.lm_head(hid)
            t["lm_head_all_64"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.lm_head(hid[:, -1:])
            t["lm_head_last"].append(time.perf_counter() - t0)
    med = {k: _median(xs) for k, xs in t.items()}
    out["pytorch_fp32_64_tokens_s"] = {"median": med, "runs": {k: [round(v, 4) for v in xs] for k, xs in t.items()},
                                       "lm_head_share_all_positions": round(med["lm_head_all_64"] /
                                                                            (med["body"] + med["lm_head_all_64"]), 2)}
    out["loadavg_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
