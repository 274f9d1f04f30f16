"""The verification result of an export, as the rows and the table a user sees after it.

One reader for every export record: the shared shape (``"verification"`` / ``"verifications"``:
runtime, reference, artifact, adapter, checks of metric/value/bound/op/passed) and, until every
writer emits that, the older per-writer ``"verify"`` dicts, mapped onto the same rows. The
``--merge-into auto`` choice (held-out loss per candidate base) is rendered beside it.
"""

from __future__ import annotations

from pathlib import Path

# legacy GGUF float quants: the top-1 bound the GGUF verifier applied (export/gguf_verify.py)
_GGUF_FLOAT_TOP1 = {"f32": 0.99, "f16": 0.99, "bf16": 0.95}
_OPS = {">=": lambda v, b: v >= b, "<=": lambda v, b: v <= b}


def verifications(record: dict) -> list[dict]:
    """Every verification in ``record`` in the shared shape (one per artifact and adapter)."""
    if isinstance(record.get("verifications"), list):
        return list(record["verifications"])
    if isinstance(record.get("verification"), dict):
        return [record["verification"]]
    legacy = record.get("verify")
    if not isinstance(legacy, dict):
        return []
    return _from_legacy(record, legacy)


def _check(metric: str, value, bound=None, op: str = ">=") -> dict:
    passed = None if bound is None or value is None else bool(_OPS[op](value, bound))
    return {"metric": metric, "value": value, "bound": bound, "op": op if bound is not None else None,
            "passed": passed}


def _entry(runtime: str, artifact: str, adapter, checks: list[dict], passed=None, skipped=None) -> dict:
    if passed is None and not skipped:
        judged = [c["passed"] for c in checks if c["passed"] is not None]
        passed = all(judged) if judged else None
    out = {"passed": passed, "runtime": runtime, "reference": "pytorch-fp32", "artifact": artifact,
           "adapter": adapter, "checks": checks}
    if skipped:
        out["skipped"] = skipped
    return out


def _from_legacy(record: dict, v: dict) -> list[dict]:
    files = [str(f) for f in record.get("files", [])]
    if record.get("format") == "onnx":
        artifact = str(record.get("out") or (Path(files[0]).parent if files else "?"))
        runtime = "onnxruntime"
        if "skipped" in v:
            return [_entry(runtime, artifact, None, [], passed=None, skipped=v["skipped"])]
        per = v.get("per_adapter") or {None: v}
        out = []
        for name, s in per.items():
            tol = s.get("tolerance") or {}
            checks = [_check("top1_agreement", s.get("top1_agreement"), tol.get("top1_agreement") or None),
                      _check("max_abs_logit_diff", s.get("max_abs_diff"), tol.get("max_abs_diff"), "<="),
                      _check("logit_cosine", s.get("logit_cosine"), tol.get("logit_cosine"))]
            out.append(_entry(runtime, artifact, None if name in (None, "(none)") else name, checks, s.get("passed")))
        return out
    runtime = "llama.cpp"
    quant = record.get("quant")
    bound = _GGUF_FLOAT_TOP1.get(str(quant).lower())
    if record.get("mode") == "merged":
        per = {None: (files[0] if files else "?", v)}
    else:
        base_file = files[0] if files else "?"
        adapter_files = {a["name"]: str(a["path"]) for a in record.get("adapter_files", [])}
        per = {None if k == "base" else k: (adapter_files.get(k, base_file), s) for k, s in v.items()}
    out = []
    for name, (artifact, s) in per.items():
        checks = [_check("top1_agreement", s.get("top1_agreement"), bound),
                  _check("max_abs_logit_diff", s.get("max_abs_logit_diff"), None, "<=")]
        if "tokenizer_agreement" in s:
            checks.append(_check("tokenizer_agreement", s["tokenizer_agreement"]))
        out.append(_entry(runtime, artifact, name, checks, s.get("passed")))
    return out


def merge_auto(record: dict) -> dict | None:
    """``{"chosen", "losses", "calib_pairs", "scored_in"}`` of a ``--merge-into auto`` export, else None."""
    merge = record.get("merge")
    auto = merge.get("auto") if isinstance(merge, dict) else None
    return auto if isinstance(auto, dict) and auto.get("losses") else None


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _verdict(passed) -> str:
    return {True: "[green]pass[/green]", False: "[red]FAIL[/red]"}.get(passed, "reported")


