"""Benchmarks on real runtimes: speed, memory, quality and adapter swap, as JSON records.

One record per artifact x runtime x device x adapter (``None`` = the base alone). Metric
names follow llama-bench where they overlap (``pp`` and ``tg`` in tokens/s at
``--prompt-tokens`` / ``--gen-tokens``). Every timed metric runs ``repetitions`` times after
one warm-up and is reported as mean and stddev; tokenization and sampling are outside the
timed regions (``tg`` feeds fixed tokens, as llama-bench does).

``bw_util`` = tg tok/s x bytes read per token / memory bandwidth: how close decoding gets
to the memory-bound ceiling. Bytes per token are the weights a decode step reads (all
tensors but the embedding table, which is gathered one row at a time, plus the active
adapter); the bandwidth is measured here by a copy benchmark, or taken from the profile.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepeft import __version__
from edgepeft.errors import ConfigError, EdgepeftError
from edgepeft.profiles import DeviceProfile
from edgepeft.runtimes.base import FORMAT_RUNTIMES, RUNTIMES, Artifact, get_runtime

SCHEMA = "edgepeft.bench/1"
DEFAULT_TEXT = Path(__file__).parent / "data" / "wikitext2-valid-slice.txt"
GGUF_RECORD = "gguf-export.json"
ONNX_MANIFEST = "edgepeft-onnx.json"


@dataclass
class BenchConfig:
    prompt_tokens: int = 512
    gen_tokens: int = 128
    repetitions: int = 5
    ppl_file: Path | None = DEFAULT_TEXT
    ppl_tokens: int = 512
    ppl_ctx: int = 256
    swap_cycles: int = 5
    task: str | None = None  # demo task name for edgepeft.evaluate ("demo") or None
    task_limit: int = 20
    reference: str | None = None  # --base for top-1 agreement
    reference_adapters: dict = field(default_factory=dict)  # adapter name -> PEFT folder
    top1_tokens: int = 128

    def __post_init__(self):
        for name in ("prompt_tokens", "gen_tokens", "repetitions", "ppl_tokens", "ppl_ctx", "swap_cycles"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')}", v, "an integer >= 1")
        if self.ppl_file is not None:
            self.ppl_file = Path(self.ppl_file)
            if not self.ppl_file.is_file():
                raise EdgepeftError(f"--ppl-file {self.ppl_file} does not exist", "Pass a UTF-8 text file")

    @property
    def n_ctx(self) -> int:
        return max(self.prompt_tokens + 8, self.gen_tokens + 8, self.ppl_ctx + 8, self.top1_tokens + 8)


# ------------------------------------------------------------------ artifacts
def discover(path: str | Path, adapters: dict[str, Path] | None = None) -> Artifact:
    """Find model + adapters in what the user passed (a .gguf, an export folder, a bundle, an .onnx)."""
    p = Path(path)
    extra = {n: Path(a) for n, a in (adapters or {}).items()}
    for n, a in extra.items():
        if not a.is_file():
            raise EdgepeftError(f"--adapter {n}={a} does not exist", "Pass NAME=PATH to an adapter file")
    if not p.exists():
        raise EdgepeftError(f"artifact {p} does not exist", "Pass a .gguf, an export folder, or an .onnx file")
    if p.is_dir() and (p / "manifest.json").is_file():  # a bundle: hashes and fit checked first, no bypass
        from edgepeft.bundle import as_artifact

        return as_artifact(p, extra)
    if p.is_file() and p.suffix == ".gguf":
        return Artifact(p, "gguf", p, extra, _gguf_quant(p, None))
    if p.is_file() and p.suffix == ".onnx":
        return Artifact(p, "onnx", p, extra, None)
    if p.is_dir() and (p / "prefill_ctx.onnx").is_file() and (p / "decode_ctx.onnx").is_file():
        if extra:
            raise EdgepeftError(f"{p} is a QNN static export; it has no adapter inputs",
                                "QNN artifacts are merged; bench each merged export instead")
        return Artifact(p, "onnx-static", p, {}, "qnn-ctx")
    if p.is_dir() and (p / "genai_config.json").is_file():
        found = {a.name[: -len(".onnx_adapter")]: a for a in sorted(p.rglob("*.onnx_adapter"))}
        quant = _json(p / ONNX_MANIFEST).get("quant")
        return Artifact(p, "onnx-genai", p, {**found, **extra}, quant)
    if p.is_dir():
        record = _json(p / GGUF_RECORD)
        ggufs = sorted(p.glob("*.gguf"))
        found = {a.name[: -len(".lora.gguf")]: a for a in ggufs if a.name.endswith(".lora.gguf")}
        for a in record.get("adapter_files", []):
            found[a["name"]] = Path(a["path"]) if Path(a["path"]).is_absolute() else p / a["path"]
        models = [g for g in ggufs if g not in found.values()]
        if len(models) == 1:
            return Artifact(p, "gguf", models[0], {**found, **extra}, _gguf_quant(models[0], record.get("quant")))
        if (p / "model.onnx").is_file():
            return Artifact(p, "onnx", p / "model.onnx", extra, None)
        if len(models) > 1:
            raise EdgepeftError(f"{p} holds {len(models)} model GGUFs ({', '.join(m.name for m in models)})",
                                "Pass the one to benchmark")
    raise EdgepeftError(f"{p} is not a benchmarkable artifact",
                        "Pass a .gguf file, a GGUF/ONNX export folder, or an .onnx file")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _gguf_quant(path: Path, recorded: str | None) -> str | None:
    if recorded:
        return recorded.lower()
    from gguf import LlamaFileType

    from edgepeft.gguf_meta import _reader, check_gguf, field_value

    check_gguf(path)
    ft = field_value(_reader(path), "general.file_type")
    if ft is None:
        return None
    try:
        name = LlamaFileType(int(ft)).name
    except ValueError:
        return None
    return {"ALL_F32": "f32", "MOSTLY_F16": "f16", "MOSTLY_BF16": "bf16"}.get(name, name.replace("MOSTLY_", "").lower())


def bytes_per_token(artifact: Artifact, adapter: str | None) -> int:
    """Weight bytes one decode step reads: every tensor but gathered embedding tables, plus the adapter."""
    extra = artifact.adapters[adapter].stat().st_size if adapter else 0
    if artifact.format == "gguf":
        from edgepeft.gguf_meta import _reader

        tensors = {t.name: int(t.n_bytes) for t in _reader(artifact.model).tensors}
        tied = "output.weight" not in tensors
        return sum(b for n, b in tensors.items() if tied or n != "token_embd.weight") + extra
    if artifact.format == "onnx-static":  # the decode graph's QNN context binary holds its weights
        return sum(p.stat().st_size for p in artifact.model.glob("decode_ctx*.bin")) + extra
    import onnx

    model_file = artifact.model / "model.onnx" if artifact.model.is_dir() else artifact.model
    m = onnx.load(str(model_file), load_external_data=False)
    gathered = {n.input[0] for n in m.graph.node if n.op_type == "Gather"}
    matmuls = {i for n in m.graph.node if n.op_type != "Gather" for i in n.input}
    total = 0
    for init in m.graph.initializer:
        if init.name in gathered and init.name not in matmuls:
            continue
        ext = {e.key: e.value for e in init.external_data}
        total += int(ext["length"]) if "length" in ext else len(init.raw_data)
    return total + extra


# ------------------------------------------------------------------ fit checks
def check_fits(artifact: Artifact, profile: DeviceProfile, runtime: str, n_ctx: int) -> dict:
    """Refuse an artifact the device cannot hold or run; return the numbers checked."""
    fmt = "gguf" if artifact.format == "gguf" else "onnx"
    if runtime not in profile.runtimes:
        raise EdgepeftError(f"device {profile.name} has no runtime {runtime} (artifact {artifact.path.name})",
                            f"Runtimes there: {', '.join(profile.runtimes)}")
    if runtime not in FORMAT_RUNTIMES[artifact.format]:
        raise EdgepeftError(f"runtime {runtime} cannot run {artifact.format} artifact {artifact.path.name}",
                            f"Use: {', '.join(FORMAT_RUNTIMES[artifact.format])}")
    if fmt not in profile.formats:
        raise EdgepeftError(f"device {profile.name} does not run {fmt} artifacts ({artifact.path.name})",
                            f"Formats there: {', '.join(profile.formats)}")
    if artifact.quant and artifact.quant not in profile.formats[fmt]:
        raise EdgepeftError(f"device {profile.name} does not support {fmt} quant {artifact.quant} "
                            f"({artifact.path.name})", f"Supported there: {', '.join(profile.formats[fmt])}")
    weights = artifact.model_bytes + sum(artifact.adapter_bytes.values())
    kv = _kv_bytes(artifact, n_ctx)
    need = weights + kv
    if need > profile.usable_bytes:
        raise EdgepeftError(
            f"{artifact.path.name} needs {need / 1e9:.2f} GB (weights {weights / 1e9:.2f} GB + KV cache "
            f"{kv / 1e9:.2f} GB at {n_ctx} tokens) but {profile.name} has {profile.memory_gb:g} GB "
            f"({profile.usable_bytes / 1e9:.2f} GB usable)", "Pick a smaller quant, or a device with more memory")
    return {"need_bytes": need, "usable_bytes": profile.usable_bytes}


def _kv_bytes(artifact: Artifact, n_ctx: int) -> int:
    """f16 KV cache size from the model's own metadata (0 when it cannot be read)."""
    try:
        if artifact.format == "gguf":
            from edgepeft.gguf_meta import _reader, field_value

            r = _reader(artifact.model)
            arch = field_value(r, "general.architecture")
            layers = field_value(r, f"{arch}.block_count")
            heads = field_value(r, f"{arch}.attention.head_count")
            kv_heads = field_value(r, f"{arch}.attention.head_count_kv") or heads
            head_dim = field_value(r, f"{arch}.embedding_length") // heads
        else:
            folder = artifact.model if artifact.model.is_dir() else artifact.model.parent
            dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
            layers, kv_heads, head_dim = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
        return 2 * int(layers) * int(kv_heads) * int(head_dim) * n_ctx * 2
    except (KeyError, TypeError, ValueError, OSError, ZeroDivisionError):
        return 0


