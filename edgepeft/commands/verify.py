"""edgepeft verify BUNDLE | edgepeft verify ARTIFACT --reference BASE [--reference-adapter NAME=PEFT_DIR ...]"""

from __future__ import annotations

from pathlib import Path

import click

from edgepeft.errors import EdgepeftError
from edgepeft.ui import echo, edgepeft_command, info, print_json

# artifact format (bench's discover) -> the tolerance table's format
TABLE_FORMAT = {"gguf": "gguf", "onnx-genai": "onnx", "onnx": "onnx", "onnx-static": "qnn"}


def _pairs(values, option: str) -> dict[str, Path]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise EdgepeftError(f"{option} {v!r} is not NAME=PATH", f"Pass {option} NAME=PATH")
        if name in out:
            raise EdgepeftError(f"{option} names {name!r} twice", "Give each one a distinct NAME")
        out[name] = Path(path)
    return out


@edgepeft_command("verify", json_option=True)
@click.argument("artifact", type=click.Path())
@click.option("--reference", default=None,
              help="Base to compare against (HF folder, .gguf, alias): runs ARTIFACT against PyTorch fp32.")
@click.option("--reference-adapter", "ref_adapters", multiple=True, metavar="NAME=PEFT_DIR",
              help="PEFT adapter of the reference (repeatable). A NAME that is one of the artifact's adapters is "
                   "checked with that adapter active; any other is merged into the reference (a merged artifact).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=FILE",
              help="Adapter file of the artifact beside the ones found in it (as for bench).")
@click.option("--quant", default=None, help="Tolerance row to use when the artifact does not say (e.g. q4_k_m, int4).")
@click.option("--merge-into", default=None, help="original | dequantized: how a merged artifact's adapters were "
              "merged (default: from its export record, else original).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="JSONL of the adapters' task (prompt/completion, messages or text lines): its examples are "
                   "checked too (task_kept). A --reference-adapter that is a training run dir brings "
                   "its own data.")
def command(artifact, reference, ref_adapters, adapters, quant, merge_into, calib, as_json):
    """Check a bundle's hashes, headers and fits; with --reference, check any artifact against PyTorch.

    Without --reference, ARTIFACT is a bundle (directory or .tar): every hash, every header,
    and each adapter's fit (fingerprint, names, shapes). With --reference, ARTIFACT is anything
    bench accepts (a .gguf, a GGUF or ONNX export folder, a QNN folder, a bundle), made by edgepeft
    or another tool; it runs in bench's runtime against the PyTorch fp32 reference and each metric
    is printed against its bound (export/tolerances.py). Exit 0 when all checks pass, 2 otherwise.
    """
    if reference is None:
        if ref_adapters or adapters or quant or merge_into or calib:
            raise EdgepeftError("--reference-adapter, --adapter, --quant, --merge-into and --calib need --reference",
                                "Pass --reference BASE to check the artifact against PyTorch")
        return _bundle(artifact, as_json)
    _against_reference(artifact, reference, _pairs(ref_adapters, "--reference-adapter"),
                       _pairs(adapters, "--adapter"), quant, merge_into, calib, as_json)


def _bundle(bundle, as_json) -> None:
    from edgepeft.bundle import verify_path

    checked = verify_path(bundle)
    m = checked.manifest
    if as_json:
        print_json({"ok": True, "bundle": str(bundle), "base_fingerprint": m["base_fingerprint"],
                    "files": len(m["files"]), "bytes": sum(f["size"] for f in m["files"].values()),
                    "adapters": [a["name"] for a in m["adapters"]], "onnx": [o["name"] for o in m["onnx"]],
                    "warnings": checked.warnings})
        return
    for w in checked.warnings:
        info(f"warning: {w}")
    echo(f"OK {bundle}: {len(m['files'])} files hashed, "
         f"adapters fit: {', '.join(a['name'] for a in m['adapters']) or 'none'}"
         + (f"; ONNX: {', '.join(o['name'] for o in m['onnx'])}" if m["onnx"] else ""))
    echo(f"base fingerprint {m['base_fingerprint']}")  # in full, on its own line: the one to compare


