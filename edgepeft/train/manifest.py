"""The run record: RUN_DIR/manifest.json and RUN_DIR/loss.png.

``manifest["base"]["fingerprint"]`` is what export, pack and verify compare against a base;
``manifest["quantization"]`` says how the base was held during training.
"""

from __future__ import annotations

import datetime as _dt
from importlib import metadata
from pathlib import Path

from edgepeft import __version__, atomic
from edgepeft.fingerprint import sha256_file
from edgepeft.keys import TRAIN_MANIFEST
from edgepeft.paths import to_record
from edgepeft.train.kernels import kernel_record

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "safetensors")
SCHEMA = 1


def library_versions() -> dict:
    out = {"edgepeft": __version__}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def loss_curve(log_history: list[dict]) -> list[list[float]]:
    return [[int(e["step"]), round(float(e["loss"]), 6)] for e in log_history if "loss" in e and "step" in e]


def build_manifest(*, cfg, base, recipe, data: dict, adapter_dir: Path, lora_targets: list[str],
                   log_history: list[dict], train: dict, task: str | None) -> dict:
    adapter_file = adapter_dir / "adapter_model.safetensors"
    where = adapter_dir.parent / TRAIN_MANIFEST  # every path below is relative to this file
    hyper = {**cfg.hyperparams(), "out": to_record(cfg.run_dir, where), "base": base.record_spec(where)}
    if not str(data.get("source", "")).startswith("task:"):  # a JSONL file, not a bundled task
        data = {**data, "source": to_record(data["source"], where)}
        hyper["data"] = to_record(cfg.data, where) if cfg.data else None
    return {
        "schema": SCHEMA,
        "kind": "edgepeft-train-run",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "task": task,
        "base": {"spec": base.record_spec(where), "fingerprint": base.fingerprint, "model_type": base.model_type,
                 "source": base.source, "origin": base.record_origin(where)},
        "quantization": recipe.quantization(),
        "recipe": {"device": recipe.device, "optimizer": recipe.optimizer,
                   "gradient_checkpointing": recipe.gradient_checkpointing},
        "kernels": kernel_record(recipe.device, recipe.bits),
        "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": recipe.lora_dropout, "target": cfg.target,
                 "target_modules": sorted({t.rsplit(".", 1)[-1] for t in lora_targets})},
        "data": data,
        "hyperparams": hyper,
        "seed": cfg.seed,
        "libraries": library_versions(),
        "train": train,
        "loss_curve": loss_curve(log_history),
        "adapter": {"path": to_record(adapter_dir, where), "sha256": sha256_file(adapter_file),
                    "bytes": adapter_file.stat().st_size},
    }


def read_manifest(adapter: str | Path) -> dict:
    """The training manifest of an adapter folder: ADAPTER/manifest.json, or RUN_DIR/manifest.json with
    RUN_DIR the adapter's parent (what ``edgepeft train`` writes). ``{}`` when there is none."""
    from edgepeft.readers import read_json

    adapter = Path(adapter)
    for cand in (adapter / TRAIN_MANIFEST, adapter.resolve().parent / TRAIN_MANIFEST):
        if cand.is_file():
            return read_json(cand, "training manifest")  # bounded; a non-object is an IntegrityError
    return {}


def recorded_fingerprint(manifest: dict) -> str | None:
    """The base fingerprint the manifest records (``base.fingerprint``, written by build_manifest)."""
    base = manifest.get("base")
    fp = base.get("fingerprint") if isinstance(base, dict) else None
    return fp if isinstance(fp, str) and fp else None


def training_summary(manifest: dict) -> dict:
    """The few training facts an artifact carries (task, data hash, steps, final loss), not the loss curve."""
    data = manifest.get("data") if isinstance(manifest.get("data"), dict) else {}
    train = manifest.get("train") if isinstance(manifest.get("train"), dict) else {}
    out = {"task": manifest.get("task"), "data_sha256": data.get("sha256"), "steps": train.get("steps"),
           "final_loss": train.get("final_loss")}
    return {k: v for k, v in out.items() if v is not None}


def plot_loss(curve: list[list[float]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if curve:
        steps, losses = zip(*curve)
        ax.plot(steps, losses, marker=".", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
