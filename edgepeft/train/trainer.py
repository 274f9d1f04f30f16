"""QLoRA training on transformers + PEFT + TRL's SFTTrainer.

We write no training loop and no distribution code: SFTTrainer (completion-only loss from
our ``completion_mask``, optional packing) runs the steps, accelerate handles DDP when
started under ``accelerate launch -m edgepeft train``. What this module adds is the recipe
(quantization, optimizer and checkpointing picked from the hardware), atomic checkpoints,
a progress display, and the run record (adapter, manifest, loss plot).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from edgepeft import atomic
from edgepeft.errors import EdgepeftError, MismatchError
from edgepeft.keys import TRAIN_RUN_STATE as RUN_STATE  # what a --resume must agree with
from edgepeft.train.config import TrainConfig

CHECKPOINTS = "checkpoints"


@dataclass
class Recipe:
    """Hardware-dependent choices, recorded in the manifest."""

    device: str
    bits: int
    compute_dtype: str
    optimizer: str
    gradient_checkpointing: bool
    lora_dropout: float

    def quantization(self) -> dict:
        if self.bits == 4:
            # bitsandbytes' 4-bit block size is fixed at 64 weights per absmax.
            q = {"bits": 4, "method": "bitsandbytes", "quant_type": "nf4", "double_quant": True,
                 "compute_dtype": self.compute_dtype, "block_size": 64, "storage": "uint8"}
            if self.device == "cpu":
                from edgepeft.train.kernels import CPU_4BIT_PATH

                q["cpu_kernel"] = CPU_4BIT_PATH  # what --merge-into dequantized reproduces
            return q
        if self.bits == 8:
            return {"bits": 8, "method": "bitsandbytes", "quant_type": "llm.int8", "threshold": 6.0,
                    "compute_dtype": self.compute_dtype}
        return {"bits": self.bits, "method": "none", "dtype": self.weight_dtype}

    @property
    def weight_dtype(self) -> str:
        if self.bits == 16:
            return "bfloat16"
        return "float32" if self.bits == 32 or self.device == "cpu" else self.compute_dtype


def pick_recipe(cfg: TrainConfig) -> Recipe:
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EdgepeftError("--device cuda asked for, but torch sees no CUDA device", "Use --device cpu or auto")
    if device == "mps" and cfg.bits in (4, 8):
        raise EdgepeftError(f"--bits {cfg.bits} needs bitsandbytes, which has no MPS backend",
                            "Use --bits 16 or 32 on Apple silicon, or --device cpu")
    if device == "cuda":
        compute = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return Recipe(device, cfg.bits, compute, "paged_adamw_8bit", True, _dropout(cfg, GPU_DROPOUT))
    # fp32 compute on a CPU: bf16 compute diverged here once (loss 2.8 -> 4.7); it converges with the pinned
    # kernels now (benchmarks/results/train_profile.json, recipe_check) but is not the default yet.
    return Recipe(device, cfg.bits, "float32", "adamw_torch", False, _dropout(cfg, CPU_DROPOUT))


# LoRA dropout when --dropout is not given. On a CPU the dropout masks cost 16 % of a demo QLoRA step (a
# Bernoulli draw per module and step; 3.03 -> 2.56 s/step at 0) and the quickstart recipe keeps the task
# without them (96/100 held-out demo examples after 48 steps, 98/100 at 0.05; benchmarks/bench_train_profile.py
# recipe_check). On a GPU they cost little, and 0.05 is the usual QLoRA regulariser.
CPU_DROPOUT, GPU_DROPOUT = 0.0, 0.05


def _dropout(cfg: TrainConfig, default: float) -> float:
    return default if cfg.dropout is None else cfg.dropout


def load_model(base, recipe: Recipe):
    import torch

    dtype = getattr(torch, recipe.weight_dtype)
    kwargs: dict = {}
    if recipe.bits in (4, 8):
        from transformers import BitsAndBytesConfig

        compute = getattr(torch, recipe.compute_dtype)
        if recipe.bits == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if recipe.device == "cuda":
        from accelerate import PartialState

        kwargs["device_map"] = {"": PartialState().local_process_index}  # one full replica per DDP rank
    elif recipe.bits in (4, 8):
        kwargs["device_map"] = {"": recipe.device}
    model = base.load_model(dtype, **kwargs)
    model.config.use_cache = False
    if recipe.bits == 4 and recipe.device == "cpu":
        from edgepeft.train.kernels import pin_cpu_4bit_path

        pin_cpu_4bit_path(model)  # the same 4-bit kernels on every CPU, see edgepeft/train/kernels.py
    return model


def attach_lora(model, cfg: TrainConfig, recipe: Recipe):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if recipe.bits in (4, 8):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing)
    elif recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=recipe.lora_dropout, target_modules=cfg.target_modules,
                      bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        if "Target modules" in str(e) or "not found" in str(e):
            from edgepeft.archs import ARCHS

            arch = ARCHS.get(getattr(model.config, "model_type", ""))
            names = ",".join(arch.lora_targets if arch else ("q_proj", "k_proj", "v_proj", "o_proj"))
            raise EdgepeftError(f"--target {cfg.target} matches no module of this base ({e})",
                                f"Use all-linear or names such as {names}") from e
        raise


@contextlib.contextmanager
def labelled_positions_only(device_type: str):
    """Make TRL's fused LM head score only the labelled (completion) positions on a CPU, as it already
    does on Triton devices.

    TRL scores every position elsewhere because, under a compiler, the number of labelled positions would
    change the tile shapes on every batch (its own comment, ``trl/trainer/utils.py``); on a CPU nothing is
    compiled. The loss and its gradients are the same (the unlabelled positions are masked out either way),
    but the 49k-row head runs over the completion tokens only (121 of 320 positions in a demo batch): 0.82x
    the QLoRA step, median of 8 paired steps 3.12 -> 2.39 s at dropout 0 (benchmarks/bench_train_profile.py).
    Yields whether the switch took (a TRL without the hook keeps its own path)."""
    try:
        import trl.trainer.utils as U
    except ImportError:  # pragma: no cover - TRL older than the fused head
        U = None
    own = getattr(U, "_use_triton", None)
    if device_type != "cpu" or own is None:
        yield False
        return
    U._use_triton = lambda device: device.type == "cpu" or own(device)
    try:
        yield True
    finally:
        U._use_triton = own


def trainer_class():
    """SFTTrainer whose checkpoints appear atomically (staged, then renamed), and whose loss on a CPU
    scores only the labelled positions (``labelled_positions_only``)."""
    from trl import SFTTrainer

    class EdgeTrainer(SFTTrainer):
        _staging: str | None = None
        keep_checkpoints: int = 2

        def compute_loss(self, model, inputs, *args, **kwargs):
            with labelled_positions_only(self.args.device.type):
                return super().compute_loss(model, inputs, *args, **kwargs)

        def _get_output_dir(self, trial):
            return self._staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            real = Path(self.args.output_dir)
            name = f"checkpoint-{self.state.global_step}"
            staging = real / f"{atomic.TMP_PREFIX}{name}"  # one name for all ranks: each adds its RNG state
            staging.mkdir(parents=True, exist_ok=True)
            self._staging = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                final = real / name
                if final.exists():
                    shutil.rmtree(final)
                atomic.publish(staging / name, final)
                shutil.rmtree(staging, ignore_errors=True)
                _rotate(real, self.keep_checkpoints)
            self.accelerator.wait_for_everyone()

    return EdgeTrainer


def _rotate(ckpt_dir: Path, keep: int) -> None:
    done = sorted(checkpoints(ckpt_dir), key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
            and p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()]


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    found = checkpoints(ckpt_dir)
    return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None


def sft_config(cfg: TrainConfig, recipe: Recipe):
    from trl import SFTConfig

    args = SFTConfig(
        output_dir=str(cfg.run_dir / CHECKPOINTS),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # < 1 means a ratio of the total steps
        weight_decay=cfg.weight_decay,
        optim=recipe.optimizer,
        gradient_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if recipe.gradient_checkpointing else None,
        bf16=recipe.device == "cuda" and recipe.compute_dtype == "bfloat16",
        fp16=recipe.device == "cuda" and recipe.compute_dtype == "float16",
        use_cpu=recipe.device == "cpu",
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # rotation happens after our atomic rename, see EdgeTrainer
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        completion_only_loss=True,
        packing=cfg.packing,
        max_length=cfg.max_seq_len,  # data is truncated already (and counted); packing needs it
        dataset_num_proc=None,
        dataloader_num_workers=0,
    )
    return args


def check_resume(cfg: TrainConfig, run_state: dict) -> Path | None:
    """Return the checkpoint to resume from, after checking it belongs to this run."""
    run_dir = cfg.run_dir
    ckpt = last_checkpoint(run_dir / CHECKPOINTS)
    if not cfg.resume:
        if ckpt is not None:
            raise EdgepeftError(f"--out {run_dir} already holds checkpoints ({ckpt.name})",
                                "Pass --resume to continue that run, or choose a new --out")
        return None
    if ckpt is None:
        raise EdgepeftError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS}",
                            "Run without --resume to start training")
    import json

    old = json.loads((run_dir / RUN_STATE).read_text()) if (run_dir / RUN_STATE).is_file() else {}
    for key in ("base_fingerprint", "data_sha256", "bits", "rank", "alpha", "target", "seed", "batch_size",
                "grad_accum"):
        if key in old and old[key] != run_state[key]:
            raise MismatchError(f"--resume: {key} is {run_state[key]!r} but the checkpointed run used {old[key]!r}",
                                "Resume with the original settings, or start a new --out")
    return ckpt


def elapsed(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)
