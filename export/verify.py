"""One verifier for every artifact: the runtime bench uses vs the PyTorch fp32 reference.

Any :class:`~edgepeft.runtimes.base.Artifact` (GGUF file or export folder, ONNX folder, QNN
static graphs, bundle) is loaded in the first runtime ``FORMAT_RUNTIMES`` lists for its
format, the same ``runtimes.Runtime`` implementation ``edgepeft bench`` measures. It sees
the same token ids as the PyTorch fp32 model of the base with the adapters applied as the
export applied them, computed layer by layer from the base's safetensors
(:mod:`edgepeft.export.reference`: one decoder layer in fp32 at a time, never the whole model)
in a child process while the runtime runs (an export starts it before writing: ``Reference.prefetch``).
Both sides are reduced at once to what the checks read (top-1 per position, summed NLL, and
the full logit rows only where max |Δlogit| is bounded).

Per model variant (the base, then each adapter; or the merged model) the checks are:

- ``tokenizer_agreement``: the runtime's own tokenizer gives the Hugging Face ids on each
  fixed prompt (a wrong embedded pre-tokenizer or vocab shows here, never in the logits);
- ``top1_agreement`` over every position of the fixed prompts and the held-out text;
- ``max_abs_logit_diff`` on the fixed prompts (float types);
- ``ppl_ratio``: artifact perplexity / reference perplexity on a held-out text the package
  carries (``edgepeft/data/wikitext2-valid-slice.txt``);
- ``task_kept``: of the adapter's own examples that PyTorch gets exactly right (:func:`task_pairs`:
  ``--calib``, else its training run's data; none for a base alone or without task data), the
  share the artifact gets right too, teacher-forced, so one forward per example. The fixed texts
  cannot see a quantization that keeps general text and loses the fine-tune (the builder's
  ``k_quant_mixed`` merged: demo 91 -> 53 % with every other check passed; task_kept 0.50). The
  record's ``task`` entry also holds the top-1 agreement over the completion tokens.
- ``adapter_kept``: of the fixed positions where the adapter changes PyTorch's top-1 token, the share where
  the artifact picks the adapter's token rather than the token of the model without it (for a merged
  artifact the reference also runs without its merged adapters, ``BARE``; for a separate adapter that is
  the base variant). Judged where at least ``ADAPTER_MIN_POSITIONS`` positions decide. The other checks
  cannot see an adapter that vanished at 4 bits: a writer that dropped the demo adapter from a merged
  Q4_K_M of smollm2-135m passed top-1 (0.87, bound 0.5) and ppl; adapter_kept 0.093. An adapter only half
  rounded away (merged at q4_1 onto its base's own Q4_1 grid: 0.473) stays inside the lossy bound; the task
  check sees that one.

Which of them apply, and their bounds, come from :mod:`edgepeft.export.tolerances`. Records
follow the shared verification record (``passed``, ``runtime``, ``reference``, ``artifact``,
``adapter``, ``checks``). :func:`require_passed` turns a failed one into a
:class:`~edgepeft.errors.VerificationError`.
"""

from __future__ import annotations

import atexit
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import edgepeft
from edgepeft.errors import VerificationError
from edgepeft.export.tolerances import Bounds, bounds_for

if TYPE_CHECKING:
    from edgepeft.export.plan import AdapterPlan
    from edgepeft.models import ResolvedBase
    from edgepeft.runtimes.base import Artifact

REFERENCE = "pytorch-fp32"
PROMPTS = (
    "The capital of France is Paris. The capital of Italy is Rome, and the capital of Spain is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Parse this order: Ana wants 3 small red lamps shipped to Oslo by Friday, order 12345.",
    "In 1969, Apollo 11 landed on the Moon; 600 million people watched the broadcast live on TV.",
)
HELD_OUT = Path(edgepeft.__file__).parent / "data" / "wikitext2-valid-slice.txt"  # the package carries it
# held-out positions: 2 x 64 tokens. 64 is the QNN static prefill length, so every sequence is one
# prefill in every runtime; 128 positions put the perplexity ratio's run-to-run spread for a fixed
# artifact at 0 (deterministic) and its spread across legitimate quants well inside the bounds.
HELD_OUT_CHUNK = 64
HELD_OUT_CHUNKS = 2


