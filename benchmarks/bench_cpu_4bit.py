"""bitsandbytes' two CPU 4-bit paths on the demo task, side by side: which one edgepeft should use.

    nice -n 10 python benchmarks/bench_cpu_4bit.py [--steps 48] [--eval 50] [--out benchmarks/results/cpu_4bit.json]

On CPUs whose native library reports AVX-512 BF16, bitsandbytes 0.50 runs every *inference* forward
of a ``Linear4bit`` through a fused bf16 gemv (``fused-bf16``: the weight is repacked in place, absmax
rounded to bf16); training, and every other CPU, dequantizes NF4 to fp32 and multiplies in fp32
(``dequantize-fp32``). edgepeft pins the second everywhere (edgepeft/train/kernels.py). This script
measures both on the quickstart's training recipe (smollm2-135m, QLoRA NF4, rank 16, batch 4):

1. training: the loss curve and step time with the pin and without it (``--identity-steps`` each,
   the same seed): training never reaches the fused kernel, so the curves must be identical;
2. the full quickstart training run (``--steps``, pinned) -> the demo adapter;
3. for each path, the trained QLoRA model in eval mode: demo exact match on ``--eval`` held-out
   examples, generation time, and parity with the ``--merge-into dequantized`` merge (fp32 model,
   what every export starts from): max |Δlogit| and top-1 agreement on the rendered eval prompts;
4. how far the fused path's in-place repack moves the weights (bf16 absmax), undone with
   bitsandbytes' own inverse.
The fp32 base + adapter (what ``edgepeft eval`` scores) is reported as the reference row.
The fused path needs a CPU with AVX-512 BF16; elsewhere its rows say so.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PATHS = ("dequantize-fp32", "fused-bf16")

def train_run(base: str, out: Path, steps: int, pinned: bool):
    import edgepeft.train.kernels as K
    from edgepeft.quickstart import FULL
    from edgepeft.train.config import TrainConfig
    from edgepeft.train.run import train

    pin = K.pin_cpu_4bit_path
    if not pinned:
        K.pin_cpu_4bit_path = lambda model: 0  # bitsandbytes' own choice
    try:
        cfg = TrainConfig(out=str(out), base=base, task="demo", bits=4, rank=FULL.rank, alpha=2.0 * FULL.rank,
                          max_steps=steps, batch_size=FULL.batch_size, lr=FULL.lr, max_seq_len=128,
                          warmup_ratio=0.05, logging_steps=1, save_steps=max(steps, 1), save_total_limit=1)
        train(cfg, say=lambda m: None, bar=False, log_lines=False)
    finally:
        K.pin_cpu_4bit_path = pin
    m = json.loads((out / "manifest.json").read_text())
    return {"pinned": pinned, "steps": steps, "s_per_step": m["train"]["s_per_step"], "cpu_s": m["train"]["cpu_s"],
            "loss_curve": m["loss_curve"], "final_loss": m["train"]["final_loss"], "kernels": m["kernels"]}


def qlora_model(base, adapter: Path, path: str):
    from peft import PeftModel

    from edgepeft.train.config import TrainConfig
    from edgepeft.train.trainer import load_model, pick_recipe

    recipe = pick_recipe(TrainConfig(out="unused", base=base.spec, task="demo", bits=4, device="cpu"))
    model = load_model(base, recipe)  # pinned (dequantize-fp32), as edgepeft trains
    if path == "fused-bf16":
        from bitsandbytes.nn import Linear4bit

        for m in model.modules():
            if isinstance(m, Linear4bit):
                m.support_avx512bf16_for_cpu = True  # what bitsandbytes picks on this CPU
    model.config.use_cache = True
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def logits_on(model, tok, prompts: list[str]):
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out.append(model(input_ids=ids).logits[0].float())
    return out


def parity(ref, got) -> dict:
    import torch

    agree = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, got))
    total = sum(r.shape[0] for r in ref)
    return {"positions": total, "top1_agreement": round(agree / total, 4),
            "max_abs_logit_diff": round(max(float((r - g).abs().max()) for r, g in zip(ref, got)), 6),
            "mean_abs_logit_diff": round(float(torch.cat([(r - g).abs().flatten() for r, g in zip(ref, got)]).mean()), 6)}


def demo_accuracy(model, tok, examples, max_new_tokens: int) -> dict:
    from edgepeft.evaluate import exact_match_detail, hf_generate_batch

    t0 = time.perf_counter()
    r = exact_match_detail(hf_generate_batch(model, tok, max_new_tokens), examples, tok)
    return {"accuracy": r.accuracy, "correct": r.correct, "total": r.total, "gen_s": round(time.perf_counter() - t0, 1)}


def repack_error(model) -> dict:
    """Max |W - W'| after the fused path's in-place repack, undone by bitsandbytes' own inverse."""
    import bitsandbytes.functional as F
    from bitsandbytes.nn import Linear4bit

    worst = rel = 0.0
    n = 0
    for m in model.modules():
        if isinstance(m, Linear4bit) and getattr(m.weight.quant_state, "packing_format_for_cpu", False):
            data, state = F._convert_weight_packed_for_cpu_inverse(m.weight.data, m.weight.quant_state)
            back = F.dequantize_4bit(data, state).float()
            ref = m._edgepeft_ref
            worst = max(worst, float((back - ref).abs().max()))
            rel = max(rel, float((back - ref).norm() / ref.norm()))
            n += 1
    return {"modules_repacked": n, "max_abs_weight_change": round(worst, 6), "max_rel_fro_change": round(rel, 6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=48, help="the quickstart's training steps")
    ap.add_argument("--identity-steps", type=int, default=4)
    ap.add_argument("--eval", type=int, default=50)
    ap.add_argument("--adapter", help="reuse a trained RUN_DIR instead of training one")
    ap.add_argument("--out", default=str(HERE / "results" / "cpu_4bit.json"))
    args = ap.parse_args()

    import os

    from edgepeft.quiet import silence_libraries

    silence_libraries()
    import bitsandbytes.functional as BF
    import torch

    from edgepeft.export.adapter import load_adapter
    from edgepeft.export.merge import merge_into_folder
    from edgepeft.models import resolve_base
    from edgepeft.train.kernels import cpu_flags, cpu_model
    from edgepeft.train.tasks import get_task

    torch.manual_seed(0)
    base = resolve_base(args.base)
    tok = base.load_tokenizer()
    task = get_task("demo")
    examples = task.examples("eval")[: args.eval]
    fused_ok = bool(BF.has_avx512bf16())
    result: dict = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "flags": cpu_flags(),
                                "bitsandbytes_has_avx512bf16": fused_ok, "loadavg_start": os.getloadavg()},
                    "base": args.base}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. training never reaches the fused kernel: the same curve with and without the pin
        result["training_identity"] = [train_run(args.base, tmp / f"id-{p}", args.identity_steps, p)
                                       for p in (True, False)]
        a, b = (r["loss_curve"] for r in result["training_identity"])
        result["training_identical"] = a == b
        # 2. the quickstart's training run
        if args.adapter:
            run = Path(args.adapter)
            m = json.loads((run / "manifest.json").read_text())
            result["train"] = {"reused": run.name, "steps": m["train"]["steps"], "s_per_step": m["train"]["s_per_step"],
                               "final_loss": m["train"]["final_loss"], "loss_curve": m["loss_curve"],
                               "kernels": m["kernels"]}
        else:
            run = tmp / "run"
            result["train"] = train_run(args.base, run, args.steps, True)
        adapter = run / "adapter"
        # reference rows: fp32 base + adapter (edgepeft eval) and the NF4-dequantized merge
        from edgepeft.train.adapter import load_adapter as load_peft

        fp32 = load_peft(base.load_model(torch.float32), str(run), base).eval()
        deq_dir = merge_into_folder(base, [load_adapter(run, base)], tmp / "deq", target="dequantized")
        from transformers import AutoModelForCausalLM

        deq = AutoModelForCausalLM.from_pretrained(deq_dir, dtype=torch.float32).eval()
        from edgepeft.train.chat import render_prompt

        prompts = [render_prompt(tok, e.prompt) for e in examples[:8]]
        ref = logits_on(deq, tok, prompts)
        result["reference"] = {
            "pytorch-fp32-base+adapter": demo_accuracy(fp32, tok, examples, task.max_new_tokens),
            "merged-dequantized-fp32": demo_accuracy(deq, tok, examples, task.max_new_tokens),
        }
        del fp32
        # 3./4. each 4-bit path in eval mode
        rows = {}
        for path in PATHS:
            if path == "fused-bf16" and not fused_ok:
                rows[path] = {"measured": False, "why": "bitsandbytes reports no AVX-512 BF16 on this CPU"}
                continue
            model = qlora_model(base, adapter, path)
            from bitsandbytes.nn import Linear4bit

            for m in model.modules():
                if isinstance(m, Linear4bit):
                    m._edgepeft_ref = BF.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            t0 = time.perf_counter()
            got = logits_on(model, tok, prompts)
            row = {"measured": True, "forward_s": round(time.perf_counter() - t0, 2),
                   "vs_merged_dequantized": parity(ref, got),
                   "demo": demo_accuracy(model, tok, examples, task.max_new_tokens),
                   "after_demo_vs_merged_dequantized": parity(ref, logits_on(model, tok, prompts))}
            row["repack"] = repack_error(model)
            rows[path] = row
            del model
        result["paths"] = rows
    result["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "training_identity"}, indent=2))


if __name__ == "__main__":
    main()
