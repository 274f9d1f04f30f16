"""edgepeft train: config precedence, data errors, 4-bit CPU training, adapter parity, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import assert_clean_error

STEPS = 8


def _jsonl(path: Path, n: int = 48) -> Path:
    from edgepeft.train.tasks import get_task

    rows = [{"prompt": e.prompt, "completion": e.completion} for e in get_task("demo").examples("train")[:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(base, data, out, **kw):
    from edgepeft.train.config import TrainConfig

    opts = {"base": str(base), "data": str(data), "out": str(out), "max_steps": STEPS, "batch_size": 4, "lr": 5e-3,
                "max_seq_len": 96, "rank": 8, "alpha": 16, "save_steps": 4, "logging_steps": 1, "warmup_ratio": 0.0, "seed": 7}
    opts.update(kw)
    return TrainConfig(**opts)


# -- config ------------------------------------------------------------------------------------

def test_config_precedence_cli_then_yaml_then_defaults(tmp_path):
    from edgepeft.train.config import TrainConfig

    y = tmp_path / "train.yaml"
    y.write_text("rank: 4\nlr: 0.001\nmax-seq-len: 64\ntask: demo\nout: from-yaml\n")
    cfg = TrainConfig.from_sources({"rank": 32, "lr": None, "out": "from-cli"}, str(y))
    assert (cfg.rank, cfg.lr, cfg.max_seq_len, cfg.out, cfg.alpha) == (32, 1e-3, 64, "from-cli", 32.0)
    assert cfg.sources["rank"] == "CLI" and cfg.sources["lr"] == str(y)


@pytest.mark.parametrize("args, needles", [
    (["--rank", "0"], ["rank=0", "integer >= 1"]),
    (["--dropout", "1.5"], ["dropout=1.5", "[0, 1)"]),
    (["--target", "q_proj;v"], ["target", "all-linear"]),
    (["--config", "{yaml}", ], ["ranks", "train.yaml", "allowed"]),
])
def test_bad_config_values_name_field_value_and_allowed(cli, tmp_path, args, needles):
    y = tmp_path / "train.yaml"
    y.write_text("ranks: 4\n")
    args = [a.replace("{yaml}", str(y)) for a in args]
    assert_clean_error(cli("train", "--task", "demo", "--out", tmp_path / "run", *args), *needles)
    assert not (tmp_path / "run").exists()


# -- data errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("content, needles", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"\n', [":2:", "malformed json"]),
    ('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n', [":3:", "missing field 'completion'"]),
    ("", [":1:", "empty"]),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', [":1:", "no assistant turn"]),
])
def test_bad_jsonl_names_file_and_line(cli, tmp_path, tiny_llama, content, needles):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    p = cli("train", "--base", tiny_llama, "--data", data, "--out", tmp_path / "run")
    assert_clean_error(p, "bad.jsonl", *needles)
    assert not (tmp_path / "run").exists()


def test_completion_mask_covers_every_assistant_turn_only(tokenizer_dir):
    from transformers import AutoTokenizer

    from edgepeft.train.data import parse_line, tokenize_record

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rec = parse_line({"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "A1"},
                                   {"role": "user", "content": "q2"}, {"role": "assistant", "content": "A2"}]}, "x:1")
    ids, mask = tokenize_record(tok, rec)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "A1<|im_end|>\nA2<|im_end|>\n"
    assert ids == tok(tok.apply_chat_template(rec.messages, tokenize=False), add_special_tokens=False).input_ids


def test_template_less_tokenizer_ends_each_assistant_turn_with_eos(tmp_path):
    """Without a chat template (Gemma 3 270M's base) the plain transcript closes each assistant turn with
    EOS, in training's mask and in the prompt every runtime completes, so a trained model stops."""
    from conftest import make_gemma_tokenizer
    from transformers import AutoTokenizer

    from edgepeft.evaluate import cut, stop_markers
    from edgepeft.train.chat import render_prompt
    from edgepeft.train.data import parse_line, tokenize_record

    tok = AutoTokenizer.from_pretrained(make_gemma_tokenizer(tmp_path / "tok"))
    assert not getattr(tok, "chat_template", None) and tok.eos_token == "<eos>"
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "A2"}]
    ids, mask = tokenize_record(tok, parse_line({"messages": turns}, "x:1"))
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned.count(tok.eos_token_id) == 2, tok.decode(learned)
    assert tok.decode(learned).replace(" ", "") == "A1<eos>\nA2<eos>\n"
    prompt = render_prompt(tok, turns[:3])
    assert prompt == "user: q1\nassistant: A1<eos>\nuser: q2\nassistant: "
    assert cut("A2<eos>\nassistant: A2", stop_markers(tok)) == "A2"


