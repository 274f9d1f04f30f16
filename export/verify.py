"""One verifier for every artifact: the runtime bench uses vs the PyTorch fp32 reference.

Any :class:`~edgepeft.runtimes.base.Artifact` (GGUF file or export folder, ONNX folder, QNN
static graphs, bundle) is loaded in the first runtime ``FORMAT_RUNTIMES`` lists for its
format, the same ``runtimes.Runtime`` implementation ``edgepeft bench`` measures. It sees
the same token ids as a PyTorch fp32 model built from the base with the adapters applied as
the export applied them (in place, one weight at a time: one fp32 copy of the model at most,
freed before the runtime loads).

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

import contextlib
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


@dataclass
class _RefOut:
    prompt_logits: list[np.ndarray]  # full rows: max |Δlogit| needs them
    held_argmax: list[np.ndarray]
    held_nll: float  # summed over the held-out positions


# ------------------------------------------------------------------ token ids
def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def held_out_ids(tokenizer) -> list[list[int]]:
    with HELD_OUT.open(encoding="utf-8") as f:
        toks = _ids(tokenizer, f.read(4096))  # ~1000 tokens; more than the chunks need
    n = HELD_OUT_CHUNK
    return [toks[i * n: (i + 1) * n] for i in range(HELD_OUT_CHUNKS) if len(toks) >= (i + 1) * n]


# ------------------------------------------------------------------ PyTorch reference
def _delta(m):
    """s·B·A written out here, not through the writers' helpers, so a writer's wrong scale cannot hide."""
    return m.scale * (m.b.float() @ m.a.float())


def _weights(model) -> dict:
    return dict(model.named_parameters(remove_duplicate=False))


def _merge_in_place(model, plans: Sequence[AdapterPlan], target: str) -> None:
    import torch

    from edgepeft.export.merge import is_nf4_quantized, nf4_round_trip

    params = _weights(model)
    with torch.no_grad():
        if target == "dequantized":  # the NF4 weights training saw (the surgery's definition of the target)
            for name, w in params.items():
                if is_nf4_quantized(name, tuple(w.shape)):
                    w.copy_(nf4_round_trip(w.detach()))
        for plan in plans:
            for t, m in plan.modules.items():
                params[t + ".weight"].add_(_delta(m))


@contextlib.contextmanager
def _applied(model, plan: AdapterPlan | None):
    """Add ``plan``'s ΔW to the weights, subtract it after: no second copy of the model."""
    import torch

    if plan is None:
        yield
        return
    params = _weights(model)
    saved = {}
    with torch.no_grad():
        for t, m in plan.modules.items():
            w = params[t + ".weight"]
            saved[t] = w[...].clone()  # the touched weights only
            w.add_(_delta(m))
    try:
        yield
    finally:
        with torch.no_grad():
            for t, w0 in saved.items():
                params[t + ".weight"].copy_(w0)


def _load_fp32(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a failed check must stay one line on stderr
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    finally:
        if was:
            hf_logging.enable_progress_bar()


def reference_outputs(ref: Reference, variants: Sequence[str | None], prompts, held) -> dict:
    import torch

    model = _load_fp32(ref.base.path)
    _merge_in_place(model, ref.merged, ref.merge_target)
    out = {}
    try:
        with torch.no_grad():
            for v in variants:
                with _applied(model, ref.adapters[v] if v else None):
                    pl = [model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids in prompts]
                    am, nll = [], 0.0
                    for ids in held:
                        lg = model(input_ids=torch.tensor([ids])).logits[0].double()
                        am.append(lg.argmax(-1).numpy())
                        nll += _nll(lg.numpy(), ids)
                    out[v] = _RefOut(pl, am, nll)
    finally:
        del model
    return out


def _nll(logits: np.ndarray, ids: Sequence[int]) -> float:
    """Summed next-token NLL of ``ids[1:]`` given the logits of ``ids[:-1]``."""
    from edgepeft.calib import token_nll

    return float(token_nll(logits[: len(ids) - 1], ids[1:]).sum())


# ------------------------------------------------------------------ runtime side
def sequence_logits(rt, ids: Sequence[int]) -> np.ndarray:
    """float32 (len(ids), vocab) from an empty KV cache, through the Runtime protocol (edgepeft.calib's)."""
    from edgepeft.calib import runtime_logits

    return runtime_logits(rt)(list(ids))


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


def _metrics(rt, tokenizer, ref: _RefOut, prompts, held) -> dict:
    agree = total = 0
    max_abs = 0.0
    for ids, r in zip(prompts, ref.prompt_logits):
        g = sequence_logits(rt, ids)
        if g.shape != r.shape:
            return {"shape_mismatch": f"runtime logits {g.shape} vs reference {r.shape}"}
        agree += int((g.argmax(-1) == r.argmax(-1)).sum())
        total += len(ids)
        max_abs = max(max_abs, float(np.abs(g - r).max()))
    nll = 0.0
    for ids, r_am in zip(held, ref.held_argmax):
        g = sequence_logits(rt, ids)
        agree += int((g.argmax(-1) == r_am).sum())
        total += len(ids)
        nll += _nll(g, ids)
    n_held = sum(len(ids) - 1 for ids in held)
    ppl_ratio = float(np.exp((nll - ref.held_nll) / max(n_held, 1)))
    return {"tokenizer_agreement": _tokenizer_agreement(rt, tokenizer, PROMPTS), "top1_agreement": agree / total,
            "max_abs_logit_diff": max_abs, "ppl_ratio": ppl_ratio, "positions": total}


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
    tokenizer = ref.base.load_tokenizer()
    prompts = [_ids(tokenizer, p) for p in PROMPTS]
    held = held_out_ids(tokenizer)
    refs = reference_outputs(ref, variants, prompts, held)  # freed model before the runtime loads
    name = runtime or FORMAT_RUNTIMES[artifact.format][0]
    rt = get_runtime(name)
    longest = max(len(x) for x in prompts + held)
    rt.load(artifact, None, n_ctx=longest + 8)
    records = []
    try:
        for v in variants:
            rt.set_adapter(v)
            values = _metrics(rt, tokenizer, refs[v], prompts, held)
            rec = {"passed": False, "runtime": name, "reference": REFERENCE,
                   "artifact": label or str(artifact.path), "adapter": v, "format": fmt, "quant": quant,
                   "positions": values.get("positions", 0), "checks": []}
            if "shape_mismatch" in values:
                rec["error"] = values["shape_mismatch"]
            else:
                rec["checks"] = checks(values, b)
                rec["passed"] = all(c["passed"] for c in rec["checks"])
            records.append(rec)
    finally:
        rt.close()
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
