"""edgepeft train --base BASE --data FILE.jsonl|--task demo --out RUN_DIR [options]"""

from __future__ import annotations

import click

from edgepeft.ui import STATE, edgepeft_command, fail, info, print_json, show_progress

# name -> (click type, help); every option defaults to None so YAML and defaults can fill it in.
OPTIONS = {
    "base": (str, "Base model: HF folder, .gguf, hub id or alias (default smollm2-135m)."),
    "data": (str, "Training JSONL (prompt/completion or messages per line), or a task name."),
    "task": (str, "Train on a bundled task instead of a file (demo)."),
    "out": (str, "Run directory: adapter/, manifest.json, loss.png, checkpoints/."),
    "rank": (int, "LoRA rank (default 16)."),
    "alpha": (float, "LoRA alpha (default 32)."),
    "dropout": (float, "LoRA dropout (default: 0 on a CPU, 0.05 on a GPU)."),
    "target": (str, "all-linear, or comma-separated module names such as q_proj,v_proj."),
    "bits": (click.Choice(["4", "8", "16", "32"]), "Base precision: 4 = NF4 QLoRA (default), 8, 16, 32."),
    "epochs": (float, "Epochs (default 1); ignored when --max-steps is given."),
    "max_steps": (int, "Stop after this many optimizer steps."),
    "lr": (float, "Learning rate (default 2e-4)."),
    "batch_size": (int, "Per-device batch size (default 4)."),
    "grad_accum": (int, "Gradient accumulation steps (default 1)."),
    "max_seq_len": (int, "Truncate samples to this many tokens (default 512)."),
    "seed": (int, "Random seed (default 42)."),
    "warmup_ratio": (float, "Warm-up as a fraction of all steps (default 0.03)."),
    "scheduler": (click.Choice(["cosine", "linear", "constant", "constant_with_warmup"]), "LR schedule."),
    "save_steps": (int, "Checkpoint every N steps (default 50)."),
    "save_total_limit": (int, "Keep this many checkpoints (default 2)."),
    "logging_steps": (int, "Log the loss every N steps (default 5)."),
    "device": (click.Choice(["auto", "cpu", "cuda", "mps"]), "Override the hardware pick (default auto)."),
}


def _options(fn):
    for name, (kind, help_) in reversed(OPTIONS.items()):
        fn = click.option("--" + name.replace("_", "-"), name, type=kind, default=None, help=help_)(fn)
    fn = click.option("--packing/--no-packing", "packing", default=None, help="Pack samples (TRL).")(fn)
    fn = click.option("--resume", "resume", is_flag=True, default=None, help="Continue from the last checkpoint.")(fn)
    fn = click.option("--config", "config", type=str, default=None, help="YAML file of the same fields.")(fn)
    return fn


@edgepeft_command("train", json_option=True)
@_options
def command(config: str | None, as_json: bool, **cli):
    """Train a LoRA adapter on a (by default 4-bit NF4) base: QLoRA with TRL's SFTTrainer.

    Precedence: CLI flags, then --config YAML, then defaults. Multi-GPU:
    accelerate launch -m edgepeft train ...
    """
    from edgepeft.train.config import TrainConfig
    from edgepeft.train.run import Interrupted, train

    if cli.get("bits") is not None:
        cli["bits"] = int(cli["bits"])
    if not cli.get("resume"):
        cli["resume"] = None
    cfg = TrainConfig.from_sources(cli, config)
    say = (lambda m: None) if STATE.quiet else info
    try:
        result = train(cfg, say=say, bar=show_progress(), log_lines=True)
    except Interrupted as e:
        where = f"last checkpoint {e.checkpoint} is intact; rerun with --resume" if e.checkpoint else \
            "no checkpoint was written yet"
        fail(f"interrupted at step {e.step}: {where}", 130)
    if not result:  # a non-zero DDP rank: rank 0 reports
        return
    if as_json:
        print_json(result)
    else:
        info(f"adapter {result['adapter']} ({result['steps']} steps, {result['wall_s']} s, "
             f"{result['s_per_step']} s/step, final loss {result['final_loss']}, "
             f"{result['data']['truncated']} samples truncated)")
