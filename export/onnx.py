"""``edgepeft export --format onnx``: onnxruntime-genai folders, merged or with swappable adapters.

- ``--mode merged`` (cpu/cuda): surgery merges the adapters into an HF folder, the
  onnxruntime-genai model builder (called as a library) turns it into ``model.onnx`` +
  ``genai_config.json`` + tokenizer, int4/int8 as MatMulNBits with the block size and
  accuracy level passed through.
- ``--mode separate``: the builder emits the base with LoRA MatMuls on the union of the
  adapters' targets, :mod:`onnx_adapters` turns their weights into overridable inputs with a
  rank-0 default, and each adapter becomes one ``adapters/<name>.onnx_adapter``.
- ``--target qnn-htp``: see :mod:`qnn`.

Every export ends by running the artifact under ONNX Runtime and the PyTorch reference on
the same fixed prompts; the max |Δlogit| and top-1 agreement go into the result record and
the sidecar manifest ``edgepeft-onnx.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from edgepeft import atomic
from edgepeft.errors import ConfigError, EdgepeftError, IntegrityError
from edgepeft.export import ExportResult
from edgepeft.keys import ADAPTER_SUFFIX_ONNX
from edgepeft.keys import ONNX_SIDECAR as MANIFEST
from edgepeft.ui import stage

ADAPTER_DIR = "adapters"

# which --quant each --target can run: the builder's precision per execution provider.
# fp16 on CPU is left out: ORT's CPU kernels for GroupQueryAttention/MatMul are fp32.
QUANT_TARGETS = {
    "cpu": ("int4", "int8", "fp32"),
    "cuda": ("int4", "int8", "fp16", "fp32"),
    "qnn-htp": ("int8",),  # QDQ: uint8 weights, uint16 activations (see qnn.py)
}
BUILDER_EP = {"cpu": "cpu", "cuda": "cuda"}

# verification: what "the artifact matches PyTorch" means per quant: (max |Δlogit|, min top-1 agreement,
# min mean cosine of centred logit rows). Quantized builds are judged on the cosine: top-1 flips on
# near-ties of tiny random models, while a broken graph (wrong transpose, lost adapter) drops it near 0.
TOLERANCE = {"fp32": (1e-3, 0.99, 0.999), "fp16": (5e-2, 0.95, 0.99), "int8": (None, 0.0, 0.98),
             "int4": (None, 0.0, 0.85)}

PROMPTS = (
    "Parse this order: Ines wants 7 large green lamps shipped to Oslo.",
    "The tower is 324 metres tall, about the same height as an 81-storey building.",
    "def fibonacci(n):\n    if n < 2:\n        return n",
)


def check_request(req) -> None:
    """Refuse what cannot work before anything is built (no partial output)."""
    allowed = QUANT_TARGETS[req.target]
    if req.quant not in allowed:
        raise ConfigError("--quant", req.quant, f"for --target {req.target}: {', '.join(allowed)}")
    if req.target != "qnn-htp" and req.device:
        raise EdgepeftError(f"--device {req.device} is only used with --target qnn-htp", "Drop --device")


def export(req) -> ExportResult:
    check_request(req)
    if req.target == "qnn-htp":
        from edgepeft.export import qnn

        return qnn.export(req)
    from edgepeft.models import resolve_base

    base = resolve_base(req.base)
    if base.arch.onnx_refusal:
        raise EdgepeftError(f"ONNX export of {base.model_type} is not supported: {base.arch.onnx_refusal}",
                            "Export GGUF instead (edgepeft export --format gguf)")
    base.require_tokenizer()
    plans = load_plans(req, base)
    t0 = time.perf_counter()
    with atomic.atomic_dir(req.out) as tmp, tempfile.TemporaryDirectory(prefix="edgepeft-onnx-") as work:
        work = Path(work)
        if req.mode == "merged":
            record = _export_merged(req, base, plans, tmp, work)
        else:
            record = _export_separate(req, base, plans, tmp, work)
        record["build_s"] = round(time.perf_counter() - t0, 2)
        record["bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        atomic.write_json(tmp / MANIFEST, record)
    record["files"] = [str(req.out / f) for f in record["files"]] + [str(req.out / MANIFEST)]
    return ExportResult.of(record)


def load_plans(req, base) -> list:
    from edgepeft.export.adapter import load_adapters

    plans = load_adapters(req.adapters, base, req.names or None, force=req.force, allow_pickle=req.allow_pickle)
    if req.prune:
        try:
            from edgepeft.export.prune import prune
        except ImportError as e:
            raise EdgepeftError("--prune needs edgepeft.export.prune, which is not installed",
                                "Update edgepeft or drop --prune") from e
        plans = [prune(p, req.prune, base=base) for p in plans]
    return plans


# ------------------------------------------------------------------ merged
def _export_merged(req, base, plans, out: Path, work: Path) -> dict:
    hf = base.path
    merge_info = None
    build = partial(build_genai, quant=req.quant, ep=BUILDER_EP[req.target], block_size=req.block_size,
                    accuracy_level=req.accuracy_level, cache=work / "cache", extra=_algo(req))
    if plans and req.merge_into == "auto":
        hf, merge_info = _merge_auto(req, base, plans, work, build)
        shutil.copytree(work / "built" / merge_info["target"], out, dirs_exist_ok=True)
    else:
        if plans:
            from edgepeft.export.merge import merge_into_folder

            with stage(f"merge into the {req.merge_into} base"):
                hf = merge_into_folder(base, plans, work / "merged", target=req.merge_into)
            merge_info = {"target": req.merge_into}
        build(hf, out)
    record = _record(req, base, plans, out)
    record["merge"] = merge_info
    if req.verify:
        with stage("verify in onnxruntime against PyTorch"):
            record["verify"] = _skip_reason(req) or verify_merged(out, hf, req.quant)
    return record


def _skip_reason(req) -> dict | None:
    # a cuda build runs fp16/GQA kernels the CPU EP lacks; check it where it can run, not here
    import onnxruntime as ort

    if req.target == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": "no CUDA execution provider on this machine; run `edgepeft bench` on the target",
                "passed": None}
    return None


def _merge_auto(req, base, plans, work: Path, build) -> tuple[Path, dict]:
    """--merge-into auto: build both merge targets at the requested quant, keep the lower held-out loss in ORT."""
    from edgepeft.calib import calibration_pairs, completion_nll
    from edgepeft.export.merge import choose_merge_target

    tok = base.load_tokenizer()
    pairs = calibration_pairs(tok, req.calib)

    def evaluate(folder: Path) -> float:
        built = work / "built" / folder.name  # choose_merge_target names the folders by target
        build(folder, built)
        with stage(f"held-out loss in onnxruntime ({len(pairs)} calibration pairs)"):
            return completion_nll(OrtLM(built).logits, tok, pairs)

    hf = work / "merged"
    chosen, losses = choose_merge_target(base, plans, evaluate, keep=hf)
    return hf, {"target": chosen, "auto": {"chosen": chosen, "losses": losses, "calib_pairs": len(pairs),
                                           "scored_in": f"onnxruntime {req.quant}"}}


# ------------------------------------------------------------------ separate
def _export_separate(req, base, plans, out: Path, work: Path) -> dict:
    from edgepeft.export import onnx_adapters as oa

    targets = sorted({t for p in plans for t in p.modules})
    slot_adapter = _slot_adapter(base, targets, work / "slots")
    extra = {"adapter_path": str(slot_adapter), **_algo(req)}
    if req.quant in ("int4", "int8"):  # keep LoRA matmuls float: the rank axis must stay dynamic
        extra["nodes_to_exclude"] = ",".join(oa.builder_node(p, ab) for t in targets for p in oa.split_target(t)
                                             for ab in "AB")
    build_genai(base.path, out, quant=req.quant, ep=BUILDER_EP[req.target], block_size=req.block_size,
                accuracy_level=req.accuracy_level, cache=work / "cache", extra=extra)
    slots = oa.make_lora_inputs(out / oa.MODEL_FILE)
    (out / ADAPTER_DIR).mkdir()
    record = _record(req, base, plans, out)
    for plan, entry in zip(plans, record["adapters"]):
        rel = f"{ADAPTER_DIR}/{plan.name}{ADAPTER_SUFFIX_ONNX}"
        with stage(f"write adapter {rel}"):
            params = oa.plan_parameters(plan, slots)
            with atomic.atomic_path(out / rel) as tmp:
                oa.write_onnx_adapter(params, tmp)
            oa.check_onnx_adapter_fits(out, out / rel)  # read back what was written
        entry["file"] = rel
        record["files"].append(rel)
    record["slots"] = len(slots) // 2
    if req.verify:
        with stage("verify in onnxruntime against PyTorch (each adapter, then none)"):
            record["verify"] = _skip_reason(req) or verify_separate(out, base, plans, req.quant)
    return record


def _slot_adapter(base, targets: list[str], folder: Path) -> Path:
    """A rank-1 PEFT adapter on ``targets``: it only makes the builder emit the LoRA MatMuls.

    Its values never ship: the rewrite replaces them with rank-0 defaults.
    """
    import torch
    from safetensors.torch import save_file

    shapes = {t.name: t.shape for t in base.tensors()}
    tensors = {}
    for target in targets:
        out_f, in_f = shapes[target + ".weight"]
        tensors[f"base_model.model.{target}.lora_A.weight"] = torch.zeros(1, in_f)
        tensors[f"base_model.model.{target}.lora_B.weight"] = torch.zeros(out_f, 1)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0,
           "target_modules": targets, "bias": "none", "base_model_name_or_path": str(base.path)}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


# ------------------------------------------------------------------ builder
def _algo(req) -> dict:
    return {"algo_config": req.quant_algo} if req.quant in ("int4", "int8") else {}


def build_genai(hf_dir: Path, out: Path, *, quant: str, ep: str, block_size: int, accuracy_level: int,
                cache: Path, extra: dict | None = None) -> None:
    """Run onnxruntime-genai's model builder as a library (its CLI --help crashes on Python 3.11)."""
    from edgepeft.ui import STATE

    opts = {"hf_token": "false", "block_size": block_size, "accuracy_level": accuracy_level, **(extra or {})}
    kv = [f"{k}={v}" for k, v in opts.items()]
    what = "build + quantize" if quant in ("int4", "int8") else "build"
    try:
        # the builder prints progress to stdout, which must stay data under --json
        with stage(f"{what} {quant} ONNX (onnxruntime-genai builder)"), _quiet(not STATE.debug):
            from onnxruntime_genai.models.builder import create_model, parse_extra_options

            parsed = parse_extra_options(None, str(hf_dir), str(out), quant, ep, str(cache), kv)
            create_model(None, str(hf_dir), str(out), quant, ep, str(cache), **parsed)
    except (ValueError, NotImplementedError) as e:
        raise EdgepeftError(f"onnxruntime-genai's builder refused {quant} for {ep}: {e}",
                            f"Pick another --quant; allowed for {ep}: {', '.join(QUANT_TARGETS[ep])}") from e
    for f in ("model.onnx", "genai_config.json"):
        if not (out / f).is_file():
            raise IntegrityError(f"the ONNX builder did not write {f}", "Rerun with --debug to see its output")


