"""Task-aware quantization (issue 18, GGUF half): what the importance matrix from the adapter's own data buys.

    nice -n 10 python benchmarks/bench_imatrix.py --demo-run RUN_DIR [--chat-run RUN_DIR] [--examples 100]
    python benchmarks/bench_imatrix.py --prepare-chat DIR   # writes DIR/chat-train.jsonl, DIR/chat-eval.jsonl

For each adapter (the trained demo adapter; a second one trained on a generated ``{"messages": ...}``
chat task), on smollm2-135m: PyTorch fp32 with the adapter, then every GGUF row exported by
``edgepeft export`` twice, with the matrix (default: the run's training data, hash-checked) and with
``--imatrix none``, alternated (A B B A ...) so machine load hits both sides alike. Per row: exact match
on the same held-out examples as PyTorch (greedy, llama.cpp), perplexity on wikitext-2 validation text
from /work/shared/data (chars 200000 on: the package's slice, which the bundled fallback calibrates on,
is the first 67282 chars), file MB, export seconds and the matrix's share of them, and the verifier's
top-1 / ppl ratio against PyTorch. ``q4_k_m+keep`` adds ``--keep-delta`` (tt_overrides) on top of the
matrix. Records os.getloadavg() per row. Writes benchmarks/results/imatrix.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results" / "imatrix.json"
WIKI_FULL = Path("/work/shared/data/wikitext2-valid.txt")
WIKI_OFFSET = 200_000  # past the package's slice (chars 0..67282) and the verifier's part of it
ROWS = (("q4_k_m", "merged", None), ("q4_k_m", "separate", None), ("iq4_xs", "merged", None),
        ("q3_k_m", "merged", None), ("q4_k_m", "merged", "4MB"),
        ("q4_1", "merged", None), ("q4_1", "separate", None))  # q4_1: lands on the Q4_1 source's grid

# --- the second task: a generated chat-format dataset ----------------------------------------------
FIRST = ("Ana", "Ben", "Chloe", "Dev", "Ema", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kira", "Leo", "Mia", "Noor",
         "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vik", "Wen", "Yara", "Zoe")
LAST = ("Silva", "Okafor", "Tanaka", "Novak", "Berg", "Costa", "Haddad", "Ivanova", "Kim", "Lopez", "Moreau",
        "Nakamura", "Oliveira", "Petrov", "Quinn", "Rossi", "Schmidt", "Tran", "Varga", "Weber")
CITY = ("Porto", "Lagos", "Osaka", "Brno", "Bergen", "Lima", "Beirut", "Kazan", "Busan", "Quito", "Lyon", "Kyoto",
        "Recife", "Sofia", "Cork", "Turin", "Dresden", "Hanoi", "Szeged", "Graz")
SYSTEM = "You turn contact notes into one normalized card line."


def chat_splits(n_train: int = 800, n_eval: int = 120, seed: int = 7) -> dict[str, list[dict]]:
    """``{"messages": [system, user, assistant]}`` rows; a fixed made-up card format, disjoint facts per split."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n_train + n_eval:
        f, la, c = rng.choice(FIRST), rng.choice(LAST), rng.choice(CITY)
        tel = (rng.randint(200, 999), rng.randint(1000, 9999))
        if (f, la, c, tel) in seen:
            continue
        seen.add((f, la, c, tel))
        note = rng.choice(("{f} {l} from {c}, phone {a} {b}.", "Met {f} {l} ({c}); call {a} {b}.",
                           "{c} contact: {f} {l}, tel {a}{b}.")).format(f=f, l=la, c=c, a=tel[0], b=tel[1])
        card = f"{la.upper()}, {f} | {tel[0]}-{tel[1]} | {c[:3].upper()}"
        rows.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": note},
                                  {"role": "assistant", "content": card}]})
    return {"train": rows[:n_train], "eval": rows[n_train:]}


def prepare_chat(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in chat_splits().items():
        (folder / f"chat-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {folder}/chat-train.jsonl, chat-eval.jsonl")


def chat_examples(path: Path, n: int):
    from edgepeft.train.chat import Example

    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()][:n]
    return [Example(r["messages"][:-1], r["messages"][-1]["content"]) for r in rows]


# --- measurement ----------------------------------------------------------------------------------

