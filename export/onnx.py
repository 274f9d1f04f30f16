"""``edgepeft export --format onnx``: onnxruntime-genai folders, merged or with swappable adapters.

- ``--mode merged`` (cpu/cuda): surgery merges the adapters into an HF folder, the
  onnxruntime-genai model builder (called as a library) turns it into ``model.onnx`` +
  ``genai_config.json`` + tokenizer, int4/int8 as MatMulNBits with the block size and
  accuracy level passed through.
- ``--mode separate``: the builder emits the base with LoRA MatMuls on the union of the
  adapters' targets, :mod:`onnx_adapters` turns their weights into overridable inputs with a
  rank-0 default, and each adapter becomes one ``adapters/<name>.onnx_adapter``.
- ``--target qnn-htp``: see :mod:`qnn`.

Every export ends with the one verifier (``export/verify.py``): the folder in onnxruntime-genai
against the PyTorch fp32 reference, judged by the tolerance table (``export/tolerances.py``);
each metric, its bound and the verdict go into the result record and the sidecar manifest
``edgepeft-onnx.json``, and a miss raises ``VerificationError`` before the folder is renamed into place.
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
from edgepeft.export.quantize import regrid_note
from edgepeft.export.verify import Reference
from edgepeft.keys import ADAPTER_SUFFIX_ONNX
from edgepeft.keys import ONNX_SIDECAR as MANIFEST
from edgepeft.ui import info, stage

ADAPTER_DIR = "adapters"

# which --quant each --target can run: the builder's precision per execution provider.
# fp16 on CPU is left out: ORT's CPU kernels for GroupQueryAttention/MatMul are fp32.
QUANT_TARGETS = {
    "cpu": ("int4", "int8", "fp32"),
    "cuda": ("int4", "int8", "fp16", "fp32"),
    "qnn-htp": ("int8",),  # QDQ: uint8 weights, uint16 activations (see qnn.py)
}
BUILDER_EP = {"cpu": "cpu", "cuda": "cuda"}

MODEL_FILE = "model.onnx"


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
    req = resolve_quant_algo(req, base)
    note = regrid_note(base.origin_quant, "onnx", req.quant, req.mode, req.quant_algo)
    if note:
        info(note)
    if req.verify and _skip_reason(req) is None:
        from edgepeft.export.verify import prestart

        prestart(base.model_type)  # the PyTorch child's imports run beside the build; the check then starts warm
    choice = None  # what --merge-into auto scores, selected (its data hash-checked) before --out is touched
    if req.mode == "merged" and req.merge_into == "auto" and plans:
        from edgepeft.calib import MergeChoice

        choice = MergeChoice.for_request(req, base.load_tokenizer())
    t0 = time.perf_counter()
    with atomic.atomic_dir(req.out) as tmp, tempfile.TemporaryDirectory(prefix="edgepeft-onnx-") as work:
        work = Path(work)
        if req.mode == "merged":
            record = _export_merged(req, base, plans, tmp, work, choice)
        else:
            record = _export_separate(req, base, plans, tmp, work)
        record["build_s"] = round(time.perf_counter() - t0, 2)
        record["bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        atomic.write_json(tmp / MANIFEST, record)
    record["files"] = [str(req.out / f) for f in record["files"]] + [str(req.out / MANIFEST)]
    return ExportResult.of(record)


def resolve_quant_algo(req, base):
    """``--quant-algo auto`` -> the algorithm measured best for this export, with one status line; any other
    value is returned as asked. Measured on smollm2-135m (a Q4_1 GGUF base) with two adapters trained by the
    quickstart's recipe, int4, 100 held-out examples and wikitext-2 text no calibration saw
    (``benchmarks/results/onnx_gptq.json``; PyTorch fp32 demo 96 % / chat 94 %):
    - separate, on a base from a 4-bit GGUF: ``source_grid`` keeps the base exactly (demo 97 %, ppl +1.0 %,
      where ``k_quant_last`` is 72 % / +27 % and ``gptq_last`` 95 % / +11 %);
    - merged, with the task's data (``--calib``, or a training run's data): ``gptq_mixed``, GPTQ with llama.cpp's
      Q4_K_M choice of MatMuls at int8 (demo 96 %, chat 93 %, ppl +6.3 % / +4.4 %, +10 % bytes, 0.90x decode;
      ``gptq_last`` 96 % / 93 % at +14.3 % / +11.5 %, ``k_quant_last`` 94 % / 89 % at +19.8 % / +10.7 %), at 2.6x
      the build time;
    - otherwise ``k_quant_last``, the builder's data-free k-quant (GPTQ on generic text alone is not measured)."""
    import dataclasses

    if req.quant_algo != "auto":
        return req
    from edgepeft.export.onnx_grid import keeps_source_grid

    algo, why = "k_quant_last", None
    if req.quant == "int4" and req.mode == "separate" and req.block_size == 32 and keeps_source_grid(base.origin_quant):
        algo, why = "source_grid", f"the base's own {base.origin_quant.upper()} grid, kept exactly"
    elif req.quant == "int4" and req.mode == "merged" and req.adapters:
        from edgepeft.calib import select_calibration

        try:
            found = select_calibration(req, base.load_tokenizer(), say=lambda _line: None)
        except EdgepeftError:  # the run's data moved or changed: no task data to calibrate on
            found = None
        if found is not None and found.kind != "bundled":
            algo, why = "gptq_mixed", f"GPTQ on {found.source} plus generic text, Q4_K_M's int8 layers"
    if why:
        info(f"--quant-algo auto: {algo} ({why})")
    return dataclasses.replace(req, quant_algo=algo)