_DEVNULL = None


@contextlib.contextmanager
def _quiet(quiet: bool):
    if not quiet:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    # never closed: loggers created inside keep a handle on it
    global _DEVNULL
    _DEVNULL = _DEVNULL or open(os.devnull, "w")  # noqa: SIM115
    with contextlib.redirect_stdout(_DEVNULL), contextlib.redirect_stderr(_DEVNULL):
        yield


def _record(req, base, plans, out: Path) -> dict:
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    return {
        "format": "onnx",
        "mode": req.mode,
        "quant": req.quant,
        "target": req.target,
        "block_size": req.block_size if req.quant in ("int4", "int8") else None,
        "accuracy_level": req.accuracy_level if req.quant in ("int4", "int8") else None,
        "quant_algo": req.quant_algo if req.quant in ("int4", "int8") else None,
        "runtime": "onnxruntime-genai",
        "base": {"spec": base.record_spec(req.out / MANIFEST), "fingerprint": base.fingerprint},
        "adapters": [{"name": p.name, "adapter_sha256": p.adapter_sha256, "base_fingerprint": p.base_fingerprint,
                      "modules": len(p.modules), "ranks": sorted(set(p.ranks.values())),
                      "pruned": p.prune_report is not None} for p in plans],
        "files": files,
    }