# ------------------------------------------------------------------ measurements
def stats(values: list[float], digits: int = 3) -> dict:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(mean, digits), "std": round(std, digits), "n": len(values)}


def measure_bandwidth(mib: int = 256, reps: int = 5) -> float:
    """Local memory bandwidth in GB/s: best numpy copy of a buffer far larger than cache (read + write)."""
    import numpy as np

    n = mib * (1 << 20) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return round(2 * src.nbytes / best / 1e9, 2)


class PeakRSS:
    """Peak resident memory of this process during a block (Linux resets the high-water mark)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.linux = True
        except OSError:
            self.linux = False
        return self

    def __exit__(self, *exc):
        self.mb = self.read()

    def read(self) -> float:
        if self.linux:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return round(int(line.split()[1]) / 1024, 1)
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (1 << 20 if sys.platform == "darwin" else 1024), 1)


def prompt_tokens(rt, n: int, text_file: Path | None) -> list[int]:
    text = text_file.read_text() if text_file else DEFAULT_TEXT.read_text()
    toks = rt.tokenize(text[: n * 12])
    while len(toks) < n:
        toks = toks + toks
    return toks[:n]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def speed(rt, prompt: list[int], cfg: BenchConfig) -> dict:
    """ttft/pp on a fresh KV cache with the whole prompt; tg: gen_tokens single steps after one token."""
    gen = [prompt[i % len(prompt)] for i in range(cfg.gen_tokens)]
    pp_s, tg_s = [], []
    for rep in range(cfg.repetitions + 1):  # rep 0 is the warm-up
        rt.reset()
        t = _timed(lambda: (rt.prefill(prompt), rt.logits()))
        rt.reset()
        rt.prefill(prompt[:1])
        g = _timed(lambda: rt.decode(cfg.gen_tokens, tokens=gen))
        if rep:
            pp_s.append(t)
            tg_s.append(g)
    return {"ttft_ms": stats([s * 1e3 for s in pp_s]),
            "pp": {**stats([len(prompt) / s for s in pp_s], 2), "tokens": len(prompt)},
            "tg": {**stats([cfg.gen_tokens / s for s in tg_s], 2), "tokens": cfg.gen_tokens}}


def perplexity(rt, cfg: BenchConfig) -> dict | None:
    import numpy as np

    if cfg.ppl_file is None:
        return None
    toks = rt.tokenize(cfg.ppl_file.read_text())[: cfg.ppl_tokens + 1]
    nll, count = 0.0, 0
    for start in range(0, len(toks) - 1, cfg.ppl_ctx):
        chunk = toks[start: start + cfg.ppl_ctx + 1]
        if len(chunk) < 2:
            break
        rt.reset()
        rt.prefill(chunk[:-1], all_logits=True)
        logits = rt.logits().astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    return {"ppl": round(math.exp(nll / count), 4), "tokens": count, "file": cfg.ppl_file.name}


def swap_times(rt, names: list[str], cycles: int) -> dict | None:
    """Median time to switch among the adapters and back to none, KV reset included."""
    if not names:
        return None
    order = [*names, None]
    rt.set_adapter(order[0])  # warm-up
    samples = []
    for _ in range(cycles):
        for name in order:
            samples.append(_timed(lambda n=name: rt.set_adapter(n)) * 1e3)
    return {"median": round(statistics.median(samples), 4), "mean": round(statistics.fmean(samples), 4),
            "n": len(samples), "order": [n or "none" for n in order]}


def top1_agreement(rt, tokens: list[int], ref_argmax) -> float | None:
    import numpy as np

    if ref_argmax is None:
        return None
    rt.reset()
    rt.prefill(tokens, all_logits=True)
    return round(float((rt.logits().argmax(axis=1) == np.asarray(ref_argmax)).mean()), 4)


def task_accuracy(rt, cfg: BenchConfig, tokenizer) -> dict | None:
    """Greedy exact match on a training task, scored by edgepeft.evaluate (the training issue's metric)."""
    if not cfg.task:
        return None
    from edgepeft import evaluate
    from edgepeft.train.tasks import get_task

    task = get_task(cfg.task)
    examples = task.examples("eval")[: cfg.task_limit]
    preds = []
    for prompt in evaluate.eval_prompts(examples, tokenizer):
        rt.reset()
        rt.prefill(rt.tokenize(prompt, special=True))
        out: list[int] = []
        for _ in range(task.max_new_tokens):
            out.append(int(rt.logits()[-1].argmax()))
            if any(m in rt.detokenize(out[-1:]) for m in evaluate.END_MARKERS):
                break
            rt.decode(1, tokens=out[-1:])
        preds.append(rt.detokenize(out))
    res = evaluate.score(preds, examples).as_dict()
    return {"task": cfg.task, "accuracy": round(res["accuracy"], 4), "correct": res["correct"], "total": res["total"]}


# ------------------------------------------------------------------ PyTorch reference
def reference_argmax(cfg: BenchConfig, tokens: list[int], names: list[str]) -> dict:
    """Top-1 token per position from PyTorch (base, and base + each PEFT adapter), keyed by adapter name."""
    if not cfg.reference:
        return {}
    import torch

    from edgepeft.models import resolve_base

    base = resolve_base(cfg.reference)
    model = base.load_model(torch.float32).eval()
    ids = torch.tensor([tokens])
    out = {}
    with torch.no_grad():
        out[None] = model(ids).logits[0].argmax(-1).tolist()
        for name in names:
            folder = cfg.reference_adapters.get(name)
            if folder is None:
                continue
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(model, folder).eval()
            out[name] = peft_model(ids).logits[0].argmax(-1).tolist()
            model = peft_model.unload()
    return out


# ------------------------------------------------------------------ one case
def run_case(artifact: Artifact, runtime: str, profile: DeviceProfile, cfg: BenchConfig,
             bandwidth_gb_s: float, device_label: str, tokenizer=None, ref_cache: dict | None = None) -> list[dict]:
    """All records for one artifact on one runtime: the base alone, then each adapter."""
    check_fits(artifact, profile, runtime, cfg.n_ctx)
    names = list(artifact.adapters)
    with PeakRSS() as rss:
        rt = get_runtime(runtime)
        t = time.perf_counter()
        rt.load(artifact, profile, n_ctx=cfg.n_ctx)  # fit checks read every file first: the page cache is warm
        total_ms = (time.perf_counter() - t) * 1e3
        try:
            prompt = prompt_tokens(rt, cfg.prompt_tokens, cfg.ppl_file)
            ref_tokens = prompt_tokens(rt, cfg.top1_tokens, cfg.ppl_file)
            if ref_cache is not None and cfg.reference and "argmax" not in ref_cache:
                ref_cache["argmax"] = reference_argmax(cfg, ref_tokens, names)
            ref = (ref_cache or {}).get("argmax", {})
            swap = swap_times(rt, names, cfg.swap_cycles)
            records = []
            for name in [None, *names]:
                rt.set_adapter(name)
                sp = speed(rt, prompt, cfg)
                bpt = bytes_per_token(artifact, name)
                rec = {
                    "artifact": str(artifact.path), "model_file": str(artifact.model), "format": artifact.format,
                    "quant": artifact.quant, "runtime": runtime, "providers": _providers(rt, profile, runtime),
                    "device": device_label, "profile": profile.name, "adapter": name or "none",
                    "model_bytes": artifact.model_bytes,
                    "adapter_bytes": artifact.adapter_bytes.get(name, 0) if name else 0,
                    "load_ms": round(rt.load_ms, 3), "check_ms": round(total_ms - rt.load_ms, 3), **sp,
                    "swap_ms": swap,
                    "perplexity": perplexity(rt, cfg),
                    "accuracy": task_accuracy(rt, cfg, tokenizer),
                    "top1_agree": top1_agreement(rt, ref_tokens, ref.get(name)),
                    "bytes_per_token": bpt,
                    "bandwidth_gb_s": bandwidth_gb_s,
                    "bw_util": round(sp["tg"]["mean"] * bpt / (bandwidth_gb_s * 1e9), 4),
                }
                records.append(rec)
        finally:
            rt.close()
    for rec in records:
        rec["peak_rss_mb"] = rss.mb
    return records


def _providers(rt, profile: DeviceProfile, runtime: str) -> list[str]:
    got = getattr(rt, "providers", None)
    return list(got) if got else list(profile.runtimes[runtime].providers)


def pick_runtimes(artifact: Artifact, profile: DeviceProfile, wanted: list[str]) -> list[str]:
    for r in wanted:
        if r not in RUNTIMES:
            raise EdgepeftError(f"unknown runtime {r!r}", f"Known runtimes: {', '.join(RUNTIMES)}")
    if wanted:
        return [r for r in wanted if r in FORMAT_RUNTIMES[artifact.format]] or [wanted[0]]
    for r in FORMAT_RUNTIMES[artifact.format]:
        if r in profile.runtimes:
            return [r]
    return [FORMAT_RUNTIMES[artifact.format][0]]


def document(records: list[dict], profile: DeviceProfile, cfg: BenchConfig, bandwidth: dict) -> dict:
    """The schema-versioned JSON document."""
    conf = asdict(cfg)
    conf["ppl_file"] = str(cfg.ppl_file) if cfg.ppl_file else None
    return {
        "schema": SCHEMA, "edgepeft_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
                 "python": platform.python_version()},
        "device": {"profile": profile.name, "memory_gb": profile.memory_gb, **bandwidth},
        "config": conf,
        "records": records,
    }


