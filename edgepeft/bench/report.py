"""The bench result document (schema-versioned JSON) and its renderings: table, PNG chart, B/A comparison."""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

from edgepeft import __version__
from edgepeft.bench.config import SCHEMA, BenchConfig
from edgepeft.errors import EdgepeftError
from edgepeft.paths import from_record, to_record
from edgepeft.profiles import DeviceProfile
from edgepeft.ui import cell


def document(records: list[dict], profile: DeviceProfile, cfg: BenchConfig, bandwidth: dict) -> dict:
    """The schema-versioned JSON document."""
    conf = asdict(cfg)
    conf["ppl_file"] = str(cfg.ppl_file) if cfg.ppl_file else None
    if cfg.task and Path(cfg.task).is_file():
        conf["task"] = str(Path(cfg.task).resolve())  # stored relative to the results file, like ppl_file
    return {
        "schema": SCHEMA, "edgepeft_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
                 "python": platform.python_version()},
        "device": {"profile": profile.name, "memory_gb": profile.memory_gb, **bandwidth},
        "config": conf,
        "records": records,
    }


def stored_document(doc: dict, path: str | Path) -> dict:
    """The bench document as the file ``path`` stores it: artifact paths relative to that file."""
    def rel(v):
        return to_record(v, path) if v else v

    def rel_file(v):  # a member of a bundle .tar is a name inside the tar, not a path here
        return rel(v) if v and Path(v).exists() else v

    records = [{**r, "artifact": rel(r.get("artifact")), "model_file": rel_file(r.get("model_file"))}
               for r in doc.get("records", [])]
    conf = doc.get("config", {})
    task = conf.get("task")
    return {**doc, "config": {**conf, "ppl_file": rel(conf.get("ppl_file")),
                              **({"task": rel(task)} if task and Path(task).is_file() else {})},
            "records": records}


def write_document(doc: dict, path: str | Path) -> None:
    from edgepeft import atomic

    atomic.write_json(Path(path), stored_document(doc, path))


def load_document(path: str | Path) -> dict:
    from edgepeft.readers import read_json

    path = Path(path)
    if not path.is_file():
        raise EdgepeftError(f"bench results {path} do not exist", "Pass a JSON file written by edgepeft bench --json")
    doc = load_document_obj(read_json(path, "bench results", expect=None), str(path))
    for r in doc["records"]:
        for k in ("artifact", "model_file"):
            if isinstance(r.get(k), str) and (k == "artifact" or from_record(r[k], path).exists()):
                r[k] = str(from_record(r[k], path))
    return doc


_RECORD_STRINGS = ("artifact", "runtime", "adapter", "device")
_RECORD_NUMBERS = ("model_bytes", "adapter_bytes")
_RECORD_METRICS = ("pp", "tg", "ttft_ms", "load_ms", "peak_rss_mb", "swap_ms", "perplexity", "bw_util", "top1_agree",
                   "accuracy", "bandwidth_gb_s", "bytes_per_token", "adapter_tg_ratio", "adapter_pp_ratio")
_SCALAR_METRICS = ("bw_util", "top1_agree", "bandwidth_gb_s", "bytes_per_token", "adapter_tg_ratio", "adapter_pp_ratio")
_METRIC_KEYS = ("mean", "std", "median", "ppl", "accuracy", "n", "tokens")


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_document_obj(doc, source: str) -> dict:
    """A bench result (file or a device's stdout), with every record's fields typed before anything uses them."""
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if not str(schema or "").startswith("edgepeft.bench/") or not isinstance(doc.get("records"), list):
        raise EdgepeftError(f"{source} is not an edgepeft bench result (schema {schema!r})",
                            "Pass a JSON file written by edgepeft bench --json")
    if schema != SCHEMA:
        raise EdgepeftError(f"{source} has schema {schema!r}, this edgepeft reads {SCHEMA}",
                            "Re-run the benchmark with this version")
    if not isinstance(doc.get("device"), dict) or not isinstance(doc["device"].get("profile"), str):
        raise EdgepeftError(f"{source}: field 'device' needs a string 'profile'", "Pass a file written by edgepeft bench")
    fix = "Pass a file written by edgepeft bench --json"
    for i, r in enumerate(doc["records"]):
        if not isinstance(r, dict):
            raise EdgepeftError(f"{source}: records[{i}] is a {type(r).__name__}, allowed: an object", fix)
        for k in _RECORD_STRINGS:
            if not isinstance(r.get(k), str):
                raise EdgepeftError(f"{source}: records[{i}].{k}={r.get(k)!r} is not allowed", f"Allowed: a string; {fix}")
        for k in _RECORD_NUMBERS:
            if r.get(k) is not None and not _num(r.get(k)):
                raise EdgepeftError(f"{source}: records[{i}].{k}={r.get(k)!r} is not allowed",
                                    f"Allowed: a finite number; {fix}")
        for k in _RECORD_METRICS:
            v = r.get(k)
            ok = v is None or _num(v) or (k not in _SCALAR_METRICS and isinstance(v, dict) and all(
                v.get(m) is None or _num(v.get(m)) for m in _METRIC_KEYS))
            if not ok:
                raise EdgepeftError(f"{source}: records[{i}].{k}={v!r} is not allowed",
                                    f"Allowed: null, a finite number, or an object of finite numbers; {fix}")
    return doc


