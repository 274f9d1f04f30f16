"""One QLoRA step on this CPU against its own FLOP bound, and where the rest goes.

The step is edgepeft's: the NF4 base and LoRA from edgepeft.train.trainer (load_model, attach_lora),
TRL's SFTTrainer loss (trainer.compute_loss: its fused, chunked log-prob LM head), AdamW, a demo batch of
4 rows (~78 tokens each), rank 16, all-linear.

1. The bound: torch.mm 1024x1024x1024 in fp32 and bf16 at the step's thread count, best of 5. One step
   needs a forward (2·N·T FLOP) and the input gradients (2·N·T; the frozen base gets no weight gradient),
   N = every matmul weight including the tied LM head, T = tokens in the batch.
2. Variants, interleaved A B C A B C ... on the same model and batch, medians: the default recipe
   (dropout 0.05, TRL's loss), dropout 0, and dropout 0 with the LM head scored only at completion
   positions (TRL scores only those on Triton devices; on a CPU it scores every position).
3. A torch.profiler pass over one default step, self CPU time by category: bitsandbytes dequantize,
   matmul, dropout, the LM-head log-prob, the optimizer, other.
4. bf16 compute: ``--convergence-steps`` steps of fp32 and of bf16 compute (bnb_4bit_compute_dtype) on
   the same batches and seed, losses side by side.

    nice -n 10 python benchmarks/bench_train_profile.py [--reps 3] [--convergence-steps 8]

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


@contextlib.contextmanager
def compact_lm_head(on: bool):
    """TRL scores only the labelled positions where it thinks Triton runs; make it do so on the CPU too
    (the tile kernel it then calls is still the torch one: kernels.chunked_logprob checks on its own)."""
    import trl.trainer.utils as U

    old = U._use_triton
    if on:
        U._use_triton = lambda device: True
    try:
        yield
    finally:
        U._use_triton = old


def step(trainer, batch: dict) -> dict:
    """One optimizer step, timed by phase."""
    model, opt = trainer.model, trainer.optimizer
    t0 = time.perf_counter()
    loss = trainer.compute_loss(model, dict(batch))
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
    args = ap.parse_args()

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
    variants = {"default (dropout 0.05, TRL loss)": (0.05, False), "dropout 0": (0.0, False),
                "dropout 0 + LM head at completion positions": (0.0, True)}
    batch = data[0]
    step(trainer, batch)  # warm-up
    runs: dict = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, (p, compact) in variants.items():
            set_dropout(trainer.model, p)
            with compact_lm_head(compact):
                runs[name].append(step(trainer, batch))
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
