"""Where the tolerance table's bounds come from (export/tolerances.py).

For each base (the real smollm2-135m and the tiny test models) and each quant, the one
verifier (export/verify.py) scores:

- ``edgepeft``: our export (merged, and for the tiny models also with a rsLoRA adapter merged
  and separate), verification off, then verified here;
- ``llama.cpp``: llama.cpp's own pipeline on the same HF folder: convert_hf_to_gguf.py from the
  vendored sdist (f32/f16/bf16/q8_0 directly), then llama_model_quantize from the f32 file for
  the block quants (the same C function llama-quantize runs);
- ``onnx``: the onnxruntime-genai builder's output (fp32/int8/int4), with ``--onnx``.

    python benchmarks/verify_bounds.py [--bases smollm2-135m,tiny] [--onnx] [--out benchmarks/results/verify_bounds.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
PEER_DIRECT = ("f32", "f16", "bf16", "q8_0")  # convert_hf_to_gguf.py --outtype
ONNX_QUANTS = ("fp32", "int8", "int4")


def measure_all() -> None:
    """Score every metric for every type (the table bounds only some), judged afterwards against the table."""
    from edgepeft.export import tolerances as T
    from edgepeft.export import verify as V

    V.bounds_for = lambda fmt, quant, model_type=None: T.Bounds(top1=0.0, ppl_ratio=float("inf"), max_abs_logit=float("inf"),
                                               tokenizer=0.0)


def metrics(records: list[dict]) -> list[dict]:
    from edgepeft.export.tolerances import bounds_for

    out = []
    for r in records:
        values = {c["metric"]: c["value"] for c in r["checks"]}
        b = bounds_for(r["format"], r["quant"])
        ok = all(values[m] >= v if op == ">=" else values[m] <= v for m, op, v in b.items())
        out.append({"adapter": r["adapter"], "within_table": ok, **values})
    return out


def export(base: str, out: Path, quant: str, fmt: str = "gguf", adapters=(), mode: str = "merged") -> dict:
    from edgepeft.export import gguf, onnx
    from edgepeft.export.request import ExportRequest

    req = ExportRequest(format=fmt, base=base, adapters=list(adapters), out=out, quant=quant, mode=mode,
                        merge_into="original", verify=False)
    return (gguf if fmt == "gguf" else onnx).export(req)


def verify_gguf(path: Path, ref, quant: str, adapters: dict | None = None) -> list[dict]:
    from edgepeft.export import verify as V
    from edgepeft.runtimes.base import Artifact

    return metrics(V.verify(Artifact(path, "gguf", path, adapters or {}, quant), ref, fmt="gguf", quant=quant))


def peer_gguf(folder: Path, work: Path, quant: str) -> Path:
    from peers import run_peer

    from edgepeft.export.quantize import quantize

    f32 = work / "peer-f32.gguf"
    if not f32.exists():
        run_peer("convert_hf_to_gguf.py", folder, "--outtype", "f32", "--outfile", f32)
    if quant == "f32":
        return f32
    out = work / f"peer-{quant}.gguf"
    if quant in PEER_DIRECT:
        run_peer("convert_hf_to_gguf.py", folder, "--outtype", quant, "--outfile", out)
    else:
        quantize(f32, out, quant)
    return out


def run_base(spec: str, work: Path, with_onnx: bool, adapter: Path | None) -> dict:
    from edgepeft.export.adapter import load_adapters
    from edgepeft.export.verify import Reference
    from edgepeft.models import resolve_base

    base = resolve_base(spec)
    ref = Reference(base)
    res: dict = {"base": spec, "gguf": {}, "peer_llama_cpp": {}, "onnx": {}}
    plans = load_adapters([adapter], base) if adapter else []
    for q in GGUF_QUANTS:
        t = time.perf_counter()
        rec = export(spec, work / f"ours-{q}", q)
        res["gguf"][q] = {"merged_base": verify_gguf(Path(rec["files"][0]), ref, q)}
        if plans:
            rec = export(spec, work / f"ours-{q}-m", q, adapters=[adapter])
            res["gguf"][q]["merged_adapter"] = verify_gguf(Path(rec["files"][0]), Reference(base, merged=plans), q)
            rec = export(spec, work / f"ours-{q}-s", q, adapters=[adapter], mode="separate")
            ads = {a["name"]: Path(a["path"]) for a in rec["adapter_files"]}
            res["gguf"][q]["separate"] = verify_gguf(Path(rec["files"][0]), Reference(base, adapters={
                p.name: p for p in plans}), q, ads)
        res["peer_llama_cpp"][q] = verify_gguf(peer_gguf(base.path, work, q), ref, q)
        print(spec, q, f"{time.perf_counter() - t:.1f}s", json.dumps(res["gguf"][q]), json.dumps(res["peer_llama_cpp"][q]),
              flush=True)
    if with_onnx:
        from edgepeft.export import verify as V
        from edgepeft.runtimes.base import Artifact

        for q in ONNX_QUANTS:
            out = work / f"onnx-{q}"
            export(spec, out, q, fmt="onnx")
            res["onnx"][q] = {"merged_base": metrics(V.verify(Artifact(out, "onnx-genai", out, {}, q), ref,
                                                               fmt="onnx", quant=q))}
            if plans:
                out = work / f"onnx-{q}-s"
                rec = export(spec, out, q, fmt="onnx", adapters=[adapter], mode="separate")
                ads = {p.name: out / "adapters" / f"{p.name}.onnx_adapter" for p in plans}
                res["onnx"][q]["separate"] = metrics(V.verify(Artifact(out, "onnx-genai", out, ads, q), Reference(
                    base, adapters={p.name: p for p in plans}), fmt="onnx", quant=q))
            print(spec, "onnx", q, json.dumps(res["onnx"][q]), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bases", default="smollm2-135m,tiny")
    ap.add_argument("--onnx", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/verify_bounds.json"))
    args = ap.parse_args()
    measure_all()
    results = []
    with tempfile.TemporaryDirectory(prefix="edgepeft-bounds-") as d:
        work = Path(d)
        for spec in args.bases.split(","):
            if spec == "tiny":
                from conftest import make_tiny
                from lora_factory import make_lora

                from edgepeft.models import resolve_base

                tok = work / "tok"
                if not tok.exists():
                    resolve_base("smollm2-135m").load_tokenizer().save_pretrained(tok)
                for arch in ("llama", "qwen2"):
                    folder = make_tiny(arch, work / f"tiny-{arch}", tok)
                    ad = make_lora(folder, work / f"rs-{arch}", seed=2, r=4, alpha=8, b_std=0.3, use_rslora=True)
                    sub = work / arch
                    sub.mkdir()
                    results.append({**run_base(str(folder), sub, args.onnx, ad), "base": f"tiny-{arch}"})
            else:
                sub = work / spec
                sub.mkdir()
                results.append(run_base(spec, sub, args.onnx, None))
            shutil.rmtree(work / spec, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
