"""``train(cfg)``: one training run from config to RUN_DIR/{adapter, manifest.json, loss.png}."""

from __future__ import annotations

import time
from pathlib import Path

from edgepeft import atomic
from edgepeft.keys import RUN_ADAPTER, TRAIN_MANIFEST
from edgepeft.train import trainer as T
from edgepeft.train.config import TrainConfig


class Interrupted(Exception):
    """Ctrl-C during training; carries the checkpoint that survives."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"interrupted at step {step}")


def prepare_data(cfg: TrainConfig, tokenizer, records, name: str):
    from edgepeft.train.data import data_sha256, tokenize_records

    tok = tokenize_records(tokenizer, records, cfg.max_seq_len)
    info = {"source": name, "sha256": data_sha256(records), "samples": len(records), "used": len(tok.rows),
            "truncated": tok.n_truncated, "max_seq_len": cfg.max_seq_len, "tokens": tok.n_tokens,
            "completion_tokens": tok.n_completion_tokens}
    return tok.rows, info


def train(cfg: TrainConfig, *, say=print, bar: bool = False, log_lines: bool = True) -> dict:
    """Train; returns a summary. Raises EdgepeftError on bad input, Interrupted on Ctrl-C."""
    return run_training(cfg, say=say, bar=bar, log_lines=log_lines)[1]


def run_training(cfg: TrainConfig, *, say=print, bar: bool = False, log_lines: bool = True,
                 callbacks: tuple = ()):
    """(trainer, summary): the trainer keeps the in-memory model, for tests and notebooks."""
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed

    from edgepeft.models import resolve_base
    from edgepeft.train.data import load_records
    from edgepeft.train.progress import make_callback

    records, data_name = load_records(cfg.data_name)  # bad data fails before any model loads
    base = resolve_base(cfg.base)
    tokenizer = base.load_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows, data_info = prepare_data(cfg, tokenizer, records, data_name)
    recipe = T.pick_recipe(cfg)
    run_dir = atomic.ensure_writable_dir(cfg.run_dir)
    run_state = {"base_fingerprint": base.fingerprint, "data_sha256": data_info["sha256"],
                 **{k: getattr(cfg, k) for k in ("bits", "rank", "alpha", "target", "seed", "batch_size",
                                                  "grad_accum")}}
    resume_from = T.check_resume(cfg, run_state)
    ckpt_dir = run_dir / T.CHECKPOINTS
    ckpt_dir.mkdir(exist_ok=True)
    args = T.sft_config(cfg, recipe)
    if args.process_index == 0:
        atomic.clean_stale_temps(ckpt_dir)
        atomic.write_json(run_dir / T.RUN_STATE, run_state)
    say(f"data {data_info['source']}: {data_info['samples']} samples, {data_info['tokens']} tokens, "
        f"{data_info['truncated']} truncated to --max-seq-len {cfg.max_seq_len}")
    q = recipe.quantization()
    say(f"base {base.spec} ({base.fingerprint[:12]}) on {recipe.device}: {cfg.bits}-bit "
        f"{q.get('quant_type', q.get('dtype'))}, compute {recipe.compute_dtype}, optimizer {recipe.optimizer}")

    set_seed(cfg.seed)  # LoRA A init and dropout masks depend on it
    model = T.attach_lora(T.load_model(base, recipe), cfg, recipe)
    trainer = T.trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer)
    trainer.keep_checkpoints = cfg.save_total_limit
    trainer.remove_callback(PrinterCallback)
    progress = make_callback(bar, log_lines)
    trainer.add_callback(progress)
    for cb in callbacks:
        trainer.add_callback(cb)

    t0, c0 = time.perf_counter(), time.process_time()
    try:
        if resume_from and 0 < cfg.max_steps <= _step(resume_from):
            _load_finished(trainer, resume_from)  # nothing left to train: write the run outputs
        else:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        raise Interrupted(trainer.state.global_step, T.last_checkpoint(ckpt_dir)) from None
    finally:
        progress.on_train_end(None, None, None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    state = trainer.state
    if not trainer.is_world_process_zero():
        return trainer, {}
    steps_run = state.global_step - (_step(resume_from) if resume_from else 0)
    train_info = {"steps": state.global_step, "steps_this_session": steps_run, "epochs": round(state.epoch or 0, 4),
                  "wall_s": round(wall, 1), "s_per_step": round(wall / max(steps_run, 1), 3),
                  # CPU seconds of this process: on a shared machine, wall time alone overstates the work
                  "cpu_s": round(cpu, 1),
                  "tokens_seen": int(state.num_input_tokens_seen),
                  "tokens_per_s": round(_session_tokens(state, resume_from) / wall, 1) if wall else None,
                  "final_loss": _final_loss(state.log_history), "resumed_from": resume_from.name if resume_from else None,
                  "world_size": args.world_size}
    return trainer, finish(cfg, base, recipe, trainer, data_info, train_info)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def _load_finished(trainer, checkpoint: Path) -> None:
    """``--resume`` when the checkpoint already reached ``--max-steps``: take its adapter and history."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    set_peft_model_state_dict(trainer.model, load_file(checkpoint / "adapter_model.safetensors"))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def _session_tokens(state, resume_from) -> int:
    if not resume_from:
        return int(state.num_input_tokens_seen)
    import json

    before = json.loads((resume_from / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0)
    return int(state.num_input_tokens_seen - before)


def _final_loss(history: list[dict]) -> float | None:
    losses = [e["loss"] for e in history if "loss" in e]
    return round(float(losses[-1]), 6) if losses else None


def _portable_base_name(config_file: Path, base) -> None:
    """PEFT stores ``base_model_name_or_path`` as the model's load path: here the dequantized cache
    folder, absolute and machine-specific. Store the base as the run's records name it (an alias as
    typed, a local path relative to the adapter folder) so the folder means the same after a move."""
    from edgepeft.readers import read_json

    cfg = read_json(config_file, "adapter_config.json", expect=dict)
    cfg["base_model_name_or_path"] = base.record_spec(config_file)
    atomic.write_json(config_file, cfg)


def finish(cfg, base, recipe, trainer, data_info: dict, train_info: dict) -> dict:
    """Write adapter/, manifest.json and loss.png atomically (adapter first: the manifest hashes it)."""
    from edgepeft.train.manifest import build_manifest, plot_loss

    run_dir = cfg.run_dir
    with atomic.atomic_dir(run_dir / RUN_ADAPTER) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        _portable_base_name(tmp / "adapter_config.json", base)
    targets = sorted(trainer.model.peft_config["default"].target_modules)
    manifest = build_manifest(cfg=cfg, base=base, recipe=recipe, data=data_info, adapter_dir=run_dir / RUN_ADAPTER,
                              lora_targets=targets, log_history=trainer.state.log_history, train=train_info,
                              task=cfg.task or (cfg.data if data_info["source"].startswith("task:") else None))
    plot_loss(manifest["loss_curve"], run_dir / "loss.png",
              f"{base.spec} {cfg.bits}-bit LoRA r={cfg.rank} on {data_info['source']}")
    atomic.write_json(run_dir / TRAIN_MANIFEST, manifest)
    return {"run_dir": str(run_dir), "adapter": str(run_dir / RUN_ADAPTER), "manifest": str(run_dir / TRAIN_MANIFEST),
            "loss_png": str(run_dir / "loss.png"), **train_info, "data": data_info,
            "quantization": manifest["quantization"]}