def load_plans(req, base) -> list:
    from edgepeft.export.adapter import load_adapters

    plans = load_adapters(req.adapters, base, req.names or None, force=req.force, allow_pickle=req.allow_pickle)
    if req.prune:
        from edgepeft.export.prune import prune_plans

        plans = prune_plans(plans, req.prune, base=base, calib=req.calib)
    return plans


# ------------------------------------------------------------------ merged
def _export_merged(req, base, plans, out: Path, work: Path, choice) -> dict:
    hf = base.path
    merge_info = None
    calibrated = {}  # the calibration used by a GPTQ build (--quant-algo gptq*), for the record
    build = partial(_build, req, base, work, calibrated)
    if plans and req.merge_into == "auto":
        hf, merge_info = _merge_auto(req, base, plans, work, build, choice)
        shutil.copytree(work / "built" / merge_info["target"], out, dirs_exist_ok=True)
    else:
        if plans:
            from edgepeft.export.merge import merge_into_folder

            with stage(f"merge into the {req.merge_into} base"):
                hf = merge_into_folder(base, plans, work / "merged", target=req.merge_into)
            merge_info = {"target": req.merge_into}
        build(hf, out)
    record = _record(req, base, plans, out)
    record.update(calibrated)
    record["merge"] = merge_info
    target = (merge_info or {}).get("target", "original")
    _verify(req, record, out, {}, Reference(base, merged=plans, merge_target=target, tasks=_tasks(req, base, plans)))
    return record


def _tasks(req, base, plans) -> dict:
    """The verifier's task examples (``verify.task_pairs``); none when the export is not verified."""
    if not req.verify or _skip_reason(req):
        return {}
    from edgepeft.export.verify import task_pairs

    return task_pairs(req, base, plans)


def _verify(req, record: dict, out: Path, adapters: dict, reference) -> None:
    """The one verifier on the staged folder (onnxruntime-genai, as bench runs it); a miss raises."""
    from edgepeft.export import verify as V
    from edgepeft.runtimes.base import Artifact

    names = [None, *adapters]
    reason = "--no-verify" if not req.verify else _skip_reason(req)
    if reason:
        V.attach(record, [V.skipped(reason, "onnxruntime-genai", MODEL_FILE, n) for n in names])
        return
    with stage("verify in onnxruntime-genai against PyTorch" + (" (base, then each adapter)" if adapters else "")):
        records = V.verify(Artifact(out, "onnx-genai", out, adapters, req.quant), reference, fmt="onnx",
                           quant=req.quant, label=MODEL_FILE)
    V.attach(record, records)
    V.require_passed(records, f"onnx {req.quant} {req.mode} export")


def _skip_reason(req) -> str | None:
    # a cuda build runs fp16/GQA kernels the CPU EP lacks; check it where it can run, not here
    import onnxruntime as ort

    if req.target == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return "no CUDA execution provider on this machine; run `edgepeft verify` or `edgepeft bench` on the target"
    return None