def wiki_ids(tok, n_tokens: int) -> list[int]:
    text = WIKI_FULL.read_text(encoding="utf-8")
    start = text.index("\n", WIKI_OFFSET) + 1
    return tok(text[start:start + 12 * n_tokens], add_special_tokens=False)["input_ids"][:n_tokens]


def torch_reference(base, adapter: Path, examples, ids: list[int], max_new: int) -> dict:
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgepeft.evaluate import exact_match_detail, hf_generate_batch

    tok = base.load_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    t0 = time.perf_counter()
    acc = exact_match_detail(hf_generate_batch(model, tok, max_new), examples, tokenizer=tok)
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 256):
            chunk = ids[s:s + 256]
            if len(chunk) < 2:
                break
            lg = model(input_ids=torch.tensor([chunk])).logits[0, :-1].double()
            nll -= float(torch.log_softmax(lg, -1)[torch.arange(len(chunk) - 1), torch.tensor(chunk[1:])].sum())
            n += len(chunk) - 1
    return {"demo_exact_match": round(acc.accuracy, 4), "correct": acc.correct, "total": acc.total,
            "perplexity": round(float(np.exp(nll / n)), 3), "seconds": round(time.perf_counter() - t0, 1)}


def gguf_row(base, run: Path, quant: str, mode: str, keep: str | None, matrix: bool, examples, ids, max_new,
             work: Path) -> dict:
    from bench_gguf import accuracy, open_llama, perplexity

    from edgepeft.errors import VerificationError
    from edgepeft.export.gguf import export
    from edgepeft.export.request import ExportRequest

    out = Path(tempfile.mkdtemp(dir=work))
    load = os.getloadavg()
    t0 = time.perf_counter()
    req = ExportRequest(format="gguf", base=str(base.path), adapters=[run], out=out, mode=mode, quant=quant,
                        merge_into="original", imatrix="auto" if matrix else "none", keep_delta=keep, verify=True)
    failed = None
    try:
        rec = export(req).record
        verification = rec.get("verifications") or [rec.get("verification")]
    except VerificationError as e:  # still measured: these rows are what the 4-bit bounds are set from
        failed, verification = str(e), e.records
        rec = export(ExportRequest(**{**req.__dict__, "verify": False,
                                      "out": Path(tempfile.mkdtemp(dir=work))})).record
    secs = time.perf_counter() - t0
    models = [Path(f) for f in rec["files"]]
    lora = models[1] if mode == "separate" else None
    llm = open_llama(models[0], lora)
    tok = base.load_tokenizer()
    try:
        acc = accuracy(llm, tok, examples, max_new)
        ppl = perplexity(llm, ids)
    finally:
        llm.close()
    # merged: the one record (the merged model); separate: the record with the adapter applied
    picked = [v for v in verification if v and (v.get("adapter") is not None) == (mode == "separate")]
    checks = {c["metric"]: c["value"] for c in picked[-1].get("checks", [])} if picked else {}
    row = {"quant": quant, "mode": mode, "imatrix": matrix, "keep_delta": keep,
           "mb": round(sum(f.stat().st_size for f in models) / 1e6, 2),
           "exact_match": round(acc, 4), "perplexity": round(ppl, 3),
           "export_seconds": round(secs, 1), "imatrix_seconds": (rec.get("imatrix") or {}).get("seconds"),
           "calibration": (rec.get("imatrix") or {}).get("source"),
           "kept_weights": len((rec.get("keep_delta") or {}).get("kept", [])),
           "verify": checks, "verify_failed": failed, "load_avg": [round(x, 2) for x in load]}
    for f in out.iterdir():
        f.unlink()
    return row


def bench_adapter(name: str, base, run: Path, examples, ids, max_new: int, work: Path, rows_wanted, save) -> dict:
    print(f"[{name}] PyTorch reference on {len(examples)} examples", flush=True)
    ref = torch_reference(base, run / "adapter", examples, ids, max_new)
    print(json.dumps(ref), flush=True)
    rows = []
    entry = {"adapter": name, "run": str(run), "pytorch": ref, "examples": len(examples), "rows": rows}
    save(entry)
    for i, (quant, mode, keep) in enumerate(r for r in ROWS if rows_wanted is None or _row_name(r) in rows_wanted):
        order = (True, False) if i % 2 == 0 else (False, True)  # A B, B A, ...
        if keep:
            order = (True,)  # the override row only on top of the matrix
        for matrix in order:
            row = gguf_row(base, run, quant, mode, keep, matrix, examples, ids, max_new, work)
            row["vs_pytorch_points"] = round(100 * (row["exact_match"] - ref["demo_exact_match"]), 1)
            row["ppl_ratio"] = round(row["perplexity"] / ref["perplexity"], 4)
            rows.append(row)
            save(entry)  # partial results survive a stopped run
            print(json.dumps(row), flush=True)
    return entry