def render(record: dict, console, folder: str | Path | None = None) -> None:
    """Print the verification table (and the merge-into auto losses) of one export ``record``.

    Records name artifacts relative to their own folder (relocatable); ``folder`` is that folder as
    the user typed it, so the line shows the path they can open.
    """
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    vs = verifications(record)
    if not vs:
        console.print("verification: not run (--no-verify)" if record.get("verify") is None else
                      "verification: none recorded")
    by_artifact: dict[str, list[dict]] = {}
    for v in vs:
        by_artifact.setdefault(str(v.get("artifact") or "?"), []).append(v)
    for artifact, group in by_artifact.items():
        if folder is not None and artifact != "?" and not Path(artifact).is_absolute():
            artifact = str(Path(folder) / artifact)
        runtimes = sorted({v.get("runtime", "?") for v in group})
        # the path is a line of its own, never a table cell: it folds, it is never cut
        if all(v.get("skipped") for v in group):
            console.print(f"not verified: {escape(artifact)} (no run in {', '.join(runtimes)} against PyTorch fp32)",
                          soft_wrap=True)
        else:
            console.print(f"verified {escape(artifact)} in {', '.join(runtimes)} against PyTorch fp32", soft_wrap=True)
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for col, just in (("adapter", "left"), ("metric", "left"), ("value", "right"), ("bound", "right"),
                          ("result", "left")):
            t.add_column(col, justify=just, overflow="fold")
        for v in group:
            adapter = escape(_adapter_label(record, v))
            if v.get("skipped"):
                t.add_row(adapter, "-", "-", "-", f"skipped: {escape(v['skipped'])}")
                continue
            for c in v.get("checks", []):
                bound = f"{c['op']} {_fmt(c['bound'])}" if c.get("bound") is not None else "-"
                t.add_row(adapter, c["metric"], _fmt(c.get("value")), bound, _verdict(c.get("passed")))
                adapter = ""  # one name per group of rows
            task = v.get("task")
            if isinstance(task, dict) and isinstance(task.get("exact_match"), dict):
                em = task["exact_match"]  # teacher-forced, on the task examples the check ran
                t.add_row(adapter, f"task exact match ({task.get('examples')} examples)",
                          f"{_fmt(em.get('artifact'))} (PyTorch {_fmt(em.get('reference'))})", "-", "reported")
        console.print(t)
    verdicts = [v.get("passed") for v in vs if not v.get("skipped")]
    if verdicts and all(p is True for p in verdicts):
        console.print("verification: [green]passed[/green]")
    elif any(p is False for p in verdicts):
        console.print("verification: [red]FAILED[/red]")
    elif verdicts:
        console.print("verification: measured (no pass/fail bound for this quant on these metrics)")
    auto = merge_auto(record)
    if auto:
        scored = f", scored in {auto['scored_in']}" if auto.get("scored_in") else ""
        parts = auto.get("parts") or {}  # {target: {"task": nll, "text": nll}}; records before session 12 have none
        sets = [k for k in ("task", "text") if any(k in v for v in parts.values())]
        said = {"task": f"{auto.get('calib_pairs', '?')} task pairs", "text": "generic text"}
        on = " + ".join(said[k] for k in sets) if sets else f"{auto.get('calib_pairs', '?')} calibration pairs"
        console.print(f"--merge-into auto: held-out loss on {on}{scored}")
        m = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        m.add_column("merge target")
        for k in sets:
            m.add_column(k, justify="right")
        m.add_column("loss" if not sets else "sum", justify="right")
        m.add_column("")
        for target, loss in auto["losses"].items():
            m.add_row(target, *(f"{parts.get(target, {}).get(k, float('nan')):.4f}" for k in sets), f"{loss:.4f}",
                      "[green]chosen[/green]" if target == auto.get("chosen") else "")
        console.print(m)


def _adapter_label(record: dict, v: dict) -> str:
    if v.get("adapter"):
        return v["adapter"]
    if record.get("mode") == "merged":
        names = [a.get("name") for a in record.get("adapters", []) if isinstance(a, dict) and a.get("name")]
        if names:
            return "+".join(names) + " (merged)"
    return "(none)"