def _tasks(base, active: list, merged: list, calib) -> dict:
    """The task examples (``verify.task_pairs``): each active adapter's on its variant, the merged ones' on the model."""
    from types import SimpleNamespace

    from edgepeft.export.verify import task_pairs

    out = {}
    for mode, plans in (("separate", active), ("merged", merged)):
        req = SimpleNamespace(mode=mode, calib=calib, adapters=[p.source for p in plans if p.source])
        out.update(task_pairs(req, base, plans))
    return out


def _against_reference(path, reference, ref_adapters, adapters, quant, merge_into, calib, as_json) -> None:
    from edgepeft.bench import discover
    from edgepeft.export import verify as V
    from edgepeft.export.adapter import load_adapters
    from edgepeft.models import resolve_base

    # resolved: discover compares a record's absolute adapter paths with the folder's files
    art = discover(Path(path).resolve(), {n: a.resolve() for n, a in adapters.items()} or None)
    fmt = TABLE_FORMAT[art.format]
    q = (quant or ("int8" if art.format == "onnx-static" else art.quant) or "").lower() or None
    base = resolve_base(reference)
    plans = load_adapters(list(ref_adapters.values()), base, list(ref_adapters)) if ref_adapters else []
    active = {p.name: p for p in plans if p.name in art.adapters}
    merged = [p for p in plans if p.name not in art.adapters]
    V.prestart(base.model_type)  # the PyTorch child imports torch while this process reads the task examples
    target = merge_into or _recorded_merge_target(art.path) or "original"
    ref = V.Reference(base, merged=merged, merge_target=target, adapters=active,
                      tasks=_tasks(base, list(active.values()), merged, calib) if art.format != "onnx-static" else {})
    records = V.verify(art, ref, fmt=fmt, quant=q, label=str(path))
    runtime = records[0]["runtime"]
    records += [V.skipped("no --reference-adapter with this name", runtime, str(path), n)
                for n in art.adapters if n not in active]
    if as_json:
        print_json({"ok": all(r["passed"] is not False for r in records), "artifact": str(path),
                    "reference": str(reference), "merged_into_reference": [p.name for p in merged],
                    "verifications": records})
    else:
        _print(records, merged)
    V.require_passed(records, f"{path} ({fmt} {q})",
                     fix="The artifact does not reproduce its reference: check the converter that wrote it "
                         "(and that --reference/--reference-adapter are what it was made from)")


def _print(records: list[dict], merged) -> None:
    for r in records:
        who = r["artifact"] + (f" + adapter {r['adapter']}" if r["adapter"] else "")
        if merged and not r["adapter"]:
            who += f" (reference: base + {', '.join(p.name for p in merged)} merged)"
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[r["passed"]]
        echo(f"{verdict} {who}: {r['runtime']} vs {r['reference']}, {r.get('positions', 0)} positions"
                   + (f" ({r['skipped']})" if r.get("skipped") else ""))
        for c in r["checks"]:
            mark = "ok" if c["passed"] else "FAIL"
            echo(f"  {c['metric']:<20} {c['value']:>10.4f} {c['op']} {c['bound']:<8g} {mark}")
        if r.get("task"):
            t, em = r["task"], r["task"]["exact_match"]
            echo(f"  task: {t['examples']} examples, {t['positions']} completion tokens; exact match "
                 f"PyTorch {em['reference']:.0%}, artifact {em['artifact']:.0%}; {t['examples_agreeing']} agree throughout")


def _recorded_merge_target(p: Path) -> str | None:
    """The merge target edgepeft's own export recorded next to the artifact, if any."""
    import json

    folder = p if p.is_dir() else p.parent
    for name in ("gguf-export.json", "edgepeft-onnx.json"):
        try:
            merge = json.loads((folder / name).read_text()).get("merge") or {}
        except (OSError, ValueError):
            continue
        if isinstance(merge, dict) and merge.get("target") in ("original", "dequantized"):
            return merge["target"]
    return None
