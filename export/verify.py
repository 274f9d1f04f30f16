"""One verifier for every artifact: the runtime bench uses vs the PyTorch fp32 reference.

Any :class:`~edgepeft.runtimes.base.Artifact` (GGUF file or export folder, ONNX folder, QNN
static graphs, bundle) is loaded in the first runtime ``FORMAT_RUNTIMES`` lists for its
format, the same ``runtimes.Runtime`` implementation ``edgepeft bench`` measures. It sees
the same token ids as the PyTorch fp32 model of the base with the adapters applied as the
export applied them, computed layer by layer from the base's safetensors
(:mod:`edgepeft.export.reference`: one decoder layer in fp32 at a time, never the whole model)
in a thread while the runtime runs (an export starts it before writing: ``Reference.prefetch``).
Both sides are reduced at once to what the checks read (top-1 per position, summed NLL, and
the full logit rows only where max |Δlogit| is bounded).

Per model variant (the base, then each adapter; or the merged model) the checks are:

- ``tokenizer_agreement``: the runtime's own tokenizer gives the Hugging Face ids on each
  fixed prompt (a wrong embedded pre-tokenizer or vocab shows here, never in the logits);
- ``top1_agreement`` over every position of the fixed prompts and the held-out text;
- ``max_abs_logit_diff`` on the fixed prompts (float types);
- ``ppl_ratio``: artifact perplexity / reference perplexity on a held-out text the package
  carries (``edgepeft/data/wikitext2-valid-slice.txt``).

Which of them apply, and their bounds, come from :mod:`edgepeft.export.tolerances`. Records
follow the shared verification record (``passed``, ``runtime``, ``reference``, ``artifact``,
``adapter``, ``checks``). :func:`require_passed` turns a failed one into a
:class:`~edgepeft.errors.VerificationError`.
"""

from __future__ import annotations

import atexit
import threading
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
    _job: _Job | None = field(default=None, init=False, repr=False, compare=False)

    def prefetch(self, variants: Sequence[str | None], fmt: str, quant: str) -> None:
        """Start computing the reference now, in a thread: an export overlaps it with writing the artifact."""
        self._job = _Job(self, list(variants), _keep_rows(bounds_for(fmt, quant)))

    def job(self, variants: Sequence[str | None], keep_rows: bool) -> _Job:
        """The running (or finished) computation for ``variants``; started here unless prefetched."""
        if self._job is None or (self._job.variants, self._job.keep_rows) != (list(variants), keep_rows):
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


# ------------------------------------------------------------------ PyTorch reference (export/reference.py)
_RUNNING: set[_Job] = set()


@atexit.register
def _cancel_running() -> None:  # a failed export must not leave torch working in a thread at shutdown
    for job in list(_RUNNING):
        job.cancel.set()
        job.thread.join(timeout=30)


class _Job:
    """Tokenize the fixed texts, then compute the reference's SeqStats per variant, in a thread."""

    def __init__(self, ref: Reference, variants: list, keep_rows: bool):
        self.ref, self.variants, self.keep_rows = ref, variants, keep_rows
        self.cancel = threading.Event()
        self.tokenized = threading.Event()
        self.error: BaseException | None = None
        self.tokenizer = self.prompts = self.held = self.stats = None
        self.thread = threading.Thread(target=self._run, name="edgepeft-reference", daemon=True)
        _RUNNING.add(self)
        self.thread.start()

    def _run(self) -> None:
        from edgepeft.export.reference import reference_stats

        try:
            tok = self.ref.base.load_tokenizer()
            self.prompts, self.held = [_ids(tok, p) for p in PROMPTS], held_out_ids(tok)
            self.tokenizer = tok
            self.tokenized.set()
            seqs = self.prompts + self.held
            n = len(self.prompts)
            self.stats = reference_stats(
                self.ref.base, self.ref.merged, self.ref.merge_target, self.ref.adapters, self.variants, seqs,
                keep_rows=[self.keep_rows and k < n for k in range(len(seqs))], nll=[k >= n for k in range(len(seqs))],
                cancelled=self.cancel.is_set)
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
            self.error = e
        finally:
            self.tokenized.set()
            _RUNNING.discard(self)

    def inputs(self):
        """(tokenizer, prompt ids, held-out ids) once tokenized."""
        self.tokenized.wait()
        if self.tokenizer is None:
            self.thread.join()
            raise self.error
        return self.tokenizer, self.prompts, self.held

    def result(self) -> dict:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.stats


# ------------------------------------------------------------------ runtime side
def sequence_logits(rt, ids: Sequence[int]) -> np.ndarray:
    """float32 (len(ids), vocab) from an empty KV cache, through the Runtime protocol (edgepeft.calib's)."""
    from edgepeft.calib import runtime_logits

    return runtime_logits(rt)(list(ids))


def _runtime_stats(rt, seqs, n_prompts: int, keep_rows: bool) -> list:
    """SeqStats of the runtime's logits per sequence, reduced as the reference's are (one sequence resident)."""
    from edgepeft.export.reference import stats

    return [stats(sequence_logits(rt, ids), ids, keep_rows and k < n_prompts, nll=k >= n_prompts)
            for k, ids in enumerate(seqs)]


def _tokenizer_agreement(rt, tokenizer, prompts_text) -> float:
    bos = getattr(tokenizer, "bos_token_id", None)
    same = 0
    for text in prompts_text:
        want = _ids(tokenizer, text)
        got = list(rt.tokenize(text))
        if got[:1] == [bos] and want[:1] != [bos]:  # the runtime adds the model's BOS; the text is what counts
            got = got[1:]
        same += int(got == want)
    return same / len(prompts_text)


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

    b = bounds_for(fmt, quant)
    if variants is None:
        variants = [None, *[n for n in artifact.adapters if n in ref.adapters]]
    job = ref.job(variants, _keep_rows(b))  # the PyTorch side runs in a thread while the runtime works
    name = runtime or FORMAT_RUNTIMES[artifact.format][0]
    rt = get_runtime(name)
    tokenizer, prompts, held = job.inputs()
    seqs, n = prompts + held, len(prompts)
    rt.load(artifact, None, n_ctx=max(len(x) for x in seqs) + 8)
    got = {}
    try:
        for v in variants:
            rt.set_adapter(v)
            got[v] = (_runtime_stats(rt, seqs, n, job.keep_rows), _tokenizer_agreement(rt, tokenizer, PROMPTS))
    finally:
        rt.close()
    refs = job.result()
    records = []
    for v in variants:
        values = _metrics(got[v][0], refs[v], seqs, n)
        values["tokenizer_agreement"] = got[v][1]
        rec = {"passed": False, "runtime": name, "reference": REFERENCE,
               "artifact": label or str(artifact.path), "adapter": v, "format": fmt, "quant": quant,
               "positions": values.get("positions", 0), "checks": []}
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
        raise VerificationError(what, records, "; ".join(describe(r) for r in failed), fix)


def attach(record: dict, records: list[dict]) -> None:
    """The shared record shape: one ``verification`` object, or ``verifications`` when there are several."""
    if len(records) == 1:
        record["verification"] = records[0]
    else:
        record["verifications"] = records
