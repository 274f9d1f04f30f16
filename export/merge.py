"""Merge adapters into their base: W' = W + Σ s·B·A, in fp32, written back in the base's dtype.

Two merge targets:

- ``original``: the 16/32-bit base as stored.
- ``dequantized``: every weight that QLoRA training quantized (the decoder's nn.Linear layers;
  transformers' bitsandbytes integration skips embeddings and lm_head) replaced by its NF4
  round trip through bitsandbytes (blocksize 64, double quant), i.e. the weights the adapter
  was actually trained against.

``choose_merge_target`` (``--merge-into auto``) merges both ways, lets the writer quantize
each to its target format and measure held-out loss, and keeps the better one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from edgepeft import atomic
from edgepeft.errors import EdgepeftError, MismatchError
from edgepeft.export.plan import AdapterPlan
from edgepeft.keys import FINGERPRINT_MEMO, MERGE_RECORD, SOURCE_RECORD
from edgepeft.models import ResolvedBase
from edgepeft.ui import stage

MERGE_TARGETS = ("original", "dequantized")
NF4_BLOCKSIZE = 64  # bitsandbytes Params4bit default, what BitsAndBytesConfig(load_in_4bit=True) trains against
# Files of ours in a cached base folder that must not travel into a merged copy.
_SKIP_FILES = {FINGERPRINT_MEMO, SOURCE_RECORD, MERGE_RECORD}


def is_nf4_quantized(name: str, shape: tuple) -> bool:
    """Would BitsAndBytesConfig(load_in_4bit=True) have quantized this tensor? (decoder Linear weights)"""
    leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return name.endswith(".weight") and len(shape) == 2 and leaf not in ("lm_head", "embed_tokens")


def nf4_round_trip(w):
    """W -> NF4 (blocksize 64, double-quantized absmax) -> fp32, exactly as QLoRA training sees it."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(w.float().contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=True,
                                  quant_type="nf4")
    return bnbf.dequantize_4bit(q, state).float()


def nf4_mismatch(plans: Iterable[AdapterPlan]) -> str | None:
    """Why ``dequantized`` would not reproduce an adapter's training weights (None: it does).

    Training manifests record ``quantization``; NF4 (4-bit, blocksize 64, double quant) computed
    through bitsandbytes' fp32 dequantize kernel (``cpu_kernel``, see edgepeft/train/kernels.py; CUDA
    runs record none) is the only scheme reproduced here. Adapters without a manifest are assumed
    QLoRA NF4.
    """
    from edgepeft.train.kernels import CPU_4BIT_PATH

    for plan in plans:
        q = plan.train_summary.get("quantization")
        if not isinstance(q, dict):
            continue
        if not (q.get("bits") == 4 and q.get("quant_type", "nf4") == "nf4"
                and q.get("block_size", NF4_BLOCKSIZE) == NF4_BLOCKSIZE):
            kind = q.get("quant_type") or q.get("dtype") or q.get("method")
            return f"adapter {plan.name} was trained on a {q.get('bits')}-bit ({kind}) base, not NF4"
        if q.get("cpu_kernel", CPU_4BIT_PATH) != CPU_4BIT_PATH:
            return (f"adapter {plan.name} was trained through the {q['cpu_kernel']!r} 4-bit CPU kernel, "
                    f"not {CPU_4BIT_PATH!r}")
    return None


