"""``edgepeft export --format gguf``: merged or separate GGUF files that run unchanged in llama.cpp.

Pipeline: resolve the base, load (and prune) the adapters into :class:`AdapterPlan` s, then

- merged: W' = W + s·B·A (surgery's ``merged_tensors``), streamed into one GGUF;
- separate: the base GGUF plus one LoRA GGUF per adapter, laid out exactly as llama.cpp's
  ``convert_lora_to_gguf.py`` writes them (``<tensor>.lora_a`` (r, in), ``<tensor>.lora_b``
  (out, r) with the Q/K row permutation, one ``adapter.lora.alpha`` per file).

Block quantizations run llama.cpp's own quantizer over an F32/F16 intermediate written to a
temp file in ``--out``, weighted by an importance matrix of the model being quantized on the task's
own data (edgepeft/imatrix.py; the data from ``edgepeft.calib.select_calibration``), which is written
beside the model as ``<model>.imatrix.gguf`` for ``llama-quantize --imatrix``. The tokenizer (read through transformers) resolves in a child process
meanwhile and its keys are added after quantizing (``gguf_tokenizer.TokenizerJob``). Every file carries ``edgepeft.*`` metadata (base fingerprint,
adapter hash and name, settings) so ``edgepeft.fit.check_gguf_pair`` can refuse an adapter made for
another base of the same shape, which llama.cpp itself would load silently. Every export ends
by running the artifact in llama.cpp against the PyTorch reference (``export/verify.py``); a miss of
its bound (``export/tolerances.py``) raises ``VerificationError`` and no file lands under a final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from edgepeft import __version__, atomic
from edgepeft.archs import Arch
from edgepeft.calib import MergeChoice
from edgepeft.errors import EdgepeftError
from edgepeft.export import ExportResult
from edgepeft.export import gguf_tensors as gt
from edgepeft.export.plan import AdapterPlan
from edgepeft.export.quantize import get_quant, quantize, regrid_note, relands_source_grid
from edgepeft.export.verify import Reference
from edgepeft.keys import ADAPTER_SUFFIX_GGUF, GGUF_RECORD, IMATRIX_SUFFIX, EdgepeftKeys
from edgepeft.paths import to_record
from edgepeft.train.manifest import training_summary
from edgepeft.ui import info, stage

ADAPTER_TYPES = ("f16", "q8_0", "f32")


# --- entry point -----------------------------------------------------------------------------

def export(req) -> ExportResult:
    """Run one GGUF export described by an ``ExportRequest``; return what it wrote."""
    from edgepeft.models import resolve_base

    t0 = time.perf_counter()
    quant = get_quant(req.quant)
    if req.adapter_type not in ADAPTER_TYPES:
        raise EdgepeftError(f"--adapter-type {req.adapter_type!r} is not a GGUF adapter type",
                            f"Allowed: {', '.join(ADAPTER_TYPES)}")
    base = resolve_base(req.base)
    arch = base.arch  # refuses unsupported architectures with the supported list
    base.require_tokenizer()
    if not (base.path / "tokenizer.json").is_file():
        raise EdgepeftError(f"base {req.base} has no tokenizer.json (GGUF export embeds the tokenizer)",
                            "Save the fast tokenizer next to the weights: tokenizer.save_pretrained(folder)")
    from edgepeft.export.gguf_tokenizer import tokenizer_job

    plans = _load_plans(req, base)  # before --out is created or a child starts: a bad adapter is one quick error
    note = regrid_note(base.origin_quant, "gguf", quant.name, req.mode)
    if note:
        info(note)
    matrix_reads_run = quant.imatrix != "none" and req.imatrix == "auto"
    if req.verify or matrix_reads_run:
        from edgepeft.export.verify import prestart

        prestart(base.model_type)  # the PyTorch child imports torch while this process reads the tokenizer and calibration data
    # what --merge-into auto scores, selected (and its data hash-checked) before --out is touched
    choice = (MergeChoice.for_request(req, base.load_tokenizer(), " --imatrix none" if matrix_reads_run else "")
              if req.mode == "merged" and req.merge_into == "auto" and plans else None)
    imx = _matrix_plan(req, base, plans, quant)  # so is a training-data hash mismatch
    with tokenizer_job(base.path):  # resolving the tokenizer starts now; write_model picks it up
        return ExportResult.of(_export_checked(req, base, arch, quant, t0, plans, imx, choice))


def _export_checked(req, base, arch, quant, t0: float, plans, imx, choice) -> dict:
    created = not Path(req.out).exists()
    out = atomic.ensure_writable_dir(req.out)
    try:
        return _export_staged(req, base, plans, quant, arch, out, t0, imx, choice)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed export (its check included) does not leave the folder it created
        raise


def _export_staged(req, base, plans, quant, arch, out: Path, t0: float, imx, choice) -> dict:
    _check_free_space(out, base, quant.name, req.mode)
    # Every file of the set is written and verified in a staging dir inside --out, then renamed
    # into place: a kill or a failed parity check leaves no file under a final name.
    stage = Path(tempfile.mkdtemp(prefix=atomic.TMP_PREFIX + "stage-", dir=out))
    try:
        record = _export_into(req, base, plans, quant, arch, stage, imx, choice)
        finals = []
        for f in record["files"]:
            final = out / Path(f).name
            atomic.publish(Path(f), final)
            finals.append(str(final))
        if record["imatrix"].get("path"):
            final = out / Path(record["imatrix"]["path"]).name
            atomic.publish(Path(record["imatrix"]["path"]), final)
            record["imatrix"]["path"] = str(final)
        for a in record.get("adapter_files", []):
            a["path"] = str(out / Path(a["path"]).name)
        record["files"] = finals
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    record["peak_rss_mb"] = _peak_rss_mb()
    atomic.write_json(out / GGUF_RECORD, stored_record(record, out / GGUF_RECORD, base))
    return record


def stored_record(record: dict, record_file: Path, base) -> dict:
    """The record as gguf-export.json stores it: every path relative to that file (the returned record
    keeps the paths as the caller can open them)."""
    stored = {**record, "base": base.record_spec(record_file), "files": [to_record(f, record_file) for f in record["files"]],
              "adapters": [{**a, "source": to_record(a["source"], record_file) if a.get("source") else None}
                           for a in record.get("adapters", [])]}
    if record.get("imatrix", {}).get("path"):
        stored["imatrix"] = {**record["imatrix"], "path": to_record(record["imatrix"]["path"], record_file)}
    if "adapter_files" in record:
        stored["adapter_files"] = [{**a, "path": to_record(a["path"], record_file)} for a in record["adapter_files"]]
    return stored


def _export_into(req, base, plans, quant, arch, out: Path, imx: MatrixPlan, choice: MergeChoice | None) -> dict:
    record: dict = {"format": "gguf", "mode": req.mode, "quant": quant.name, "base": req.base,
                    "base_fingerprint": base.fingerprint, "architecture": arch.model_type, "files": [],
                    "adapters": [_plan_summary(p) for p in plans], "edgepeft_version": __version__,
                    "imatrix": imx.record}
    if req.keep_delta and not quant.written_directly and plans:
        from edgepeft.export import overrides

        imx.overrides, kept = overrides.choose(base, plans, quant.name, req.keep_delta)
        record["keep_delta"] = {"budget": req.keep_delta, "type": overrides.KEEP_TYPE, "kept": kept,
                                "extra_bytes": sum(k["extra_bytes"] for k in kept)}
        info(f"--keep-delta {req.keep_delta}: {len(kept)} adapter-touched weights kept at {overrides.KEEP_TYPE}")
    if req.mode == "merged":
        target = "original" if req.merge_into == "auto" else req.merge_into  # as write_merged decides it
        early = None
        if req.merge_into != "auto" or not plans:  # auto with adapters picks its target while writing
            imx.variants = [(plans, c, target) for c in imx.calibrations]
            early = _prefetch(req, quant, Reference(base, merged=plans, merge_target=target,
                                                    tasks=_tasks(req, base, plans, imx)), [None], imx, base)
        path, merge = write_merged(base, plans, out, quant.name, req.merge_into, choice, imx=imx)
        record["files"].append(str(path))
        record["merge"] = merge
        _cleanup_reference(merge)  # the reference is rebuilt from base + plans, not from the writer's merge
        from edgepeft.runtimes.base import Artifact

        _verify(req, record, Artifact(path, "gguf", path, {}, quant.name),
                early or Reference(base, merged=plans, merge_target=merge["target"],
                                   tasks=_tasks(req, base, plans, imx)))
    else:
        imx.variants = [([p], c, "original") for p, c in zip(plans, imx.calibrations, strict=False)]
        ref = _prefetch(req, quant, Reference(base, adapters={p.name: p for p in plans},
                                              tasks=_tasks(req, base, plans, imx)),
                        [None, *(p.name for p in plans)], imx, base)
        base_path = out / f"base-{quant.name}.gguf"
        base_path = write_model(base, [], base_path, quant.name, imx=imx)
        record["files"].append(str(base_path))
        record["adapter_files"] = []
        for plan in plans:
            with stage(f"write adapter {plan.name} ({req.adapter_type})"):
                apath, note = write_adapter(plan, base, out / adapter_filename(plan.name), req.adapter_type)
            record["files"].append(str(apath))
            record["adapter_files"].append({"name": plan.name, "path": str(apath), **note})
        from edgepeft.runtimes.base import Artifact

        art = Artifact(base_path, "gguf", base_path, {a["name"]: Path(a["path"]) for a in record["adapter_files"]},
                       quant.name)
        _verify(req, record, art, ref)
    return record


def _prefetch(req, quant, ref: Reference, variants, imx: MatrixPlan, base) -> Reference:
    """Start the verifier's PyTorch side now: it needs only the base and the plans, so it runs while
    the files are written. The same child collects the importance matrix first (one torch start-up)."""
    if req.verify:
        imx.job = ref.prefetch(variants, "gguf", quant.name, imatrix=imx.request(base))
    return ref


def _tasks(req, base, plans, imx: MatrixPlan) -> dict:
    """The verifier's task examples (``verify.task_pairs``), from the importance matrix's calibration where
    it has one (read and hash-checked once); none when the export is not verified."""
    if not req.verify:
        return {}
    from edgepeft.export.verify import task_pairs

    return task_pairs(req, base, plans, tokenizer=imx.tokenizer, calibrations=imx.calibrations or None)


def _verify(req, record: dict, artifact, reference) -> None:
    """Run the one verifier on the staged files; a miss raises before anything is renamed into place."""
    from edgepeft.export import verify as V

    names = [None, *artifact.adapters]
    label = artifact.model.name
    if not req.verify:
        V.attach(record, [V.skipped("--no-verify", "llama.cpp", label, n) for n in names])
        return
    what = "verify in llama.cpp against PyTorch" + (" (base, then each adapter)" if artifact.adapters else "")
    with stage(what):
        records = V.verify(artifact, reference, fmt="gguf", quant=record["quant"], label=label)
    V.attach(record, records)
    V.require_passed(records, f"gguf {record['quant']} {req.mode} export")


def adapter_filename(name: str) -> str:
    return f"{name}{ADAPTER_SUFFIX_GGUF}"


# --- adapters in, plans out --------------------------------------------------------------------

def _load_plans(req, base) -> list[AdapterPlan]:
    if not req.adapters:
        return []
    from edgepeft.export.adapter import load_adapters

    plans = load_adapters(req.adapters, base, req.names or None, force=req.force, allow_pickle=req.allow_pickle)
    if req.prune:
        from edgepeft.export.prune import prune_plans

        plans = prune_plans(plans, req.prune, base=base, calib=req.calib)
    return plans


def _plan_summary(p: AdapterPlan) -> dict:
    ranks = sorted(set(p.ranks.values()))
    return {"name": p.name, "adapter_sha256": p.adapter_sha256, "modules": len(p.modules), "ranks": ranks,
            "source": str(p.source) if p.source else None, "pruned": p.prune_report is not None}


# --- importance matrix ---------------------------------------------------------------------------

@dataclass
class MatrixPlan:
    """What the quantizer is weighted by: calibration sets chosen up front (a bad hash fails before --out
    exists), forward passes (``variants``) set once the model to quantize is known, overrides."""

    calibrations: list = field(default_factory=list)  # edgepeft.calib.Calibration, one per pass
    file: Path | None = None  # --imatrix FILE: reused as given
    record: dict = field(default_factory=dict)  # the export record's "imatrix" entry
    variants: list = field(default_factory=list)  # (plans, calibration, merge target) per forward pass
    overrides: dict = field(default_factory=dict)  # regex -> ggml type (--keep-delta)
    meta: dict = field(default_factory=dict)  # edgepeft.imatrix.* keys for the model file
    tokenizer: object = None  # the one the calibration was rendered with (loaded once)
    job: object = None  # the verifier's reference child, when it collects the matrix too (``request``)
    _request: tuple | None = None  # (base, variants, request) as last made

    def request(self, base) -> dict | None:
        """The collection request for ``base`` once ``variants`` are set; None when no matrix is collected."""
        if not self.calibrations or self.file is not None:
            return None
        from edgepeft.imatrix import matrix_request

        if self._request is None or self._request[0] is not base or self._request[1] is not self.variants:
            self._request = (base, self.variants, matrix_request(base, self.variants, self.tokenizer))
        return self._request[2]

    def build(self, base, final: Path) -> Path | None:
        """Collect (or read) the matrix, write ``<final stem>.imatrix.gguf`` beside ``final``; None when off."""
        from edgepeft import imatrix as IM
        from edgepeft.fingerprint import sha256_file

        if not self.calibrations and self.file is None:
            return None
        t0 = time.perf_counter()
        if self.file is not None:
            matrix = IM.read(self.file)
            data_sha = str(matrix.meta.get(EdgepeftKeys.IMATRIX_DATA_SHA256, "unknown"))
            source = str(matrix.meta.get(EdgepeftKeys.IMATRIX_SOURCE, f"--imatrix {self.file}"))
        else:
            data_sha = ",".join(dict.fromkeys(c.sha256 for c in self.calibrations))
            source = " + ".join(dict.fromkeys(c.source for c in self.calibrations))
            matrix = IM.collect_for_export(self.request(base), source, job=self.job)
        matrix.meta = {EdgepeftKeys.IMATRIX_DATA_SHA256: data_sha, EdgepeftKeys.IMATRIX_SOURCE: source}
        path = final.parent / (final.name.removesuffix(".gguf") + IMATRIX_SUFFIX)
        IM.write(matrix, path)
        sha = sha256_file(path)
        self.meta = {EdgepeftKeys.IMATRIX_SHA256: sha, **matrix.meta}
        self.record.update(path=str(path), sha256=sha, data_sha256=data_sha, source=source,
                           entries=len(matrix.sums), tokens=max(matrix.counts.values(), default=0), compute=matrix.compute,
                           seconds=round(time.perf_counter() - t0, 2))
        return path


def _matrix_plan(req, base, plans, quant) -> MatrixPlan:
    """Which matrix this export quantizes with (and which data), decided before anything is written."""
    if quant.imatrix == "none":
        return MatrixPlan(record={"used": False, "reason": f"{quant.name} takes no importance matrix"})
    if req.imatrix == "none":
        if quant.imatrix == "requires":
            raise EdgepeftError(f"--quant {quant.name} needs an importance matrix, and --imatrix none turns it off",
                                "Drop --imatrix none (the matrix comes from the adapter's training data, --calib, or "
                                "the bundled wikitext-2 slice)")
        info("importance matrix: off (--imatrix none)")
        return MatrixPlan(record={"used": False, "reason": "--imatrix none"})
    if req.imatrix == "auto" and req.mode == "separate" and relands_source_grid(base.origin_quant, quant.name):
        # the base's own Q4_1 blocks come back exactly with or without a matrix (benchmarks/results/imatrix_q4_1.json:
        # the same scores both ways), and the weighted Q4_1 search took 9 s of the export
        info("importance matrix: off (the base's Q4_1 source grid comes back exactly without one)")
        return MatrixPlan(record={"used": False, "reason": "q4_1 of a Q4_1 source: its grid comes back exactly"})
    if req.imatrix != "auto":
        from edgepeft.imatrix import check_matches, read

        # a bad file, or one of another model, is one line now, not a quantizer failure later
        check_matches(read(Path(req.imatrix)), base, Path(req.imatrix), required=quant.imatrix == "requires")
        return MatrixPlan(file=Path(req.imatrix), record={"used": True, "calibration": None})
    from edgepeft.calib import CalibRequest, calibration_passes, select_calibration
    from edgepeft.export.reference import LazyTokenizer
    from edgepeft.imatrix import TEXTS

    tok = LazyTokenizer(base)  # loads transformers only if the calibration needs more than plain tokenizing
    cals = [select_calibration(CalibRequest(adapters=a, calib=req.calib, calib_limit=TEXTS), tok)
            for a in calibration_passes(req, plans)]
    return MatrixPlan(calibrations=cals, record={"used": True, "calibration": [c.record() for c in cals]},
                      tokenizer=tok)


# --- model files (base or merged) --------------------------------------------------------------

def write_merged(base, plans, out: Path, quant: str, merge_into: str, sets: MergeChoice | None,
                 imx: MatrixPlan | None = None) -> tuple[Path, dict]:
    """Merge ``plans`` into ``base`` and write one GGUF. Returns (path, merge record).

    The ``auto`` choice scores both candidates quantized without a matrix, on ``sets``; the chosen one
    is then quantized with it.
    """
    name = "+".join(p.name for p in plans) or "base"
    final = out / f"{name}-merged-{quant}.gguf"
    merge = {"target": "original" if merge_into == "auto" and not plans else merge_into, "reference_folder": None}
    if merge["target"] != "auto":  # imx.variants were set before the reference child started (_export_into)
        return write_model(base, plans, final, quant, merge_target=merge["target"], merge=merge, imx=imx), merge
    from edgepeft.export.merge import choose_merge_target
    from edgepeft.models import resolve_base

    keep = Path(atomic.TMP_PREFIX + "merge")
    keep = out / keep
    parts: dict[str, dict] = {}
    chosen, losses = choose_merge_target(base, plans, _gguf_loss_evaluator(out, quant, sets, parts), keep=keep)
    merge.update(target=chosen, auto={"chosen": chosen, "losses": losses, "parts": parts,
                                      "calib_pairs": len(sets.task.pairs) if sets.task else 0,
                                      "sets": sets.record(), "scored_in": f"llama.cpp {quant}"},
                 reference_folder=keep)
    info(f"merge-into auto: {chosen} (held-out loss after {quant}, {sets.describe()}: "
         + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()) + ")")
    merged_base = resolve_base(str(keep))
    if imx is not None:
        imx.variants = [([], c, "original") for c in imx.calibrations]  # the folder holds the merge already
    path = write_model(merged_base, [], final, quant, merge=merge, fingerprint_of=base, adapters=plans, imx=imx)
    return path, merge


def _cleanup_reference(merge: dict) -> None:
    folder = merge.pop("reference_folder", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def write_model(base, plans, final: Path, quant: str, *, merge_target: str = "original", merge: dict | None = None,
                fingerprint_of=None, adapters=None, imx: MatrixPlan | None = None) -> Path:
    """Stream ``base`` (+ merged ``plans``) into ``final``; block quants go through llama.cpp's quantizer,
    with ``imx``'s importance matrix (collected on ``base`` with ``imx.variants``) and type overrides."""
    from edgepeft.export.gguf_tokenizer import copy_with_tokenizer, tokenizer_job

    q = get_quant(quant)
    with tokenizer_job(base.path) as tokenizer:  # resolves in a child while the tensors are written
        if q.written_directly:
            with atomic.atomic_path(final) as tmp:
                _write_float_gguf(base, plans, tmp, q.name, merge_target, merge, fingerprint_of, adapters,
                                  tokenizer=tokenizer)
            return final
        inter = _intermediate_type(base)
        with (atomic.atomic_path(final) as tmp, scratch_file(final.parent, ".intermediate.gguf") as itmp,
              scratch_file(final.parent, ".quantized.gguf") as qtmp):
            # the intermediate has no tokenizer yet: llama.cpp's quantizer reads none, and the
            # tokenizer job is usually still running here; nor the matrix's keys: it is written while
            # the matrix is collected (in the reference child), and the keys join the tokenizer's below
            _write_float_gguf(base, plans, itmp, inter, merge_target, merge, fingerprint_of, adapters, quant=q.name)
            matrix_file = imx.build(base, final) if imx is not None else None
            # while the tokenizer child still runs, leave it a core
            quantize(itmp, qtmp, q.name, nthread=None if tokenizer.done() else max(1, (os.cpu_count() or 1) - 1),
                     imatrix=matrix_file, overrides=imx.overrides if imx is not None else None)
            itmp.unlink()  # free its disk before the final copy
            with stage("embed the tokenizer"):
                copy_with_tokenizer(qtmp, tmp, base.path, base.config["vocab_size"], tokenizer,
                                    extra=imx.meta if imx is not None else None)
    return final


