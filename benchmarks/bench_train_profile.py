"""One QLoRA step on this CPU against its own FLOP bound, and where the rest goes.

The step is edgepeft's: the NF4 base and LoRA from edgepeft.train.trainer (load_model, attach_lora),
its trainer's loss (TRL's fused, chunked log-prob LM head, over the labelled positions only:
trainer.labelled_positions_only), AdamW, a demo batch of 4 rows (~78 tokens each), rank 16, all-linear.

1. The bound: torch.mm 1024x1024x1024 in fp32 and bf16 at the step's thread count, best of 5. One step
   needs a forward (2·N·T FLOP) and the input gradients (2·N·T; the frozen base gets no weight gradient),
   N = every matmul weight including the tied LM head, T = tokens in the batch.
2. Variants, interleaved A B C A B C ... on the same model and batch, medians: the recipe before this
   script's last change (dropout 0.05, TRL's own loss, which on a CPU runs the LM head over every
   position; it scores only the labelled ones on Triton devices), the same with edgepeft's loss, and
   edgepeft's loss at dropout 0.
3. A torch.profiler pass over one default step, self CPU time by category: bitsandbytes dequantize,
   matmul, dropout, the LM-head log-prob, the optimizer, other.
4. bf16 compute: ``--convergence-steps`` steps of fp32 and of bf16 compute (bnb_4bit_compute_dtype) on
   the same batches and seed, losses side by side.
5. The recipe check: the quickstart's recipe trained ``--recipe-steps`` steps per variant (before; the
   labelled-positions loss at dropout 0.05 and 0; and with bf16 compute), each scored on ``--eval-limit``
   held-out demo examples in PyTorch: which faster step keeps the task.

    python benchmarks/bench_train_profile.py [--reps 3] [--convergence-steps 8] [--recipe-steps 48 --eval-limit 100]
    python benchmarks/bench_train_profile.py --only-recipe   # the recipe check alone, kept beside the rest

Writes benchmarks/results/train_profile.json (with os.getloadavg() at every phase).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def mm_gflops(dtype, n: int = 1024, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return round(2 * n**3 / best / 1e9, 1)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build(compute_dtype: str = "float32", dropout: float = 0.05, seed: int = 42):
    """edgepeft's QLoRA model and an SFTTrainer around it (for its collator and loss), nothing trained yet."""
    from datasets import Dataset
    from transformers import set_seed

    from edgepeft.models import resolve_base
    from edgepeft.train import trainer as T
    from edgepeft.train.config import TrainConfig
    from edgepeft.train.data import load_records
    from edgepeft.train.run import prepare_data

    cfg = TrainConfig(out="/tmp/edgepeft-train-profile", base="smollm2-135m", task="demo", rank=16, alpha=32,
                      dropout=dropout, max_seq_len=128, batch_size=4, lr=1e-3, max_steps=100, seed=seed)
    base = resolve_base(cfg.base)
    tok = base.load_tokenizer()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    records, name = load_records(cfg.data_name)
    rows, _ = prepare_data(cfg, tok, records, name)
    recipe = T.pick_recipe(cfg)
    recipe.compute_dtype = compute_dtype
    set_seed(cfg.seed)
    model = T.attach_lora(T.load_model(base, recipe), cfg, recipe)
    args = T.sft_config(cfg, recipe)
    trainer = T.trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.create_optimizer()
    model.train()
    return trainer


def batches(trainer, n: int) -> list[dict]:
    it = iter(trainer.get_train_dataloader())
    return [next(it) for _ in range(n)]


def set_dropout(model, p: float) -> None:
    """LoRA dropout to ``p`` in place (PEFT puts an nn.Identity where p is 0, so do the same)."""
    import torch

    for m in model.modules():
        d = getattr(m, "lora_dropout", None)
        if isinstance(d, torch.nn.ModuleDict):
            for k in list(d):
                d[k] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()


def step(trainer, batch: dict, every_position: bool = False) -> dict:
    """One optimizer step, timed by phase: edgepeft's loss (the LM head over the labelled positions,
    ``trainer.labelled_positions_only``), or TRL's own on a CPU (every position) with ``every_position``."""
    from trl import SFTTrainer

    model, opt = trainer.model, trainer.optimizer
    t0 = time.perf_counter()
    loss = (SFTTrainer.compute_loss(trainer, model, dict(batch)) if every_position
            else trainer.compute_loss(model, dict(batch)))
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {"forward_loss_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2, "step_s": t3 - t0,
            "loss": float(loss.detach())}