def _key(r: dict) -> tuple:
    return (Path(r["artifact"]).name, r["runtime"], r["device"], r["adapter"])


def _sub(r: dict, key: str, sub: str):
    v = r.get(key)
    return v.get(sub) if isinstance(v, dict) else None


def _fmt(m) -> str:
    if m is None:
        return "-"
    if isinstance(m, dict):
        if m.get("mean") is None:
            return "-"
        return f"{m['mean']:.1f} ± {m['std']:.1f}" if m.get("std") is not None else f"{m['mean']:.1f}"
    return f"{m:.0f}" if isinstance(m, float) else f"{m}"


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def artifact_label(r: dict) -> str:
    return f"PyTorch {r.get('quant') or 'fp32'} (reference)" if r.get("reference") else Path(r["artifact"]).name


def adapter_label(r: dict) -> str:
    merged = r.get("merged_adapters") or []
    return f"{'+'.join(merged)} (merged)" if merged and r["adapter"] == "none" else r["adapter"]


def _acc(r: dict) -> str:
    a = r.get("accuracy")
    if not isinstance(a, dict) or a.get("accuracy") is None:
        return "-"
    return f"{a['accuracy']:.0%} of {a.get('total')}"


def table(doc: dict):
    from rich.table import Table

    t = Table(title=cell(f"edgepeft bench on {doc['device']['profile']} "
                         f"({doc['device'].get('bandwidth_gb_s')} GB/s, {doc['device'].get('bandwidth_source', '')})"),
              caption="- = not measured; top1 = top-1 agreement with the PyTorch reference on the same tokens; "
                      "tg/base, pp/base = the adapter's tok/s over the base alone's, same run, interleaved"
                      + (f"; acc = exact match on {Path(str(doc['config']['task'])).name}"
                         if doc.get("config", {}).get("task") else ""))
    for col in ("artifact", "runtime", "adapter", "MB", "load ms", "ttft ms", "pp t/s", "tg t/s", "tg/base", "pp/base",
                "swap ms", "RSS MB", "ppl", "acc", "top1", "bw_util"):
        names = col in ("artifact", "runtime", "adapter")  # identifiers fold, never end in "…"
        t.add_column(col, justify="left" if names else "right", overflow="fold" if names else "ellipsis")
    for r in doc["records"]:
        ref = r.get("reference")
        t.add_row(cell(artifact_label(r)), cell(r["runtime"]), cell(adapter_label(r)),
                  "-" if ref else f"{((r.get('model_bytes') or 0) + (r.get('adapter_bytes') or 0)) / 1e6:.1f}", _fmt(r.get("load_ms")),
                  _fmt(r.get("ttft_ms")), _fmt(r.get("pp")), _fmt(r.get("tg")),
                  _ratio(r.get("adapter_tg_ratio")), _ratio(r.get("adapter_pp_ratio")),
                  f"{r['swap_ms']['median']:.2f}" if _sub(r, "swap_ms", "median") is not None else "-", _fmt(r.get("peak_rss_mb")),
                  f"{r['perplexity']['ppl']:.2f}" if _sub(r, "perplexity", "ppl") is not None else "-", _acc(r),
                  "ref" if ref else f"{r['top1_agree']:.3f}" if r.get("top1_agree") is not None else "-",
                  f"{r['bw_util']:.1%}" if r.get("bw_util") is not None else "-")
    return t