@dataclass
class Reference:
    """What the artifact must reproduce: ``base`` in fp32 with ``merged`` folded into every variant
    (into ``merge_target``), and ``adapters`` by name for the artifact's swappable adapters."""

    base: ResolvedBase
    merged: list[AdapterPlan] = field(default_factory=list)
    merge_target: str = "original"
    adapters: dict[str, AdapterPlan] = field(default_factory=dict)
    tasks: dict[str | None, list[tuple[str, str]]] = field(default_factory=dict)  # variant -> task pairs (task_pairs)
    _job: _Job | None = field(default=None, init=False, repr=False, compare=False)

    def prefetch(self, variants: Sequence[str | None], fmt: str, quant: str, imatrix: dict | None = None) -> _Job:
        """Start computing the reference now, in a child process: an export overlaps it with writing the artifact.

        ``imatrix`` (``edgepeft.imatrix.matrix_request`` on this base): the same child first collects that
        importance matrix (``_Job.matrix``), so the export starts one torch process, not two."""
        self._job = _Job(self, list(variants), _keep_rows(bounds_for(fmt, quant, self.base.model_type)),
                         imatrix=imatrix)
        return self._job

    def job(self, variants: Sequence[str | None], keep_rows: bool) -> _Job:
        """The running (or finished) computation for ``variants``; started here unless prefetched."""
        if self._job is None or (self._job.variants, self._job.keep_rows) != (list(variants), keep_rows):
            if self._job is not None:
                self._job.close()
            self._job = _Job(self, list(variants), keep_rows)
        return self._job


def _keep_rows(b: Bounds) -> bool:
    return b.max_abs_logit is not None  # full logit rows only where max |Δlogit| is bounded


# ------------------------------------------------------------------ token ids
def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def held_out_ids(tokenizer) -> list[list[int]]:
    with HELD_OUT.open(encoding="utf-8") as f:
        toks = _ids(tokenizer, f.read(4096))  # ~1000 tokens; more than the chunks need
    n = HELD_OUT_CHUNK
    return [toks[i * n: (i + 1) * n] for i in range(HELD_OUT_CHUNKS) if len(toks) >= (i + 1) * n]


# ------------------------------------------------------------------ the task: the adapter's own examples
# examples per adapter, teacher-forced (one forward each). Each costs its positions on both sides: 16 demo examples
# (~1400 positions) added 7-10 s to a 20 s smollm2-135m Q4_K_M export, so 8
TASK_EXAMPLES = 8
TASK_MIN_LEARNED = 4  # examples PyTorch must get right before task_kept is judged
TASK_MAX_LEN = 256  # as edgepeft.calib.completion_nll
TASK_KINDS = ("run-held-out", "run-sample", "file")  # a task's data; the bundled wikitext slice is none


def task_pairs(req, base: ResolvedBase, plans: Sequence[AdapterPlan], tokenizer=None, calibrations=None,
               ) -> dict[str | None, list]:
    """Variant -> the (prompt, completion) pairs its task check runs: each adapter's own data (separate mode,
    keyed by its name), or every adapter's (merged: the model, keyed None), as ``edgepeft.calib.select_calibration``
    picks it (``--calib``, else a training run's recorded data). None without task data (the bundled text).

    ``calibrations``: the export's already selected ones, one per pass in the same order (the importance
    matrix's: ``export.gguf.MatrixPlan``), so the data is read and hash-checked once."""
    if not plans:
        return {}
    keys = [p.name for p in plans] if req.mode == "separate" else [None]
    if calibrations is None:
        if not req.calib and not any(_is_run(p.source) for p in plans):
            return {}  # before the tokenizer loads (2.3 CPU-s on smollm2-135m): a PEFT folder brings no task data
        from edgepeft.calib import CalibRequest, calibration_passes, select_calibration

        tokenizer = tokenizer or base.load_tokenizer()
        calibrations = [select_calibration(CalibRequest(adapters=a, calib=req.calib, calib_limit=TASK_EXAMPLES),
                                           tokenizer, say=lambda _: None) for a in calibration_passes(req, plans)]
    out = {}
    for key, cal in zip(keys, calibrations, strict=False):
        pairs = [(p, c) for p, c in cal.pairs if c.strip()][:TASK_EXAMPLES]
        if cal.kind in TASK_KINDS and pairs:
            out[key] = pairs
    return out