def flops_per_step(model, tokens: int) -> dict:
    """4·N·T: forward plus input gradients, N = matmul weights (the tied LM head counted once more)."""
    cfg = model.config
    h, i, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    n = layers * per_layer + v * h
    return {"matmul_params": n, "tokens": tokens, "gflop": round(4 * n * tokens / 1e9, 2)}


CATEGORIES = (("bitsandbytes dequantize", ("dequantize", "bitsandbytes")), ("dropout", ("dropout", "bernoulli")),
              ("optimizer", ("adam", "_foreach", "lerp", "addcdiv")),
              ("LM-head log-prob", ("log_softmax", "logsumexp", "_chunked", "gather")),
              ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")))


def profile_step(trainer, batch: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = step(trainer, batch)["step_s"]
    cats: dict[str, float] = {}
    top = []
    for ev in prof.key_averages():
        name = ev.key.lower()
        us = ev.self_cpu_time_total
        cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + us / 1e6
        top.append((us / 1e6, ev.key))
    total = sum(cats.values())
    return {"step_wall_s": round(wall, 3), "self_cpu_s": round(total, 3),
            "by_category_s": {k: round(v, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "by_category_share": {k: round(v / total, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": k, "self_cpu_s": round(s, 3)} for s, k in sorted(top, reverse=True)[:15]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--convergence-steps", type=int, default=8)
    ap.add_argument("--recipe-steps", type=int, default=48, help="the quickstart's training steps; 0: skip")
    ap.add_argument("--eval-limit", type=int, default=100, help="demo held-out examples per recipe variant")
    ap.add_argument("--only-recipe", action="store_true", help="only the recipe check (kept beside the rest)")
    args = ap.parse_args()
    if args.only_recipe:
        doc = _read_json(OUT / "train_profile.json")
        doc["recipe_check"] = recipe_check(args.recipe_steps, args.eval_limit)
        from edgepeft import atomic

        atomic.write_json(OUT / "train_profile.json", doc)
        return

    import torch

    from edgepeft import atomic
    from edgepeft.train.kernels import cpu_model

    threads = torch.get_num_threads()
    doc: dict = {"threads": threads, "cpu": cpu_model(), "loadavg": {"start": os.getloadavg()}}
    doc["bound"] = {"fp32_gflops": mm_gflops(torch.float32), "bf16_gflops": mm_gflops(torch.bfloat16),
                    "how": "torch.mm 1024^3, best of 5"}
    trainer = build()
    data = batches(trainer, args.reps + 1 + max(args.convergence_steps, 0))
    tokens = int(data[0]["attention_mask"].sum()) if "attention_mask" in data[0] else int(data[0]["input_ids"].numel())
    flops = flops_per_step(trainer.model, tokens)
    completion = int((data[0]["labels"] != -100).sum()) if "labels" in data[0] else None
    doc["step"] = {**flops, "batch_shape": list(data[0]["input_ids"].shape), "completion_tokens": completion,
                   "bound_fp32_s": round(flops["gflop"] / doc["bound"]["fp32_gflops"], 3),
                   "bound_bf16_s": round(flops["gflop"] / doc["bound"]["bf16_gflops"], 3)}
    variants = {"before (dropout 0.05, TRL's every-position LM head)": (0.05, True),
                "dropout 0.05, LM head at the labelled positions": (0.05, False),
                "dropout 0, LM head at the labelled positions": (0.0, False)}
    batch = data[0]
    step(trainer, batch)  # warm-up
    runs: dict = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, (p, every) in variants.items():
            set_dropout(trainer.model, p)
            runs[name].append(step(trainer, batch, every_position=every))
    doc["loadavg"]["variants"] = os.getloadavg()
    base_s = statistics.median(r["step_s"] for r in runs[next(iter(variants))])
    doc["variants"] = {}
    for name, rs in runs.items():
        med = {k: round(statistics.median(r[k] for r in rs), 3) for k in ("forward_loss_s", "backward_s", "optimizer_s",
                                                                            "step_s")}
        doc["variants"][name] = {**med, "samples_step_s": [round(r["step_s"], 3) for r in rs],
                                 "vs_default": round(med["step_s"] / base_s, 3),
                                 "x_fp32_bound": round(med["step_s"] / doc["step"]["bound_fp32_s"], 2),
                                 "tokens_per_s": round(tokens / med["step_s"], 1)}
    set_dropout(trainer.model, 0.05)
    doc["profile_default_step"] = profile_step(trainer, batch)
    doc["loadavg"]["profile"] = os.getloadavg()
    if args.convergence_steps > 0:
        doc["bf16_convergence"] = convergence(data[1:1 + args.convergence_steps])
        doc["loadavg"]["convergence"] = os.getloadavg()
    if args.recipe_steps > 0:
        doc["recipe_check"] = recipe_check(args.recipe_steps, args.eval_limit)
    OUT.mkdir(parents=True, exist_ok=True)
    atomic.write_json(OUT / "train_profile.json", doc)
    print(f"bound fp32 {doc['bound']['fp32_gflops']} GFLOPS, bf16 {doc['bound']['bf16_gflops']}; step "
          f"{flops['gflop']} GFLOP -> {doc['step']['bound_fp32_s']} s fp32 bound")
    for name, v in doc["variants"].items():
        print(f"{name:45s} {v['step_s']:6.2f} s/step  {v['vs_default']:.3f}x default  {v['x_fp32_bound']:.2f}x bound")
    print("profile:", doc["profile_default_step"]["by_category_share"])
    if "bf16_convergence" in doc:
        print("losses fp32:", doc["bf16_convergence"]["float32"]["losses"])
        print("losses bf16:", doc["bf16_convergence"]["bfloat16"]["losses"])


RECIPE_VARIANTS = {  # name -> (dropout, compute dtype, TRL's every-position LM head)
    "before: dropout 0.05, fp32, every-position LM head": (0.05, "float32", True),
    "dropout 0.05, fp32, labelled positions": (0.05, "float32", False),
    "dropout 0, fp32, labelled positions": (0.0, "float32", False),
    "dropout 0, bf16 compute, labelled positions": (0.0, "bfloat16", False),
}


def recipe_check(steps: int, limit: int) -> dict:
    """The quickstart's recipe (``quickstart.train_demo``: rank 16, lr 1e-3, batch 4) trained ``steps`` steps
    per variant, one after another in this process, then scored by ``edgepeft.evaluate.evaluate_hf`` on
    ``limit`` held-out demo examples: does a faster step keep the task?"""
    import shutil

    from edgepeft.evaluate import evaluate_hf
    from edgepeft.train import trainer as T
    from edgepeft.train.config import TrainConfig
    from edgepeft.train.run import run_training

    pick, positions = T.pick_recipe, T.labelled_positions_only
    out = {"steps": steps, "eval_limit": limit, "variants": {}}
    for name, (dropout, dtype, every) in RECIPE_VARIANTS.items():
        run = Path("/tmp/edgepeft-train-recipe") / name.split(":")[0].replace(" ", "_").replace(",", "")
        shutil.rmtree(run, ignore_errors=True)
        cfg = TrainConfig(out=str(run), base="smollm2-135m", task="demo", bits=4, rank=16, alpha=32.0, dropout=dropout,
                          max_steps=steps, batch_size=4, lr=1e-3, max_seq_len=128, warmup_ratio=0.05,
                          logging_steps=max(1, steps // 8), save_steps=steps, save_total_limit=1)

        def recipe(c, dtype=dtype):
            r = pick(c)
            r.compute_dtype = dtype
            return r

        T.pick_recipe = recipe
        if every:
            T.labelled_positions_only = lambda device_type: contextlib.nullcontext(False)
        try:
            _, summary = run_training(cfg, say=lambda m: None, log_lines=False)
        finally:
            T.pick_recipe, T.labelled_positions_only = pick, positions
        ev = evaluate_hf("smollm2-135m", adapter=str(run / "adapter"), task="demo", split="eval", limit=limit)
        out["variants"][name] = {"s_per_step": summary["s_per_step"],
                                 "final_loss": summary["final_loss"],
                                 "accuracy": ev["accuracy"], "correct": ev["correct"], "total": ev["total"],
                                 "loadavg": os.getloadavg()}
        print(f"{name:55s} {summary['s_per_step']:6.2f} s/step  demo {ev['correct']}/{ev['total']}",
              flush=True)
    return out


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def convergence(data: list[dict]) -> dict:
    """fp32 and bf16 compute, same seed and batches, steps interleaved (A B A B): the loss after each step."""
    out = {}
    trainers = {d: build(compute_dtype=d) for d in ("float32", "bfloat16")}
    for d in trainers:
        out[d] = {"losses": [], "step_s": []}
    for b in data:
        for d, tr in trainers.items():
            r = step(tr, b)
            out[d]["losses"].append(round(r["loss"], 4))
            out[d]["step_s"].append(round(r["step_s"], 3))
    for rec in out.values():
        rec["median_step_s"] = round(statistics.median(rec["step_s"]), 3)
    out["lr"] = 1e-3
    out["note"] = "constant lr 1e-3 (the demo recipe's peak; AdamW from edgepeft's recipe), dropout 0.05"
    return out

if __name__ == "__main__":
    main()