@contextlib.contextmanager
def scratch_file(directory: Path, suffix: str):
    """A temp file in ``directory`` (same disk as the result) that is removed whatever happens."""
    fd, name = tempfile.mkstemp(prefix=atomic.TMP_PREFIX, suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def _intermediate_type(base) -> str:
    dtypes = {t.dtype for t in base.tensors()}
    return "f16" if dtypes <= {"F16"} else "f32"


def _write_float_gguf(base, plans, path: Path, float_name: str, merge_target: str, merge: dict | None,
                      fingerprint_of, adapters, quant: str | None = None, tokenizer=None) -> None:
    """Stream the float GGUF; with ``tokenizer`` (a TokenizerJob) its keys are embedded, else left out."""
    import gguf

    from edgepeft.export.gguf_tokenizer import add_tokenizer

    arch: Arch = base.arch
    cfg = base.config
    float_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                  "bf16": gguf.GGMLQuantizationType.BF16}[float_name]
    file_type = gguf.LlamaFileType[get_quant(float_name).gguf_ftype]
    outs = gt.base_tensor_plan(base, arch, float_type)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gt.gguf_arch(arch)], use_temp_file=False)
    writer.add_type(gguf.GGUFType.MODEL)
    fp_base = fingerprint_of or base
    writer.add_name(Path(str(fp_base.spec)).name or str(fp_base.spec))
    gt.add_hparams(writer, cfg, arch, file_type)
    if tokenizer is not None:
        with stage("resolve the tokenizer"):
            add_tokenizer(writer, base.path, cfg["vocab_size"], tokenizer.result())
    adapters = adapters if adapters is not None else plans
    _add_common_meta(writer, "merged" if adapters else "base", fp_base, quant or float_name)
    if adapters:
        # a shipped file carries no host path: the adapters' source folders stay in gguf-export.json
        writer.add_string(EdgepeftKeys.ADAPTERS, json.dumps([{k: v for k, v in _plan_summary(p).items() if k != "source"}
                                                             for p in adapters]))
        writer.add_string(EdgepeftKeys.MERGE, json.dumps({k: v for k, v in (merge or {"target": merge_target}).items()
                                                          if k != "reference_folder"}, default=str))
        prune = [p.prune_report for p in adapters if p.prune_report]
        if prune:
            writer.add_string(EdgepeftKeys.PRUNE, json.dumps(prune, default=str))
    gt.declare(writer, outs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, values in gt.generated_tensors(cfg):
        writer.write_tensor_data(values)
    by_name = {o.hf_name: o for o in outs}
    what = "merge + write tensors" if plans or merge_target != "original" else "write tensors"
    with stage(f"{what} ({float_name})", total=len(by_name), unit="tensors") as st:
        for hf_name, w in _tensor_stream(base, plans, merge_target):
            o = by_name.get(hf_name)
            if o is not None:
                writer.write_tensor_data(gt.encode(gt.to_gguf(w, hf_name, arch, cfg), o.qtype))
                st.advance()
            del w
    writer.close()


def _tensor_stream(base, plans, target: str):
    """(hf name, tensor) one at a time, in safetensors file order (the order the GGUF declares them).

    With adapters (or the dequantized target) the surgery's merge applies per tensor (W + s·B·A,
    NaN checks, NF4 target); the result is a torch tensor. Without, a numpy array.
    """
    if plans or target != "original":
        from edgepeft.export.merge import merged_tensor_stream

        yield from merged_tensor_stream(base, plans, target, gt.ordered_entries(base))
        return
    # numpy, not torch: importing torch costs ~2 s of CPU that the tokenizer child needs
    for t in gt.ordered_entries(base):
        yield t.name, gt.from_safetensors_bytes(t.read(), t.dtype, t.shape)


def _add_common_meta(writer, mode: str, base, quant: str) -> None:
    writer.add_string(EdgepeftKeys.VERSION, __version__)
    writer.add_string(EdgepeftKeys.MODE, mode)
    writer.add_string(EdgepeftKeys.BASE_FINGERPRINT, base.fingerprint)
    writer.add_string(EdgepeftKeys.BASE_SPEC, base.record_spec())  # a shipped file names no host path
    writer.add_string(EdgepeftKeys.QUANT, quant)


# --- adapter files -------------------------------------------------------------------------------

def file_alpha(plan: AdapterPlan) -> float:
    """One alpha per file (llama.cpp's rule): the most common configured module alpha."""
    return Counter(m.alpha for m in plan.modules.values()).most_common(1)[0][0]


def fold_factor(scale: float, rank: int, alpha: float) -> float:
    """Multiplier on B so that llama.cpp's alpha/rank gives ``scale`` (rsLoRA, alpha_pattern, pruning)."""
    f = scale * rank / alpha
    return 1.0 if abs(f - 1.0) < 1e-6 else f


def write_adapter(plan: AdapterPlan, base, final: Path, adapter_type: str = "f16") -> tuple[Path, dict]:
    """One LoRA GGUF for ``plan``, laid out like convert_lora_to_gguf.py. Returns (path, notes)."""
    import gguf

    arch, cfg = base.arch, base.config
    tmap = gt.name_map(arch, cfg["num_hidden_layers"])
    want = {"f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32,
            "q8_0": gguf.GGMLQuantizationType.Q8_0}[adapter_type]
    alpha = file_alpha(plan)
    fell_back, folded = [], []
    tensors = []  # (name, encoded array, qtype)
    for target, m in plan.modules.items():
        g = gt.map_name(tmap, target + ".weight")
        f = fold_factor(m.scale, m.rank, alpha)
        b = m.b.float() * f if f != 1.0 else m.b.float()
        if f != 1.0:
            folded.append(target)
        b = gt.lora_b_to_gguf(b, target, arch, cfg)
        for suffix, t in ((".lora_a", m.a.float()), (".lora_b", b)):
            qtype = want
            if want == gguf.GGMLQuantizationType.Q8_0 and t.shape[-1] % 32:
                qtype = gguf.GGMLQuantizationType.F16  # Q8_0 blocks are 32 wide along each row
                fell_back.append(g + suffix)
            tensors.append((g + suffix, gt.encode(t, qtype), qtype))
    with atomic.atomic_path(final) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gt.gguf_arch(arch)], use_temp_file=False)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(plan.name)
        _add_common_meta(writer, "adapter", base, adapter_type)
        writer.add_string(EdgepeftKeys.ADAPTER_NAME, plan.name)
        writer.add_string(EdgepeftKeys.ADAPTER_SHA256, plan.adapter_sha256)
        writer.add_bool(EdgepeftKeys.ADAPTER_SCALE_FOLDED, bool(folded))
        if plan.prune_report:
            writer.add_string(EdgepeftKeys.PRUNE, json.dumps(plan.prune_report, default=str))
        if plan.train_summary:
            writer.add_string(EdgepeftKeys.TRAIN, json.dumps(training_summary(plan.train_summary)))
        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    note = {"alpha": alpha, "scale_folded_modules": len(folded), "f16_fallback": fell_back,
            "type": adapter_type, "bytes": final.stat().st_size}
    if fell_back:
        info(f"{plan.name}: {len(fell_back)} tensors kept in F16 (Q8_0 needs rows that are a multiple of 32)")
    return final, note