def merged_tensors(base: ResolvedBase, plans: Iterable[AdapterPlan], target: str = "original",
                   ) -> Iterator[tuple[Path, dict]]:
    """Yield (base weight file, {name: merged tensor in the base dtype}) one file at a time."""
    from safetensors import safe_open

    merge = _Merger(plans, target)
    for wf in base.weight_files:
        with safe_open(str(wf), "pt") as f:
            out = {name: merge(name, f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118
        yield wf, out
    merge.check_all_found(base)


def merged_tensor_stream(base: ResolvedBase, plans: Iterable[AdapterPlan], target: str, entries) -> Iterator[tuple]:
    """Yield (name, merged tensor) one at a time, for the float safetensors ``entries`` in the order given.

    For writers that stream (GGUF): with plain reads rather than a whole shard through
    safetensors' mmap, at most one tensor and its merge are resident, not a shard plus its copy.
    """
    import torch

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    merge = _Merger(plans, target)
    for t in entries:
        yield t.name, merge(t.name, torch.frombuffer(t.read(), dtype=dtypes[t.dtype]).reshape(t.shape))
    merge.check_all_found(base)


class _Merger:
    """W -> W + Σ s·B·A (fp32, back to W's dtype) for the weights ``plans`` touch; others pass through."""

    def __init__(self, plans: Iterable[AdapterPlan], target: str):
        if target not in MERGE_TARGETS:
            raise EdgepeftError(f"--merge-into {target!r} is not a merge target",
                                f"Use one of: {', '.join(MERGE_TARGETS)}")
        plans = list(plans)
        if target == "dequantized" and (why := nf4_mismatch(plans)):
            raise EdgepeftError(f"--merge-into dequantized reproduces NF4 training weights, but {why}",
                                "Use --merge-into original")
        self.target = target
        self.deltas = _deltas_by_weight(plans)
        self.found: set[str] = set()

    def touches(self, name: str, shape) -> bool:
        return name in self.deltas or (self.target == "dequantized" and is_nf4_quantized(name, tuple(shape)))

    def __call__(self, name: str, w):
        import torch

        if not self.touches(name, w.shape):
            return w
        nf4 = self.target == "dequantized" and is_nf4_quantized(name, tuple(w.shape))
        w32 = nf4_round_trip(w) if nf4 else w.float()
        for _plan, module in self.deltas.get(name, ()):
            w32 = w32 + module.delta()
            self.found.add(name)
        if not torch.isfinite(w32).all():
            who = ", ".join(p.name for p, _ in self.deltas.get(name, ())) or "no adapter"
            raise EdgepeftError(f"merging into {name.removesuffix('.weight')} gives NaN/Inf (adapter {who})",
                                "The adapter (or its scale) is broken; check its training loss, or export it "
                                "with --mode separate")
        return w32.to(w.dtype)

    def check_all_found(self, base: ResolvedBase) -> None:
        missing = sorted(set(self.deltas) - self.found)
        if missing:
            raise MismatchError(f"base {base.spec} has no tensor {missing[0]} to merge into",
                                "Pass the base the adapter was trained on")


@contextlib.contextmanager
def merged_in_place(model, plans: Iterable[AdapterPlan], target: str = "original"):
    """``model`` (a transformers model holding the base's weights) with ``plans`` merged for the block, as
    the export merges them (:class:`_Merger`), and every touched weight restored after it. The importance
    matrix and ``--prune auto``'s scorer run merged variants this way, on one loaded model."""
    import torch

    merger = _Merger(plans, target)
    params = dict(model.named_parameters(remove_duplicate=False))
    saved = {}
    try:
        with torch.no_grad():
            for name, w in params.items():
                if merger.touches(name, w.shape) and name not in saved:
                    saved[name] = w.detach().clone()
                    w.copy_(merger(name, w.detach()))
        yield model
    finally:
        with torch.no_grad():
            for name, w0 in saved.items():
                params[name].copy_(w0)


def merged_state_dict(base: ResolvedBase, plans: Iterable[AdapterPlan], target: str = "original") -> dict:
    """The whole merged model as one state dict (base dtype). For small models and tests."""
    sd = {}
    for _, tensors in merged_tensors(base, plans, target):
        sd.update(tensors)
    return sd


def merge_into_folder(base: ResolvedBase, plans: Iterable[AdapterPlan], out_dir, target: str = "original") -> Path:
    """Write a complete Hugging Face folder (config, tokenizer, safetensors in the base dtype) for the merged model.

    The base's file layout is kept (same shard names, same index), so the folder loads with
    ``from_pretrained`` and converts with any HF -> GGUF/ONNX tool. Written atomically.
    """
    from safetensors.torch import save_file

    plans = list(plans)
    out_dir = Path(out_dir)
    with atomic.atomic_dir(out_dir) as tmp:
        for wf, tensors in merged_tensors(base, plans, target):
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / wf.name), metadata={"format": "pt"})
        for src in base.path.iterdir():
            if src.is_file() and src.suffix != ".safetensors" and src.name not in _SKIP_FILES:
                shutil.copy2(src, tmp / src.name)
        _clean_config(tmp / "config.json")
        atomic.write_json(tmp / MERGE_RECORD, {
            "target": target,
            "base": base.spec,
            "base_fingerprint": base.fingerprint,
            "adapters": [{"name": p.name, "adapter_sha256": p.adapter_sha256, "ranks": p.ranks,
                          "pruned": p.prune_report is not None} for p in plans],
        })
    return out_dir