def chart(doc: dict, out: Path) -> Path:
    """PNG: tg tok/s, bytes, perplexity, task accuracy and top-1 agreement per artifact/runtime/adapter.

    The PyTorch reference records are drawn as vertical lines (one per adapter), not bars. A metric
    that was not measured is written "not measured" where its bar would be; a measured 0 gets its
    value written beside an empty bar, so the two never look alike.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgepeft import atomic

    refs = [r for r in doc["records"] if r.get("reference")]
    recs = [r for r in doc["records"] if not r.get("reference")]
    labels = [f"{artifact_label(r)}\n{r['runtime']}/{adapter_label(r)}" for r in recs]

    def ppl(r):
        return r["perplexity"]["ppl"] if r.get("perplexity") else None

    def acc(r):
        return r["accuracy"]["accuracy"] if r.get("accuracy") else None

    panels = [("decode tok/s", lambda r: r["tg"]["mean"] if r.get("tg") else None, "{:.1f}", False),
              ("MB (model + adapter)", lambda r: (r["model_bytes"] + r["adapter_bytes"]) / 1e6, "{:.0f}", False),
              ("perplexity (lower is better)", ppl, "{:.1f}", True),
              ("task accuracy", acc, "{:.0%}", True),
              ("top-1 agreement with PyTorch", lambda r: r.get("top1_agree"), "{:.2f}", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 1.6 + 0.5 * max(len(recs), 1)))
    styles = ["-", "--", ":", "-."]
    for ax, (title, get, fmt, with_ref) in zip(axes, panels):
        vals = [get(r) for r in recs]
        ax.barh(range(len(recs)), [v or 0 for v in vals], color="#4c72b0")
        fraction = fmt in ("{:.0%}", "{:.2f}")  # accuracy and agreement: always on a 0..1 axis
        top = 1.0 if fraction else max([v for v in vals if v is not None] + [1e-9])
        if with_ref:
            for i, r in enumerate(refs):
                v = get(r)
                if v is not None:
                    ax.axvline(v, color="#c44e52", linestyle=styles[i % len(styles)], linewidth=1.5,
                               label=f"PyTorch / {r['adapter']}: {fmt.format(v)}")
                    top = top if fraction else max(top, v)
            if any(get(r) is not None for r in refs):
                ax.legend(fontsize=7, loc="lower right")
        for i, v in enumerate(vals):
            if v is None:
                ax.text(top * 0.02, i, "not measured", va="center", fontsize=7, color="#888888", style="italic")
            else:
                ax.text(v + top * 0.02, i, fmt.format(v), va="center", fontsize=7)
        ax.set_xlim(0, top * 1.3)
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(len(recs)), labels if ax is axes[0] else [""] * len(recs), fontsize=7)
        ax.invert_yaxis()
    fig.suptitle(f"edgepeft bench on {doc['device']['profile']}"
                 + (" (red lines: the PyTorch fp32 reference)" if refs else ""))
    fig.tight_layout()
    with atomic.atomic_path(Path(out)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(out)


COMPARE_METRICS = (("pp", "pp t/s"), ("tg", "tg t/s"), ("ttft_ms", "ttft ms"), ("load_ms", "load ms"),
                   ("peak_rss_mb", "RSS MB"), ("swap_ms", "swap ms"), ("perplexity", "ppl"), ("bw_util", "bw_util"))


def _scalar(r: dict, metric: str):
    v = r.get(metric)
    if isinstance(v, dict):
        v = v.get("mean", v.get("median", v.get("ppl")))
    return v


def compare(a: dict, b: dict) -> list[dict]:
    """b / a for every metric of every record present in both (matched by artifact name, runtime, adapter)."""
    index = {(_key(r)[0], r["runtime"], r["adapter"]): r for r in a["records"]}
    rows = []
    for rb in b["records"]:
        if rb.get("reference"):  # the PyTorch rows have no speed to compare
            continue
        ra = index.get((_key(rb)[0], rb["runtime"], rb["adapter"]))
        if ra is None:
            continue
        row = {"artifact": _key(rb)[0], "runtime": rb["runtime"], "adapter": rb["adapter"]}
        for metric, _ in COMPARE_METRICS:
            va, vb = _scalar(ra, metric), _scalar(rb, metric)
            row[metric] = round(vb / va, 4) if va and vb is not None else None
        rows.append(row)
    if not rows:
        raise EdgepeftError("the two result files share no artifact/runtime/adapter records",
                            "Compare runs of the same artifacts (matched by file name, runtime and adapter)")
    return rows


def compare_table(rows: list[dict], a_name: str, b_name: str):
    from rich.table import Table

    t = Table(title=cell(f"{b_name} / {a_name} (ratio; >1 means larger in {b_name})"))
    for col in ("artifact", "runtime", "adapter", *(label for _, label in COMPARE_METRICS)):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(cell(r["artifact"]), cell(r["runtime"]), cell(r["adapter"]),
                  *("-" if r[m] is None else f"{r[m]:.3f}x" for m, _ in COMPARE_METRICS))
    return t