def _is_run(source) -> bool:
    """Whether ``source`` (an adapter's path) is a training run whose manifest records its data."""
    if not source:
        return False
    from edgepeft.train.manifest import read_manifest

    return isinstance(read_manifest(Path(source)).get("data"), dict)


def task_ids(tokenizer, pairs) -> list[tuple[list[int], int]]:
    """(prompt + completion ids, prompt length) per pair; pairs with no completion position left are dropped."""
    out = []
    for prompt, completion in pairs:
        p_ids = _ids(tokenizer, prompt) if prompt else []
        ids = (p_ids + _ids(tokenizer, completion))[:TASK_MAX_LEN]
        n_ctx = max(len(p_ids), 1)  # the first token has no prediction
        if len(ids) > n_ctx:
            out.append((ids, n_ctx))
    return out


def _task_metrics(got: list, ref: list, task: list) -> dict:
    """The task check's values over the variant's task examples, teacher-forced (an example is right when every
    completion token is the top-1, which is what greedy decoding of its prompt gives).

    ``task_kept``: of the examples PyTorch gets right (those the fine-tune learned), the share the artifact gets
    right too; only where PyTorch gets at least TASK_MIN_LEARNED right (an untrained adapter or a random model
    has no task to keep). The ``task`` entry adds top-1 agreement over the completion positions and exact match
    on each side."""
    agree = total = same = 0
    ref_right, art_right = [], []
    for (ids, n_ctx), g, r in zip(task, got, ref, strict=True):
        pos = np.arange(n_ctx - 1, len(ids) - 1)
        target = np.asarray(ids)[pos + 1]
        hit = g.argmax[pos] == r.argmax[pos]
        agree, total, same = agree + int(hit.sum()), total + len(pos), same + int(hit.all())
        ref_right.append(bool((r.argmax[pos] == target).all()))
        art_right.append(bool((g.argmax[pos] == target).all()))
    n = max(len(task), 1)
    learned = sum(ref_right)
    kept = sum(a and r for a, r in zip(art_right, ref_right))
    info = {"examples": len(task), "positions": total, "top1_agreement": round(agree / max(total, 1), 4),
            "examples_agreeing": same, "learned": learned, "kept": kept,
            "exact_match": {"reference": round(learned / n, 4), "artifact": round(sum(art_right) / n, 4)}}
    out = {"task": info}
    if learned >= TASK_MIN_LEARNED:
        out["task_kept"] = kept / learned
    return out


# the fixed positions the adapter check needs before it judges (an adapter that barely moves the top-1 token
# on the fixed texts, like a fresh LoRA with B = 0, has nothing to keep there)
ADAPTER_MIN_POSITIONS = 8
BARE = "\0without merged adapters"  # the reference variant a merged artifact's adapter check compares with


def _adapter_metrics(got: list, with_adapter: list, without: list) -> dict:
    """``adapter_kept`` (see the module docstring) and ``adapter_positions``, the positions that decided it."""
    kept = lost = 0
    for g, w, o in zip(got, with_adapter, without, strict=True):
        moved = w.argmax != o.argmax
        kept += int((g.argmax == w.argmax)[moved].sum())
        lost += int((g.argmax == o.argmax)[moved].sum())
    out = {"adapter_positions": kept + lost}
    if kept + lost >= ADAPTER_MIN_POSITIONS:
        out["adapter_kept"] = kept / (kept + lost)
    return out