def _merge_auto(req, base, plans, work: Path, build, sets) -> tuple[Path, dict]:
    """--merge-into auto: build both merge targets at the requested quant, keep the lower held-out loss in ORT
    on ``sets`` (``edgepeft.calib.MergeChoice``: the task's data plus generic text)."""
    from edgepeft.calib import runtime_logits
    from edgepeft.export.merge import choose_merge_target

    parts: dict[str, dict] = {}

    def evaluate(folder: Path) -> dict[str, float]:
        from edgepeft.runtimes.base import Artifact, get_runtime

        built = work / "built" / folder.name  # choose_merge_target names the folders by target
        build(folder, built)
        with stage(f"held-out loss in onnxruntime ({sets.describe()})"):
            rt = get_runtime("onnxruntime")
            rt.load(Artifact(built, "onnx-genai", built, {}, req.quant), None, n_ctx=264)
            try:
                parts[folder.name] = sets.losses(runtime_logits(rt))
                return parts[folder.name]
            finally:
                rt.close()

    hf = work / "merged"
    chosen, losses = choose_merge_target(base, plans, evaluate, keep=hf)
    return hf, {"target": chosen, "auto": {"chosen": chosen, "losses": losses, "parts": parts,
                                           "calib_pairs": len(sets.task.pairs) if sets.task else 0,
                                           "sets": sets.record(), "scored_in": f"onnxruntime {req.quant}"}}


# ------------------------------------------------------------------ separate
def _export_separate(req, base, plans, out: Path, work: Path) -> dict:
    from edgepeft.export import onnx_adapters as oa

    targets = sorted({t for p in plans for t in p.modules})
    slot_adapter = _slot_adapter(base, targets, work / "slots")
    extra = {"adapter_path": str(slot_adapter), **_algo(req)}
    if req.quant in ("int4", "int8"):  # keep LoRA matmuls float: the rank axis must stay dynamic
        extra["nodes_to_exclude"] = ",".join(oa.builder_node(p, ab) for t in targets for p in oa.split_target(t)
                                             for ab in "AB")
    calibrated = {}
    if is_calibrated(req):  # GPTQ on an fp32 build, calibrated with each adapter active in turn
        from edgepeft.export import onnx_calib

        fp32 = work / "fp32"
        build_genai(base.path, fp32, quant="fp32", ep=BUILDER_EP[req.target], block_size=req.block_size,
                    accuracy_level=req.accuracy_level, cache=work / "cache", extra={"adapter_path": str(slot_adapter)})
        slots = oa.make_lora_inputs(fp32 / oa.MODEL_FILE)
        calibrated = onnx_calib.quantize_folder(req, base, fp32, out, [oa.plan_parameters(p, slots) for p in plans])
    else:
        build_genai(base.path, out, quant=req.quant, ep=BUILDER_EP[req.target], block_size=req.block_size,
                    accuracy_level=req.accuracy_level, cache=work / "cache", extra=extra)
        if req.quant_algo == "source_grid":
            calibrated = _land_on_grid(base, out / oa.MODEL_FILE)
        slots = oa.make_lora_inputs(out / oa.MODEL_FILE)
    (out / ADAPTER_DIR).mkdir()
    record = _record(req, base, plans, out)
    record.update(calibrated)
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
    _verify(req, record, out, {p.name: out / e["file"] for p, e in zip(plans, record["adapters"])},
            Reference(base, adapters={p.name: p for p in plans}, tasks=_tasks(req, base, plans)))
    return record


def _land_on_grid(base, model: Path) -> dict:
    """--quant-algo source_grid: the base's MatMulNBits back on its GGUF source's 4-bit grid (onnx_grid.py)."""
    from edgepeft.export import onnx_grid

    with stage("put int4 weights on the source's 4-bit grid"):
        stats = onnx_grid.land_on_grid(model, onnx_grid.base_weights(base))
    share = stats["blocks"] / max(stats["blocks_total"], 1)
    info(f"source grid: {stats['blocks']}/{stats['blocks_total']} blocks ({share:.1%}) of {stats['tensors']} "
         f"tensors kept exactly; the rest keep the builder's k-quant")
    return {"source_grid": {**stats, "share": round(share, 6)}}


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
    # source_grid starts from the builder's k_quant_last (lm_head at 8 bits, off-grid blocks) and rewrites it
    algo = "k_quant_last" if req.quant_algo == "source_grid" else req.quant_algo
    return {"algo_config": algo} if req.quant in ("int4", "int8") and not is_calibrated(req) else {}