# -- training ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_4bit(tmp_path_factory, tiny_llama):
    """One 4-bit NF4 run on CPU (fp32 compute), shared by the checks below."""
    from edgepeft.train.run import run_training

    tmp = tmp_path_factory.mktemp("t4bit")
    cfg = _cfg(tiny_llama, _jsonl(tmp / "d.jsonl"), tmp / "run")
    trainer, result = run_training(cfg, say=lambda m: None, log_lines=False)
    return trainer, result, cfg


def test_4bit_cpu_run_learns_and_writes_run_dir(trained_4bit, tiny_llama):
    from edgepeft.models import resolve_base

    _, _result, cfg = trained_4bit
    run = cfg.run_dir
    m = json.loads((run / "manifest.json").read_text())
    assert m["quantization"] == {"bits": 4, "method": "bitsandbytes", "quant_type": "nf4", "double_quant": True,
                                 "compute_dtype": "float32", "block_size": 64, "storage": "uint8",
                                 "cpu_kernel": "dequantize-fp32"}
    import bitsandbytes.functional

    bnb_default = "fused-bf16" if bitsandbytes.functional.has_avx512bf16() else "dequantize-fp32"
    assert m["kernels"]["cpu_4bit_path"] == "dequantize-fp32" and m["kernels"]["bitsandbytes_cpu_default"] == bnb_default
    assert set(m["kernels"]["cpu_flags"]) >= {"avx512_bf16", "amx_bf16"}
    assert m["recipe"]["optimizer"] == "adamw_torch" and m["base"]["fingerprint"] == resolve_base(tiny_llama).fingerprint
    assert m["lora"]["dropout"] == 0.0 and m["hyperparams"]["dropout"] is None  # no --dropout: 0 on a CPU
    assert m["train"]["steps"] == STEPS and m["seed"] == 7 and m["libraries"]["bitsandbytes"]
    losses = [loss for _, loss in m["loss_curve"]]
    assert len(losses) == STEPS and not any(math.isnan(x) for x in losses)  # no NaN: fp32 compute does not diverge
    assert losses[-1] < losses[0] - 0.5 and sum(losses[-2:]) < sum(losses[:2]), losses
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (run / "adapter").iterdir()}
    assert m["data"]["samples"] == 48 and m["data"]["truncated"] == 0
    assert not list(run.rglob(".edgepeft-tmp-*"))