def load_document(path: str | Path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgepeftError(f"cannot read bench results {path} ({e})", "Pass a JSON file written by edgepeft bench")
    return load_document_obj(doc, str(path))


def load_document_obj(doc, source: str) -> dict:
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if not str(schema or "").startswith("edgepeft.bench/") or not isinstance(doc.get("records"), list):
        raise EdgepeftError(f"{source} is not an edgepeft bench result (schema {schema!r})",
                            "Pass a JSON file written by edgepeft bench --json")
    if schema != SCHEMA:
        raise EdgepeftError(f"{source} has schema {schema}, this edgepeft reads {SCHEMA}",
                            "Re-run the benchmark with this version")
    return doc


# ------------------------------------------------------------------ output
def _key(r: dict) -> tuple:
    return (Path(r["artifact"]).name, r["runtime"], r["device"], r["adapter"])


def _fmt(m) -> str:
    if m is None:
        return "-"
    if isinstance(m, dict):
        return f"{m['mean']:.1f} ± {m['std']:.1f}" if m.get("std") is not None else f"{m['mean']:.1f}"
    return f"{m:.0f}" if isinstance(m, float) else f"{m}"


def table(doc: dict):
    from rich.table import Table

    t = Table(title=f"edgepeft bench on {doc['device']['profile']} "
                    f"({doc['device'].get('bandwidth_gb_s')} GB/s, {doc['device'].get('bandwidth_source', '')})")
    for col in ("artifact", "runtime", "adapter", "MB", "load ms", "ttft ms", "pp t/s", "tg t/s", "swap ms",
                "RSS MB", "ppl", "acc", "top1", "bw_util"):
        t.add_column(col, justify="left" if col in ("artifact", "runtime", "adapter") else "right")
    for r in doc["records"]:
        t.add_row(Path(r["artifact"]).name, r["runtime"], r["adapter"],
                  f"{(r['model_bytes'] + r['adapter_bytes']) / 1e6:.1f}", _fmt(r["load_ms"]),
                  _fmt(r["ttft_ms"]), _fmt(r["pp"]), _fmt(r["tg"]),
                  f"{r['swap_ms']['median']:.2f}" if r.get("swap_ms") else "-", _fmt(r["peak_rss_mb"]),
                  f"{r['perplexity']['ppl']:.2f}" if r.get("perplexity") else "-",
                  f"{r['accuracy']['accuracy']:.2f}" if r.get("accuracy") else "-",
                  f"{r['top1_agree']:.3f}" if r.get("top1_agree") is not None else "-",
                  f"{r['bw_util']:.1%}" if r.get("bw_util") is not None else "-")
    return t


def chart(doc: dict, out: Path) -> Path:
    """PNG: tg tok/s, bytes, perplexity and accuracy per artifact/runtime/adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgepeft import atomic

    recs = doc["records"]
    labels = [f"{Path(r['artifact']).name}\n{r['runtime']}/{r['adapter']}" for r in recs]
    panels = [("tg tok/s", [r["tg"]["mean"] if r.get("tg") else 0 for r in recs],
               [r["tg"]["std"] if r.get("tg") else 0 for r in recs]),
              ("MB (model + adapter)", [(r["model_bytes"] + r["adapter_bytes"]) / 1e6 for r in recs], None),
              ("perplexity", [r["perplexity"]["ppl"] if r.get("perplexity") else 0 for r in recs], None),
              ("task accuracy", [r["accuracy"]["accuracy"] if r.get("accuracy") else 0 for r in recs], None)]
    fig, axes = plt.subplots(1, 4, figsize=(4.2 * 4, 1.2 + 0.45 * len(recs)))
    for ax, (title, vals, err) in zip(axes, panels):
        ax.barh(range(len(recs)), vals, xerr=err, color="#4c72b0")
        ax.set_title(title)
        ax.set_yticks(range(len(recs)), labels if ax is axes[0] else [""] * len(recs), fontsize=7)
        ax.invert_yaxis()
    fig.suptitle(f"edgepeft bench on {doc['device']['profile']}")
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

    t = Table(title=f"{b_name} / {a_name} (ratio; >1 means larger in {b_name})")
    for col in ("artifact", "runtime", "adapter", *(label for _, label in COMPARE_METRICS)):
        t.add_column(col)
    for r in rows:
        t.add_row(r["artifact"], r["runtime"], r["adapter"],
                  *("-" if r[m] is None else f"{r[m]:.3f}x" for m, _ in COMPARE_METRICS))
    return t