# ------------------------------------------------------------------ verification
class OrtLM:
    """model.onnx from the builder under plain ONNX Runtime: full-sequence logits from an empty KV cache."""

    def __init__(self, model_dir: Path, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), so, providers=list(providers))
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values")]
        dec = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
        self.kv_shape = (1, dec["num_key_value_heads"], 0, dec["head_size"])  # empty cache: prefill from scratch

    def logits(self, ids, adapter=None):
        import numpy as np
        import onnxruntime as ort

        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for p in self.past:
            dtype = np.float16 if "float16" in p.type else np.float32
            feeds[p.name] = np.zeros(self.kv_shape, dtype)
        ro = ort.RunOptions()
        if adapter is not None:
            ro.add_active_adapter(adapter)
        return self.session.run(["logits"], feeds, ro)[0][0].astype(np.float32)


def load_lora_adapter(path: Path):
    """An ``ort.LoraAdapter`` for RunOptions.add_active_adapter (one load, swapped per run)."""
    import onnxruntime as ort

    from edgepeft.security import check_onnx_adapter

    check_onnx_adapter(Path(path))
    a = ort.LoraAdapter()
    a.Load(str(path))
    return a


def prompt_ids(tokenizer, prompts=PROMPTS) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in prompts]


def compare(ort_logits: list, ref_logits: list) -> dict:
    import numpy as np

    diff = max(float(np.abs(a - b).max()) for a, b in zip(ort_logits, ref_logits))
    agree = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ort_logits, ref_logits)])
    cos = np.concatenate([_row_cosine(a, b) for a, b in zip(ort_logits, ref_logits)])
    return {"max_abs_diff": diff, "top1_agreement": float(agree.mean()), "logit_cosine": float(cos.mean()),
            "positions": int(agree.size)}