def is_calibrated(req) -> bool:
    """--quant int4 --quant-algo gptq*: ONNX Runtime's GPTQ on calibration data (onnx_calib.py)."""
    return req.quant == "int4" and req.quant_algo.startswith("gptq")


def _build(req, base, work: Path, calibrated: dict, hf_dir: Path, out: Path) -> None:
    """One merged build at the requested quant: the builder's own (RTN/k-quant), or an fp32 build that
    GPTQ quantizes with the calibration data (``calibrated`` gets its record entries)."""
    ep = BUILDER_EP[req.target]
    if not is_calibrated(req):
        build_genai(hf_dir, out, quant=req.quant, ep=ep, block_size=req.block_size,
                    accuracy_level=req.accuracy_level, cache=work / "cache", extra=_algo(req))
        return
    from edgepeft.export import onnx_calib

    fp32 = work / "fp32" / out.name
    build_genai(hf_dir, fp32, quant="fp32", ep=ep, block_size=req.block_size, accuracy_level=req.accuracy_level,
                cache=work / "cache")
    calibrated.update(onnx_calib.quantize_folder(req, base, fp32, out))
    shutil.rmtree(fp32)


def build_genai(hf_dir: Path, out: Path, *, quant: str, ep: str, block_size: int, accuracy_level: int,
                cache: Path, extra: dict | None = None) -> None:
    """Run onnxruntime-genai's model builder as a library (its CLI --help crashes on Python 3.11)."""
    from edgepeft.ui import STATE

    # windowed_kv_cache=false: sliding-window layers (Gemma 3) keep a full-length KV cache and apply
    # the window as GroupQueryAttention's local_window_size mask. The windowed layout needs a cache
    # of window capacity from the first step, which plain onnxruntime's loop (runtimes/ort.py: the
    # history grows from empty, as on QNN) cannot feed; no effect on models without sliding layers.
    opts = {"hf_token": "false", "block_size": block_size, "accuracy_level": accuracy_level,
            "windowed_kv_cache": "false", **(extra or {})}
    kv = [f"{k}={v}" for k, v in opts.items()]
    what = "build + quantize" if quant in ("int4", "int8") else "build"
    try:
        # the builder prints progress to stdout, which must stay data under --json
        with stage(f"{what} {quant} ONNX (onnxruntime-genai builder)"), _quiet(not STATE.debug), chunked_k_quant():
            from onnxruntime_genai.models.builder import create_model, parse_extra_options

            parsed = parse_extra_options(None, str(hf_dir), str(out), quant, ep, str(cache), kv)
            builder_config(parsed["hf_details"]["hf_config"])
            create_model(None, str(hf_dir), str(out), quant, ep, str(cache), **parsed)
    except (ValueError, NotImplementedError) as e:
        raise EdgepeftError(f"onnxruntime-genai's builder refused {quant} for {ep}: {e}",
                            f"Pick another --quant; allowed for {ep}: {', '.join(QUANT_TARGETS[ep])}") from e
    for f in ("model.onnx", "genai_config.json"):
        if not (out / f).is_file():
            raise IntegrityError(f"the ONNX builder did not write {f}", "Rerun with --debug to see its output")


def builder_config(config) -> None:
    """Give the builder the config fields it reads where transformers 5 moved them (in place).

    transformers 5 nests Gemma 3's rope per attention kind (``rope_parameters = {"full_attention":
    {...}, "sliding_attention": {...}}``); onnxruntime-genai 0.18's Gemma3 builder reads the flat
    form (``rope_parameters["rope_type"]``, KeyError otherwise) and the local base from
    transformers 4's ``rope_local_base_freq``. Same values, the old places.
    """
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        local = rope.get("sliding_attention") or rope["full_attention"]
        config.rope_local_base_freq = local["rope_theta"]
        config.rope_parameters = dict(rope["full_attention"])


# weights per call of ORT's k-quant: matrices up to this size go to it whole (every body MatMul of the
# supported models), larger ones in row chunks. 4M weights keep its ~20 temporaries near 16 MiB each.
K_QUANT_CHUNK = 1 << 22


