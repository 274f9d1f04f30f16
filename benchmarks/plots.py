"""The PNGs the README shows, drawn from the JSON the benchmark scripts write.

Each script calls its ``plot_*`` after writing its JSON, so the picture always comes from the
numbers beside it. ``python benchmarks/plots.py`` redraws every PNG from benchmarks/results/*.json
without measuring anything again (bench_prune.py draws its own; bench_runtimes.py uses
edgepeft.bench.chart, as ``edgepeft bench --png`` does).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edgepeft import atomic

    fig.tight_layout()
    with atomic.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _plt().close(fig)
    return Path(path)


def _bar_panel(ax, labels, values, title: str, fmt: str, first: bool) -> None:
    """One horizontal bar panel of a row of panels; only the first carries the row labels."""
    _label_bars(ax, ax.barh(range(len(labels)), values, color="#4c72b0"), fmt)
    ax.set_yticks(range(len(labels)), labels if first else [""] * len(labels), fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)


def _label_bars(ax, bars, fmt: str) -> None:
    for b in bars:
        w = b.get_width()
        ax.text(w, b.get_y() + b.get_height() / 2, " " + fmt.format(w), va="center", fontsize=7)


def plot_gguf(result: dict, path: Path = RESULTS / "gguf.png") -> Path:
    """Export speed against llama.cpp's own pipeline, and quality per quant (merged and separate)."""
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    best = result.get("speed", {}).get("best", {})
    names = {"edgepeft": "edgepeft export (merged folder)", "edgepeft_warm": "edgepeft, tokenizer cached",
             "llama.cpp": "llama.cpp convert + quantize", "edgepeft_with_merge": "edgepeft from base + adapter",
             "peft_merge_then_llama.cpp": "PEFT merge, then llama.cpp"}
    keys = [k for k in names if k in best]
    y = np.arange(len(keys))
    ours = ["#4c72b0" if k.startswith("edgepeft") else "#999999" for k in keys]
    _label_bars(axes[0], axes[0].barh(y, [best[k]["seconds"] for k in keys], color=ours), "{:.1f} s")
    axes[0].set_yticks(y, [names[k] for k in keys], fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_title(f"GGUF {result.get('speed', {}).get('quant', 'q4_k_m')} export: seconds (best of "
                      f"{result.get('speed', {}).get('reps', '?')})", fontsize=9)
    _label_bars(axes[1], axes[1].barh(y, [best[k]["peak_rss_mb"] for k in keys], color=ours), "{:.0f} MiB")
    axes[1].set_yticks(y, [""] * len(keys))
    axes[1].invert_yaxis()
    axes[1].set_title("peak RSS (MiB)", fontsize=9)
    rows = result.get("quality", {}).get("rows", [])
    quants = list(dict.fromkeys(r["quant"] for r in rows))
    x = np.arange(len(quants))
    for j, mode in enumerate(("merged", "separate")):
        vals = [next((r["demo_exact_match"] for r in rows if r["quant"] == q and r["mode"] == mode), np.nan)
                for q in quants]
        bars = axes[2].bar(x + (j - 0.5) * 0.4, vals, 0.4, label=mode)
        for b, v in zip(bars, vals):
            axes[2].text(b.get_x() + b.get_width() / 2, v, f"{v:.0%}", ha="center", va="bottom", fontsize=6)
    axes[2].set_xticks(x, quants, fontsize=8)
    axes[2].set_ylim(0, 1.12)
    axes[2].set_title(f"demo exact match per quant ({result.get('quality', {}).get('demo_examples', '?')} "
                      "examples, llama.cpp)", fontsize=9)
    axes[2].legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def plot_onnx(result: dict, path: Path = RESULTS / "onnx.png") -> Path:
    """Size, decode speed, perplexity and demo accuracy per ONNX artifact, PyTorch as the reference line."""
    plt = _plt()
    rows = [r for r in result["rows"] if r.get("format") == "onnx"]
    ref = next((r for r in result["rows"] if str(r.get("format", "")).lower().startswith("pytorch")), None)
    labels = [f"{r['mode']} {r['quant']}" for r in rows]
    panels = [("MB (model + adapter)", lambda r: (r.get("bytes") or 0) / 1e6, "{:.0f}"),
              ("decode tok/s (under load)", lambda r: r.get("decode_tok_s"), "{:.1f}"),
              ("perplexity (wikitext-2)", lambda r: r.get("perplexity"), "{:.1f}"),
              ("demo exact match", lambda r: r.get("demo_accuracy"), "{:.0%}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 3.6))
    for ax, (title, get, fmt) in zip(axes, panels):
        vals = [get(r) for r in rows]
        _bar_panel(ax, labels, [v or 0 for v in vals], title, fmt, first=ax is axes[0])
        if ref is not None and get(ref) not in (None, 0):
            ax.axvline(get(ref), color="#c44e52", linewidth=1.5, label=f"PyTorch fp32: {fmt.format(get(ref))}")
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"ONNX (onnxruntime-genai) {result.get('base')} + trained demo adapter, "
                 f"{result.get('settings', {}).get('eval_n', '?')} demo examples", fontsize=10)
    return _save(fig, path)


def plot_train(result: dict, path: Path = RESULTS / "train.png") -> Path:
    """Tokens/s, s/step and peak RSS per training configuration."""
    plt = _plt()
    rows = result["train"]
    names = list(rows)
    panels = [("tokens/s (wall)", "tokens_per_s", "{:.1f}"), ("s/step", "s_per_step", "{:.1f}"),
              ("peak RSS MiB", "peak_rss_mb", "{:.0f}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 2.6))
    for ax, (title, key, fmt) in zip(axes, panels):
        _bar_panel(ax, names, [rows[n][key] for n in names], title, fmt, first=ax is axes[0])
    fig.suptitle(f"training {result.get('base')} on the {result.get('task')} task, {result.get('steps')} steps, "
                 f"{result.get('cpu_count')} CPU cores", fontsize=10)
    return _save(fig, path)


def plot_bench(doc: dict, path: Path = RESULTS / "bench_runtimes.png") -> Path:
    """An ``edgepeft bench`` document: the command's own chart (edgepeft.bench.chart)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edgepeft import bench

    return bench.chart(doc, path)


def plot_adapter_cost(result: dict, path: Path = RESULTS / "adapter_cost.png") -> Path:
    """Separate-mode decode and prefill as a fraction of the base alone, per adapter variant, with the
    0.90 target line; the variants are sorted by adapter bytes."""
    plt = _plt()
    rows = sorted(result["variants"].items(), key=lambda kv: -kv[1]["adapter_bytes"])
    names = [f"{n} ({v['adapter_bytes'] / 1e6:.1f} MB, {v['modules']} mod)" for n, v in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.9 + 0.34 * len(rows)))
    for ax, key, title in zip(axes, ("adapter_tg_ratio", "adapter_pp_ratio"),
                              ("decode (tg) vs base alone", "prefill (pp) vs base alone")):
        _bar_panel(ax, names, [v[key] for _, v in rows], title, "{:.2f}x", first=ax is axes[0])
        ax.axvline(result.get("target", 0.9), color="#c44e52", linestyle="--", linewidth=1.2)
        ax.set_xlim(0, 1.15)
    fig.suptitle(f"cost of a separate adapter: {result.get('base_file')} + LoRA in llama.cpp "
                 f"({result.get('cpu')}, median of {result.get('rounds')} rounds)", fontsize=9)
    return _save(fig, path)


def main() -> None:
    for name, plot in (("gguf", plot_gguf), ("onnx", plot_onnx), ("train", plot_train),
                       ("bench_runtimes", plot_bench), ("adapter_cost", plot_adapter_cost)):
        src = RESULTS / f"{name}.json"
        if src.is_file():
            print(f"wrote {plot(json.loads(src.read_text()), RESULTS / f'{name}.png')}")


if __name__ == "__main__":
    main()