def test_cpu_loss_scores_only_the_labelled_positions_with_the_same_loss_and_gradients(trained_4bit, monkeypatch):
    """The trainer's CPU loss (edgepeft.train.trainer.labelled_positions_only) runs the LM head over the
    completion positions only, and gives TRL's every-position loss and LoRA gradients."""
    import types

    import torch
    import trl.trainer.utils as U
    from trl import SFTTrainer

    trainer, _, _ = trained_4bit
    model = trainer.model
    model.eval()  # no dropout: both losses see the same forward
    batch = next(iter(trainer.get_train_dataloader()))
    rows, real, own = [], U._ChunkedLogProbFunction, U._use_triton
    monkeypatch.setattr(U, "_ChunkedLogProbFunction",
                        types.SimpleNamespace(apply=lambda h, *a: rows.append(h.shape[0]) or real.apply(h, *a)))

    def loss_and_grads(compute):
        model.zero_grad(set_to_none=True)
        loss = compute(model, dict(batch))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    every, every_grads = loss_and_grads(lambda m, b: SFTTrainer.compute_loss(trainer, m, b))
    ours, our_grads = loss_and_grads(trainer.compute_loss)
    n, length = batch["input_ids"].shape
    assert rows == [n * (length - 1), int((batch["labels"][:, 1:] != -100).sum())], rows
    assert rows[1] < rows[0] / 2, rows  # the prompts are most of each row
    assert U._use_triton is own  # TRL's hook restored after the step
    torch.testing.assert_close(ours, every, rtol=1e-5, atol=1e-6)
    assert every_grads.keys() == our_grads.keys() and every_grads
    for name, g in every_grads.items():
        torch.testing.assert_close(our_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad(set_to_none=True)


def test_saved_adapter_in_plain_peft_matches_trainer_logits(trained_4bit, tiny_llama):
    """Loaded with transformers + PEFT only (no edgepeft), the adapter reproduces the trained model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from edgepeft.train.kernels import pin_cpu_4bit_path, repacked_for_fused_kernel

    trainer, _, cfg = trained_4bit
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=q, device_map={"": "cpu"},
                                                 dtype=torch.float32)
    pin_cpu_4bit_path(plain)  # the kernel choice edgepeft train made (edgepeft/train/kernels.py), nothing else
    plain = PeftModel.from_pretrained(plain, cfg.run_dir / "adapter").eval()
    trained = trainer.model.eval()
    ids = torch.tensor([[1, 500, 20, 3000, 77, 9, 812, 4]])
    with torch.no_grad():
        a, b = trained(input_ids=ids).logits, plain(input_ids=ids).logits
        with trained.disable_adapter():
            base = trained(input_ids=ids).logits
    assert (a - base).abs().max() > 1e-2  # the adapter does something
    # Both run the dequantize-fp32 path on any CPU (tests/test_cpu_4bit.py forces bitsandbytes' feature check
    # each way). Bound 5e-3; measured 1.4e-3 with the check forced either way (the same value: the same
    # kernels). Unpinned, on an AVX-512 BF16 CPU, bitsandbytes' fused bf16 kernel gave 0.0217. The strict
    # 1e-5 check runs on the fp32 base in test_resume_after_ctrl_c_matches_uninterrupted.
    torch.testing.assert_close(b, a, atol=5e-3, rtol=0)
    assert (b.argmax(-1) == a.argmax(-1)).all()
    assert not repacked_for_fused_kernel(trained) and not repacked_for_fused_kernel(plain)


def test_resume_after_ctrl_c_matches_uninterrupted(tmp_path, tiny_llama):
    """Ctrl-C after step 5 keeps checkpoint-4; --resume then ends where an uninterrupted run does."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from edgepeft.train.run import Interrupted, run_training

    data = _jsonl(tmp_path / "d.jsonl")
    kw = {"bits": 32, "dropout": 0.1}  # dropout > 0: the resumed RNG state matters too

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **_):
            if state.global_step == 5:
                raise KeyboardInterrupt

    full_trainer, _ = run_training(_cfg(tiny_llama, data, tmp_path / "full", **kw), say=lambda m: None,
                                   log_lines=False)
    with pytest.raises(Interrupted) as exc:
        run_training(_cfg(tiny_llama, data, tmp_path / "cut", **kw), say=lambda m: None, log_lines=False,
                     callbacks=(CtrlC(),))
    assert exc.value.checkpoint.name == "checkpoint-4" and not (tmp_path / "cut" / "adapter").exists()
    _, result = run_training(_cfg(tiny_llama, data, tmp_path / "cut", resume=True, **kw), say=lambda m: None,
                             log_lines=False)
    assert result["resumed_from"] == "checkpoint-4" and result["steps"] == STEPS
    full = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    cut = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert full.keys() == cut.keys()
    for k in full:
        assert (full[k] - cut[k]).abs().max() < 1e-5, k
    # fp32 base: the saved adapter in plain PEFT reproduces the trainer's in-memory logits to 1e-5
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                      tmp_path / "full" / "adapter").eval()
    ids = torch.tensor([[1, 500, 20, 3000, 77, 9, 812, 4]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, full_trainer.model.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    # --resume once the last checkpoint reached --max-steps only rewrites the outputs from it
    _, again = run_training(_cfg(tiny_llama, data, tmp_path / "cut", resume=True, **kw), say=lambda m: None,
                            log_lines=False)
    assert again["steps_this_session"] == 0 and again["resumed_from"] == f"checkpoint-{STEPS}"
    redo = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert all((redo[k] == cut[k]).all() for k in cut)


def test_existing_checkpoints_need_resume_and_resume_needs_same_data(cli, tmp_path, tiny_llama):
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"data_sha256": "0" * 64}))
    data = _jsonl(tmp_path / "d.jsonl", 8)
    assert_clean_error(cli("train", "--base", tiny_llama, "--data", data, "--out", run), "--resume")
    assert_clean_error(cli("train", "--base", tiny_llama, "--data", data, "--out", run, "--resume"), "data_sha256")
    assert_clean_error(cli("train", "--base", tiny_llama, "--data", data, "--out", tmp_path / "new", "--resume"),
                       "no checkpoint")


@pytest.mark.slow
def test_cli_and_accelerate_launch_train_then_eval(cli, tmp_path, tiny_qwen2):
    """`accelerate launch -m edgepeft train` (how DDP runs) on the 4-bit path, then `edgepeft eval`."""
    import subprocess
    import sys

    data = _jsonl(tmp_path / "d.jsonl", 16)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "edgepeft", "train", "--base", str(tiny_qwen2), "--data", str(data), "--out", str(out),
                        "--max-steps", "2", "--batch-size", "2", "--max-seq-len", "96", "--json"],
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout[p.stdout.index("{"):])
    assert r["steps"] == 2 and r["quantization"]["quant_type"] == "nf4"
    assert "[train] step 2/2 loss" in p.stderr  # plain log lines when not on a TTY (none with --quiet)
    e = cli("eval", "--base", tiny_qwen2, "--adapter", out, "--limit", "2", "--json")
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["adapter"] == str(out)


@pytest.mark.integration
def test_smollm2_few_qlora_steps_record_real_fingerprint(cli, tmp_path, smollm2):
    data = _jsonl(tmp_path / "d.jsonl", 8)
    p = cli("train", "--base", "smollm2-135m", "--data", data, "--out", tmp_path / "run", "--max-steps", "2",
            "--batch-size", "2", "--max-seq-len", "96", "--rank", "4", "--target", "q_proj,v_proj", "--json")
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["base"]["fingerprint"] == smollm2.fingerprint and m["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert m["quantization"]["quant_type"] == "nf4" and len(m["loss_curve"]) == 2