# --- load-time check ---------------------------------------------------------------------------

# --- helpers -----------------------------------------------------------------------------------

def _check_free_space(out: Path, base, quant: str, mode: str) -> None:
    """Refuse up front when --out cannot hold the intermediate plus the result (no partial files)."""
    weights = sum(t.numel for t in base.tensors())
    inter = 0 if get_quant(quant).written_directly else weights * 4
    need = int((inter + weights * 4) * 1.05)
    free = shutil.disk_usage(out).free
    if free < need:
        raise EdgepeftError(f"--out {out} has {free / 2**20:.0f} MiB free but the {mode} {quant} export needs about "
                            f"{need / 2**20:.0f} MiB", "Free some space or choose another --out")


def _gguf_loss_evaluator(out: Path, quant: str, sets: MergeChoice, parts: dict):
    """``evaluate_loss`` for choose_merge_target: quantize the merged folder as asked, score it in llama.cpp
    (each set's loss also lands in ``parts`` under the candidate's name)."""

    def evaluate(folder: Path) -> dict[str, float]:
        from edgepeft.calib import runtime_logits
        from edgepeft.models import resolve_base
        from edgepeft.runtimes.base import Artifact, get_runtime

        with scratch_file(out, ".auto-candidate.gguf") as tmp:
            write_model(resolve_base(str(folder)), [], tmp, quant)
            with stage(f"held-out loss in llama.cpp ({sets.describe()})"):
                rt = get_runtime("llama.cpp")
                rt.load(Artifact(tmp, "gguf", tmp, {}, quant), None, n_ctx=264)
                try:
                    parts[folder.name] = sets.losses(runtime_logits(rt))
                    return parts[folder.name]
                finally:
                    rt.close()

    return evaluate


def _peak_rss_mb() -> float:
    """The largest resident set of this process and its children (quantizer, tokenizer job)."""
    import resource

    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return round(peak / 1024, 1)