def _row_name(row) -> str:
    quant, mode, keep = row
    return f"{quant}-{mode}" + ("-keep" if keep else "")


def markdown(result: dict) -> str:
    lines = []
    for a in result["adapters"]:
        ref = a["pytorch"]
        lines += [(f"**{a['adapter']}** ({a['examples']} held-out examples; PyTorch fp32 + adapter: exact match "
                   f"{100 * ref['demo_exact_match']:.0f} %, perplexity {ref['perplexity']}):"), "",
                  "| GGUF | matrix | exact match (Δ pts vs PyTorch) | perplexity (ratio) | MB | export s (matrix s) |",
                  "|---|---|---|---|---|---|"]
        for r in a["rows"]:
            label = f"{r['quant'].upper()} {r['mode']}" + (f" + keep-delta {r['keep_delta']}" if r["keep_delta"] else "")
            lines.append(f"| {label} | {'task data' if r['imatrix'] else 'none'} | {100 * r['exact_match']:.0f} % "
                         f"({r['vs_pytorch_points']:+.0f}) | {r['perplexity']} ({r['ppl_ratio']:.3f}) | {r['mb']} | "
                         f"{r['export_seconds']} ({r['imatrix_seconds'] or '-'}) |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-run", type=Path)
    ap.add_argument("--chat-run", type=Path)
    ap.add_argument("--chat-eval", type=Path, help="default: chat-eval.jsonl beside the chat run's training data")
    ap.add_argument("--prepare-chat", type=Path)
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--wiki-tokens", type=int, default=4096)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--rows", default=None, help="comma-separated subset of: " + ", ".join(map(_row_name, ROWS)))
    ap.add_argument("--chat-examples", type=int, default=None, help="default: --examples")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON (default: %(default)s)")
    args = ap.parse_args()
    if args.prepare_chat:
        prepare_chat(args.prepare_chat)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from edgepeft.models import resolve_base
    from edgepeft.train.tasks import get_task

    base = resolve_base(args.base)
    tok = base.load_tokenizer()
    ids = wiki_ids(tok, args.wiki_tokens)
    work = Path(tempfile.mkdtemp(prefix="bench-imatrix-"))
    result = {"benchmark": "imatrix", "base": args.base, "machine": {"cpus": os.cpu_count(),
              "platform": platform.platform(), "load_avg_at_start": os.getloadavg()},
              "wikitext": {"file": str(WIKI_FULL), "char_offset": WIKI_OFFSET, "tokens": len(ids)},
              "adapters": []}
    wanted = set(args.rows.split(",")) if args.rows else None
    running = {n for n, a in (("demo", args.demo_run), ("chat", args.chat_run)) if a}
    if args.out.is_file():  # adapters measured by an earlier invocation stay
        kept = [a for a in json.loads(args.out.read_text()).get("adapters", []) if a["adapter"] not in running]
        result["adapters"].extend(kept)
        result["earlier_invocations_kept"] = [a["adapter"] for a in kept]

    def save(entry: dict) -> None:
        if entry not in result["adapters"]:
            result["adapters"].append(entry)
        result["machine"]["load_avg_now"] = os.getloadavg()
        args.out.write_text(json.dumps(result, indent=1))

    demo = get_task("demo")
    if args.demo_run:
        bench_adapter("demo", base, args.demo_run, demo.examples("eval")[:args.examples], ids, demo.max_new_tokens,
                      work, wanted, save)
    if args.chat_run:
        ev = args.chat_eval or (args.chat_run.parent / "chat-eval.jsonl")
        bench_adapter("chat", base, args.chat_run, chat_examples(ev, args.chat_examples or args.examples), ids, 32,
                      work, wanted, save)
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