def _negated(plan: AdapterPlan) -> AdapterPlan:
    """``plan`` with every module's ΔW negated: added to the merged reference's weights, the base they went into."""
    from dataclasses import replace

    return replace(plan, modules={t: replace(m, scale=-m.scale) for t, m in plan.modules.items()})


# ------------------------------------------------------------------ PyTorch reference (export/reference.py)
_RUNNING: set[_Job] = set()
_WARM: list[tuple] = []  # (process, its stderr log): a reference child prestart() started, not yet given a request


@atexit.register
def _stop_running() -> None:  # a failed export leaves no reference child behind
    for job in list(_RUNNING):
        job.close()
    while _WARM:
        _stop(*_WARM.pop())


def prestart(model_type: str | None = None) -> None:
    """Start the reference child now, before its request exists; the next ``_Job`` sends it the request.

    Its imports (torch, transformers, and ``model_type``'s modeling code: 5-6 CPU-s, the whole of a small
    model's start-up) then run beside this process's own preparation (the base, the tokenizer, the calibration
    data, the first tensors) instead of after it. Call it once the request is known to be valid: an export
    that stops earlier kills the child at exit."""
    if not _WARM:
        _WARM.append(_spawn("-", *([model_type] if model_type else [])))


def _spawn(request: str, *extra: str) -> tuple:
    """``python -m edgepeft.export.reference REQUEST`` ('-': read the request's path from stdin later,
    after importing what ``extra``, a model type, needs)."""
    import subprocess
    import sys
    import tempfile

    from edgepeft.ui import STATE

    log = None if STATE.debug else tempfile.TemporaryFile()  # noqa: SIM115 -- closed by _Job.close or _stop
    proc = subprocess.Popen([sys.executable, "-m", "edgepeft.export.reference", request, *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    return proc, log


def _stop(proc, log) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        pipe.close()
    if log is not None:
        log.close()


class _Job:
    """The reference in a child process (``python -m edgepeft.export.reference``): it tokenizes the
    fixed texts, sends the ids, then computes SeqStats per variant and sends them.

    A process, not a thread: importing transformers, loading the tokenizer and building the model
    are mostly Python, and in a thread they took turns on the GIL with the writer (measured: the
    tokenizer took 25 s beside a 5 s tensor write under load). This process never needs torch or
    the Hugging Face tokenizer for the check: the child sends the ids.
    """

    def __init__(self, ref: Reference | None, variants: list, keep_rows: bool, imatrix: dict | None = None):
        """The reference of ``ref`` for ``variants``, after the importance matrix of ``imatrix`` where given;
        without ``ref``, the matrix alone (``edgepeft.imatrix.collect_for_export``)."""
        import pickle
        import tempfile

        self.variants, self.keep_rows = variants, keep_rows
        self._inputs = self._stats = self._matrix = None
        self._has_matrix, self._matrix_only = imatrix is not None, ref is None
        request = {"imatrix": imatrix}
        if ref is not None:
            adapters, child = dict(ref.adapters), list(variants)
            if ref.merged and None in variants:  # the adapter check's other side (the merged artifact's)
                adapters[BARE], child = [_negated(p) for p in ref.merged], [*child, BARE]
            request.update(base=ref.base, merged=ref.merged, merge_target=ref.merge_target, adapters=adapters,
                           variants=child, keep_rows=keep_rows,
                           tasks={v: t for v, t in ref.tasks.items() if v in variants})
        with tempfile.NamedTemporaryFile(prefix="edgepeft-reference-", suffix=".pickle", delete=False) as f:
            # a file, not stdin: plans can be large and the child unpickles them only after importing torch
            pickle.dump(request, f)
        self._request = Path(f.name)
        self.proc = self._log = None
        while _WARM and self.proc is None:  # a child prestart() started: it waits for this path on stdin
            proc, log = _WARM.pop()
            try:
                proc.stdin.write(f"{self._request}\n".encode())
                proc.stdin.flush()
                self.proc, self._log = proc, log
            except (BrokenPipeError, OSError):  # it died while importing: start a fresh one
                _stop(proc, log)
        if self.proc is None:
            self.proc, self._log = _spawn(str(self._request))
        _RUNNING.add(self)

    def _receive(self):
        import pickle

        try:
            msg = pickle.load(self.proc.stdout)  # pickle-ok: own child process (its stdout pipe)
        except EOFError:
            self.proc.wait()
            err = b""
            if self._log is not None:
                self._log.seek(0)
                err = self._log.read()
            lines = err.decode(errors="replace").strip().splitlines()
            self.close()
            raise RuntimeError("the PyTorch reference process ended without a result (exit status "
                               f"{self.proc.returncode}): {lines[-1] if lines else 'no output'}") from None
        if msg[0] == "error":
            self.close()
            _, kind, problem, fix = msg
            from edgepeft import errors

            cls = getattr(errors, kind, None)
            if isinstance(cls, type) and issubclass(cls, errors.EdgepeftError) and kind != "VerificationError":
                try:
                    raise cls(problem, fix)
                except TypeError:
                    pass
                raise errors.EdgepeftError(problem, fix)
            raise RuntimeError(f"the PyTorch reference failed: {kind}: {problem}")
        return msg[1:]

    def inputs(self):
        """(prompt ids, held-out ids, the tokenizer's BOS id) once the child has tokenized."""
        if self._inputs is None:
            if self._has_matrix:
                self.matrix()  # sent first
            self._inputs = self._receive()
        return self._inputs

    def result(self) -> dict:
        """The reference's SeqStats per variant; from now on the child may use every core."""
        if self._stats is None:
            self.inputs()
            self.proc.stdin.close()
            (self._stats,) = self._receive()
            self.proc.wait()
            self.close()
        return self._stats

    def matrix(self) -> tuple[dict, dict]:
        """The importance matrix's (sums, counts), once collected; a matrix-only child ends then."""
        if self._matrix is None:
            self._matrix = self._receive()
            if self._matrix_only:
                self.proc.wait()
                self.close()
        return self._matrix

    def close(self) -> None:
        """Stop the child if it still runs; remove its request file. Safe to call twice."""
        _RUNNING.discard(self)
        if self.proc.poll() is None and self._stats is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()
        self._request.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None


# ------------------------------------------------------------------ threads
def free_cores(window: float = 0.05) -> int:
    """Cores idle right now: /proc/stat over ``window`` seconds (every core where it cannot be read); may be 0.

    The verifier's compute is small and its threads synchronise often: on a saturated machine a
    second thread made both torch (1.5 -> 9.6 CPU-s for the smollm2-135m reference) and llama.cpp
    (1.3 -> 7.1 CPU-s for the 238 positions) several times slower, so it takes only idle cores."""
    import os
    import time

    n = os.cpu_count() or 1

    def times():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total

    try:
        i0, t0 = times()
        time.sleep(window)
        i1, t1 = times()
    except (OSError, ValueError, IndexError):
        return n
    return min(n, round(n * (i1 - i0) / max(t1 - t0, 1)))


def _runtime_device(name: str):
    """The device options the verifier's runtime loads with: llama.cpp on the idle physical cores."""
    if name != "llama.cpp":
        return None
    from types import SimpleNamespace

    from edgepeft.profiles import RuntimeSpec
    from edgepeft.runtimes.llamacpp import physical_cores

    threads = max(1, min(physical_cores(), free_cores()))
    return SimpleNamespace(runtimes={name: RuntimeSpec(name, options={"n_threads": threads})})


# ------------------------------------------------------------------ runtime side
def sequence_logits(rt, ids: Sequence[int]) -> np.ndarray:
    """float32 (len(ids), vocab) from an empty KV cache, through the Runtime protocol (edgepeft.calib's)."""
    from edgepeft.calib import runtime_logits

    return runtime_logits(rt)(list(ids))


def _runtime_stats(rt, seqs, n_prompts: int, n_fixed: int, keep_rows: bool) -> list:
    """SeqStats of the runtime's logits per sequence, reduced as the reference's are (one sequence resident);
    NLL on the held-out chunks (``n_prompts`` <= k < ``n_fixed``), rows on the prompts."""
    from edgepeft.export.reference import stats

    return [stats(sequence_logits(rt, ids), ids, keep_rows and k < n_prompts, nll=n_prompts <= k < n_fixed)
            for k, ids in enumerate(seqs)]


def _tokenizer_agreement(rt, prompt_ids, bos: int | None) -> float:
    """Share of the fixed prompts the runtime's own tokenizer turns into the Hugging Face ids."""
    same = 0
    for text, want in zip(PROMPTS, prompt_ids):
        got = list(rt.tokenize(text))
        if got[:1] == [bos] and want[:1] != [bos]:  # the runtime adds the model's BOS; the text is what counts
            got = got[1:]
        same += int(got == want)
    return same / len(PROMPTS)


def _metrics(got: list, ref: list, seqs, n_prompts: int) -> dict:
    agree = total = 0
    max_abs, nll, ref_nll = 0.0, 0.0, 0.0
    for k, (ids, g, r) in enumerate(zip(seqs, got, ref)):
        if (len(g.argmax), g.vocab) != (len(ids), r.vocab):
            return {"shape_mismatch": f"runtime logits {(len(g.argmax), g.vocab)} vs reference {(len(ids), r.vocab)}"}
        agree += int((g.argmax == r.argmax).sum())
        total += len(ids)
        if r.rows is not None:
            max_abs = max(max_abs, float(np.abs(g.rows - r.rows).max()))
        if k >= n_prompts:
            nll, ref_nll = nll + g.nll, ref_nll + r.nll
    n_held = sum(len(ids) - 1 for ids in seqs[n_prompts:])
    values = {"top1_agreement": agree / total, "ppl_ratio": float(np.exp((nll - ref_nll) / max(n_held, 1))),
              "positions": total}
    if ref and ref[0].rows is not None:
        values["max_abs_logit_diff"] = max_abs
    return values


# ------------------------------------------------------------------ checks
def checks(values: dict, b: Bounds) -> list[dict]:
    """One entry per metric the table bounds: value, bound, op, passed."""
    out = []
    for metric, op, bound in b.items():
        if metric not in values:  # the task check, where the export has no task data
            continue
        v = values[metric]
        ok = bool(v >= bound) if op == ">=" else bool(v <= bound)
        out.append({"metric": metric, "value": round(float(v), 4), "bound": bound, "op": op, "passed": ok})
    return out


def verify(artifact: Artifact, ref: Reference, *, fmt: str, quant: str, label: str | None = None,
           variants: Sequence[str | None] | None = None, runtime: str | None = None) -> list[dict]:
    """Verification records for ``artifact``: its model alone, then each adapter in ``variants``.

    ``fmt``/``quant`` pick the row of the tolerance table; ``label`` is the artifact path
    written into each record (relative to the export folder, or as the user typed it).
    """
    from edgepeft.runtimes.base import FORMAT_RUNTIMES, get_runtime

    b = bounds_for(fmt, quant, ref.base.model_type)
    if variants is None:
        variants = [None, *[n for n in artifact.adapters if n in ref.adapters]]
    job = ref.job(variants, _keep_rows(b))  # the PyTorch side, in a child process (unless already started)
    name = runtime or FORMAT_RUNTIMES[artifact.format][0]
    rt = get_runtime(name)
    from edgepeft.export.reference import sequences

    prompts, held, bos, task = job.inputs()
    seqs, n, m = sequences(prompts, held, task), len(prompts), len(prompts) + len(held)
    spans, at = {}, m  # variant -> its task sequences' slice of seqs
    for v, entries in task.items():
        spans[v], at = slice(at, at + len(entries)), at + len(entries)
    refs = job.result()  # first: llama.cpp's threads beside torch's took 63 s for what takes 2 s alone (2 cores)
    rt.load(artifact, _runtime_device(name), n_ctx=max(len(x) for x in seqs) + 8)
    got = {}
    try:
        for v in variants:
            rt.set_adapter(v)
            own = seqs[:m] + (seqs[spans[v]] if v in spans else [])  # a variant runs its own task, no other
            got[v] = (_runtime_stats(rt, own, n, m, job.keep_rows), _tokenizer_agreement(rt, prompts, bos))
    finally:
        rt.close()
    records = []
    for v in variants:
        values = _metrics(got[v][0][:m], refs[v][:m], seqs[:m], n)
        values["tokenizer_agreement"] = got[v][1]
        if v in spans and "shape_mismatch" not in values:
            values.update(_task_metrics(got[v][0][m:], refs[v][spans[v]], task[v]))
        without = refs.get(BARE) if v is None else refs[None]  # the model the artifact's adapter was added to
        if without is not None and "shape_mismatch" not in values:
            values.update(_adapter_metrics(got[v][0][:m], refs[v][:m], without[:m]))
        rec = {"passed": False, "runtime": name, "reference": REFERENCE,
               "artifact": label or str(artifact.path), "adapter": v, "format": fmt, "quant": quant,
               "positions": values.get("positions", 0), "checks": []}
        if "task" in values:
            rec["task"] = values["task"]
        if "adapter_positions" in values:
            rec["adapter_positions"] = values["adapter_positions"]
        if "shape_mismatch" in values:
            rec["error"] = values["shape_mismatch"]
        else:
            rec["checks"] = checks(values, b)
            rec["passed"] = all(c["passed"] for c in rec["checks"])
        records.append(rec)
    return records


def skipped(reason: str, runtime: str, artifact: str, adapter: str | None = None) -> dict:
    """The record of a verification that did not run (``--no-verify``, no CUDA here): passed is null."""
    return {"passed": None, "skipped": reason, "runtime": runtime, "reference": REFERENCE, "artifact": artifact,
            "adapter": adapter, "checks": []}


def describe(rec: dict) -> str:
    """``base-q4_k_m.gguf (adapter demo): top1_agreement 0.61 < 0.80, ...``: the failing checks of one record."""
    who = rec["artifact"] + (f" (adapter {rec['adapter']})" if rec.get("adapter") else "")
    if rec.get("error"):
        return f"{who}: {rec['error']}"
    bad = [c for c in rec["checks"] if not c["passed"]]
    neg = {">=": "<", "<=": ">"}
    return who + ": " + ", ".join(f"{c['metric']} {c['value']:g} {neg[c['op']]} {c['bound']:g}" for c in bad)


def require_passed(records: list[dict], what: str, fix: str | None = None) -> None:
    """Raise :class:`VerificationError` listing every failed metric against its bound."""
    failed = [r for r in records if r.get("passed") is False]
    if failed:
        missed = {c["metric"] for r in failed for c in r.get("checks", []) if not c["passed"]}
        if fix is None and missed == {"task_kept"}:  # the task alone: the type loses it, the writer is not wrong
            fix = VerificationError.TASK_FIX
        raise VerificationError(what, records, "; ".join(describe(r) for r in failed), fix)


def attach(record: dict, records: list[dict]) -> None:
    """The shared record shape: one ``verification`` object, or ``verifications`` when there are several."""
    if len(records) == 1:
        record["verification"] = records[0]
    else:
        record["verifications"] = records