def _clean_config(path: Path) -> None:
    # a base loaded from a quantized checkpoint must not tell loaders the merged weights are quantized
    cfg = json.loads(path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(cfg, indent=2) + "\n")


def _deltas_by_weight(plans: list[AdapterPlan]) -> dict[str, list]:
    deltas: dict[str, list] = {}
    for plan in plans:
        for target, module in plan.modules.items():
            deltas.setdefault(target + ".weight", []).append((plan, module))
    return deltas


# --- --merge-into auto -------------------------------------------------------------------------

def choose_merge_target(base: ResolvedBase, plans: Iterable[AdapterPlan],
                        evaluate_loss: Callable[[Path], float | Mapping[str, float]],
                        *, keep: Path | None = None) -> tuple[str, dict[str, float]]:
    """Merge into both targets, score each with ``evaluate_loss(merged_hf_folder)``, keep the lower loss.

    The writer supplies ``evaluate_loss``: quantize the folder to its target format and return
    held-out loss (``edgepeft.calib.MergeChoice``: one mean NLL per set, task and generic text, summed
    here), so the choice accounts for the second quantization. With ``keep``, the winning merged folder
    is moved there (saving a third merge) and its record holds the parts. Ties go to ``dequantized``,
    the weights the adapter was trained against.
    """
    plans = list(plans)
    losses: dict[str, float] = {}
    parts: dict[str, dict[str, float]] = {}
    work = Path(tempfile.mkdtemp(prefix="edgepeft-merge-auto-"))
    try:
        # a non-NF4 training base has no "dequantized" candidate: original is the only one
        candidates = ("original",) if nf4_mismatch(plans) else ("dequantized", "original")
        for target in candidates:
            with stage(f"merge-into auto: build and score the {target} base") as st:
                with stage(f"merge into the {target} base"):
                    folder = merge_into_folder(base, plans, work / target, target=target)
                atomic.fault_point(f"merge-auto:built:{target}")
                got = evaluate_loss(folder)
                if isinstance(got, Mapping):
                    parts[target] = {k: float(v) for k, v in got.items()}
                losses[target] = float(sum(got.values())) if isinstance(got, Mapping) else float(got)
                st.update(note=f"held-out loss {losses[target]:.4f}")
        chosen = min(candidates, key=lambda t: (losses[t], t != "dequantized"))
        if keep is not None:
            keep = Path(keep)
            if keep.exists():
                shutil.rmtree(keep)
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(work / chosen), str(keep))
            record = keep / MERGE_RECORD
            data = json.loads(record.read_text())
            data["auto"] = {"chosen": chosen, "losses": losses, **({"parts": parts} if parts else {})}
            atomic.write_json(record, data)
        return chosen, losses
    finally:
        shutil.rmtree(work, ignore_errors=True)


def torch_loss_evaluator(pairs: list[tuple[str, str]] | None = None, max_len: int = 256) -> Callable[[Path], float]:
    """A default ``evaluate_loss`` for choose_merge_target: fp32 PyTorch, no second quantization.
    Writers wrap their own (quantize, then score in their runtime); ``pairs`` defaults to the demo eval split."""

    def evaluate(folder: Path) -> float:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from edgepeft.calib import completion_nll, demo_calibration, torch_logits

        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        return completion_nll(torch_logits(model), tok, pairs if pairs is not None else demo_calibration(tok), max_len)

    return evaluate