def k_quant_threads() -> int:
    """Threads for ORT's k-quant: the cores this process may run on. Its numpy reductions release the GIL:
    2 threads quantized a 1536 x 576 matrix in 0.10-0.12 s where one call took 0.18-0.20 (2-core EPYC)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def k_quant_in_chunks(k_quant, data, num_bits: int = 4, group_size: int = 32, chunk: int | None = None,
                      threads: int | None = None):
    """ORT's ``quant_tensor_k_quant_*(data, num_bits, group_size)`` on row chunks of ``data``, same result.

    ``data`` is a MatMul weight transposed (N output rows x K inputs, K padded to whole groups). ORT's
    k-quant reshapes it into groups of ``group_size`` consecutive inputs of one output row and picks each
    group's scale and minimum from that group alone, so quantizing rows in chunks gives the same bytes
    as one call. One call on Gemma 3's tied 262144 x 640 lm_head held ~20 arrays of that size (a
    +5.5 GB peak, 10 GB for the quickstart's int4 build). The chunks (at least one per thread) run on
    ``threads`` threads (:func:`k_quant_threads`), each writing its rows into the result, so at most that
    many chunks' temporaries exist at once. Returns ``(q_weight, scale, zero_point)`` shaped as ORT's,
    with the quantized levels as uint8 (ORT returns float64 integers; its caller casts them to uint8 at once).
    """
    import numpy as np

    threads = threads or k_quant_threads()
    rows, cols = data.shape if data.ndim == 2 else (0, 0)
    step = max(1, (chunk or K_QUANT_CHUNK) // max(cols, 1))
    if threads > 1 and rows > 1:
        step = min(step, -(-rows // threads))
    if rows <= step or cols % group_size:
        return k_quant(data, num_bits, group_size)
    per_row = cols // group_size
    _, s_1, z_1 = k_quant(data[:1], num_bits, group_size)  # one row: the result's dtypes and trailing shapes
    q = np.empty((rows * per_row, group_size), dtype=np.uint8)
    scale = np.empty((rows * per_row, *s_1.shape[1:]), dtype=s_1.dtype)
    zp = np.empty((rows * per_row, *z_1.shape[1:]), dtype=z_1.dtype)

    def one(r):
        q_c, s_c, z_c = k_quant(data[r:r + step], num_bits, group_size)
        sl = slice(r * per_row, r * per_row + len(q_c))
        q[sl], scale[sl], zp[sl] = q_c, s_c, z_c

    starts = range(0, rows, step)
    if threads == 1:
        for r in starts:
            one(r)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, starts))  # re-raises a chunk's error
    return q, scale, zp


@contextlib.contextmanager
def chunked_k_quant():
    """While the builder runs, ORT's k-quant (the builder's ``k_quant*`` algorithms) goes through
    :func:`k_quant_in_chunks`: the same quantized bytes, a fraction of the memory on large matrices.

    ``rtn_quantize`` calls ``quant_tensor_k_quant_cuda`` (CuPy when present, else its CPU twin) by its
    module-global name; that name is what is swapped, and restored afterwards. An onnxruntime without
    it leaves the builder's quantizer as it is.
    """
    from onnxruntime.quantization.neural_compressor import weight_only as W

    name = "quant_tensor_k_quant_cuda"
    original = getattr(W, name, None)
    if original is None:
        yield
        return
    setattr(W, name, partial(k_quant_in_chunks, original))
    try:
        yield
    finally:
        setattr(W, name, original)


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


# ------------------------------------------------------------------ inspect
def is_onnx_export(p: Path) -> bool:
    return p.is_dir() and ((p / MANIFEST).is_file() or (p / "genai_config.json").is_file())


def describe_onnx(p: Path) -> dict:
    """What an ONNX export folder holds: the manifest, adapter slots, and each adapter's fit."""
    from edgepeft.export import onnx_adapters as oa

    manifest = json.loads((p / MANIFEST).read_text()) if (p / MANIFEST).is_file() else {}
    info = {"kind": "onnx", "path": str(p), **{k: manifest.get(k) for k in ("mode", "quant", "target", "base")}}
    if (p / oa.MODEL_FILE).is_file():
        slots = oa.model_slots(p)
        info["adapter_slots"] = len(slots) // 2
        info["adapters"] = {}
        for f in sorted((p / ADAPTER_DIR).glob("*" + oa.ADAPTER_SUFFIX)) if slots else []:
            fit = oa.check_onnx_adapter_fits(p, f)  # raises, naming the tensor, if it does not fit
            info["adapters"][f.name] = {"modules": fit["modules"], "ranks": sorted(set(fit["ranks"].values()))}
    if manifest.get("qnn"):
        info["qnn"] = {k: manifest["qnn"][k] for k in ("soc_model", "htp_arch", "prefill_len", "cache_len")}
    info["total_bytes"] = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return info