def _row_cosine(a, b):
    import numpy as np

    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def _judge(stats: dict, quant: str, what: str) -> dict:
    atol, top1, cos = TOLERANCE[quant]
    ok = ((atol is None or stats["max_abs_diff"] <= atol) and stats["top1_agreement"] >= top1
          and stats["logit_cosine"] >= cos)
    stats.update({"tolerance": {"max_abs_diff": atol, "top1_agreement": top1, "logit_cosine": cos}, "passed": ok})
    if not ok:
        raise IntegrityError(f"ONNX export failed its check against PyTorch ({what}): max |Δlogit| "
                             f"{stats['max_abs_diff']:.3g}, top-1 agreement {stats['top1_agreement']:.2f}, "
                             f"logit cosine {stats['logit_cosine']:.3f}",
                             "Rerun with --debug and report it; --no-verify skips the check")
    return stats


def torch_logits(model, ids_list) -> list:
    import torch

    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in ids_list]


def verify_merged(out: Path, hf_dir: Path, quant: str) -> dict:
    """ORT (the written folder) vs PyTorch fp32 (the HF folder it was built from)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = prompt_ids(AutoTokenizer.from_pretrained(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ref = torch_logits(model, ids)
    del model
    lm = OrtLM(out)
    stats = compare([lm.logits(i) for i in ids], ref)
    return _judge(stats, quant, "merged")


def verify_separate(out: Path, base, plans, quant: str) -> dict:
    """Per adapter, ORT with the adapter active vs PyTorch base + ΔW; then no adapter vs the base."""
    model = base.load_model().eval()
    ids = prompt_ids(base.load_tokenizer())
    lm = OrtLM(out)
    results = {}
    for plan in plans:
        with applied(model, plan):
            ref = torch_logits(model, ids)
        adapter = load_lora_adapter(out / ADAPTER_DIR / f"{plan.name}.onnx_adapter")
        results[plan.name] = _judge(compare([lm.logits(i, adapter) for i in ids], ref), quant, plan.name)
    results["(none)"] = _judge(compare([lm.logits(i) for i in ids], torch_logits(model, ids)), quant, "no adapter")
    worst = max(results.values(), key=lambda s: s["max_abs_diff"])
    return {"max_abs_diff": worst["max_abs_diff"], "top1_agreement": min(s["top1_agreement"] for s in results.values()),
            "logit_cosine": min(s["logit_cosine"] for s in results.values()), "passed": True, "per_adapter": results}


@contextlib.contextmanager
def applied(model, plan):
    """Temporarily add each module's ΔW to ``model``'s weights (fp32), restoring them after."""
    import torch

    params = dict(model.named_parameters())
    saved = {}
    with torch.no_grad():
        for target, mod in plan.modules.items():
            w = params[target + ".weight"]
            saved[target] = w.detach().clone()
            w.add_(mod.delta().to(w.dtype))
    try:
        yield model
    finally:
        with torch.no_grad():
            for target, w0 in saved.items():
                params[target + ".weight"].copy_(w0)
