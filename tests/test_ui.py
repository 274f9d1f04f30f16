"""What a user sees: progress on long steps and the verification table at the end of an export.

Every test runs the real CLI, from another cwd with relative paths, and reads its output
through a pipe (or, for the live display, through a pseudo-terminal as a user's shell would).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from lora_factory import make_lora

# show every stage, however short: the tiny model's steps take well under the usual 2 s
SHOW_ALL = {"EDGEPEFT_SHOW_AFTER_S": "0"}
LONG = "an-export-folder-whose-name-is-long-enough-to-cross-eighty-columns-on-its-own"


@pytest.fixture(scope="module")
def lora(tiny_llama, tmp_path_factory) -> Path:
    return make_lora(tiny_llama, tmp_path_factory.mktemp("ui-lora") / "demo", seed=3)


def _export_args(tiny_llama, lora, out, *extra):
    return ["export", "--format", "gguf", "--base", tiny_llama, "--adapter", lora, "--quant", "q8_0",
            "--merge-into", "original", "--out", out, *extra]


def test_piped_export_plain_stage_lines_and_verification_table(cli, tiny_llama, lora, tmp_path):
    out = Path("exports") / LONG
    (tmp_path / "exports").mkdir()
    p = cli(*_export_args(tiny_llama, lora, out), cwd=tmp_path, env=SHOW_ALL)
    assert p.returncode == 0, p.stderr[-3000:]
    ours = [ln for ln in p.stderr.splitlines() if ln.startswith("[export] ")]
    for stage in ("merge + write tensors (f32) ...", "quantize q8_0 (llama.cpp) ...", "embed the tokenizer ...",
                  "verify in llama.cpp against PyTorch ..."):
        assert f"[export] {stage}" in ours, p.stderr
    # no live-display control codes when stderr is a pipe
    assert "\x1b[" not in p.stderr and "━" not in p.stderr
    artifact = str(out / "demo-merged-q8_0.gguf")
    assert len(artifact) > 80
    lines = p.stdout.splitlines()
    # the artifact path is printed whole on one line, never cut or folded at 80 columns
    assert f"verified {artifact} in llama.cpp against PyTorch fp32" in lines, p.stdout
    record = json.loads((tmp_path / out / "gguf-export.json").read_text())
    from edgepeft.verification_view import verifications

    (check,) = [c for v in verifications(record) for c in v["checks"] if c["metric"] == "top1_agreement"]
    top1 = f"{check['value']:.4g}"
    row = next(ln for ln in lines if "top1_agreement" in ln)
    assert top1 in row and any(ln.lstrip().startswith("demo (merged)") for ln in lines), p.stdout
    assert any(ln.startswith("verification: ") for ln in lines), p.stdout


def test_quiet_export_writes_no_status_lines(cli, tiny_llama, lora, tmp_path):
    p = cli(*_export_args(tiny_llama, lora, "o", "--quiet"), cwd=tmp_path, env=SHOW_ALL)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not [ln for ln in p.stderr.splitlines() if ln.startswith("[export]")], p.stderr
    assert "top1_agreement" in p.stdout  # --quiet drops progress, not the result


def test_tty_export_shows_live_progress(tiny_llama, lora, tmp_path):
    """stderr on a pseudo-terminal: the live display with stage names, a tensor count and a bar."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, **SHOW_ALL, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    proc = subprocess.Popen([sys.executable, "-m", "edgepeft", *map(str, _export_args(tiny_llama, lora, "o"))],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=slave, text=False)
    os.close(slave)
    chunks: list[bytes] = []

    def read():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=600)
    reader.join(timeout=30)
    os.close(master)
    tty = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, tty[-3000:]
    assert "merge + write tensors" in tty and "quantize q8_0 (llama.cpp)" in tty and "verify in llama.cpp" in tty
    # the count and bar of a stage whose total is known
    assert re.search(r"\d+/\d+ tensors", tty) and "━" in tty, tty[-2000:]
    assert "[export] " not in tty  # plain lines are for pipes only
    assert b"top1_agreement" in stdout


@pytest.mark.slow
def test_train_export_bench_stderr_holds_only_edgepeft_lines(cli, tiny_llama, tmp_path):
    """No library chatter (bitsandbytes' kernels-community line, transformers' notes, progress bars,
    llama.cpp/ORT logs): outside a TTY every stderr line is edgepeft's own ``[command]`` line."""
    from edgepeft.train.tasks import get_task

    rows = [{"prompt": e.prompt, "completion": e.completion} for e in get_task("demo").examples("train")[:8]]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = [
        # QLoRA 4-bit (bitsandbytes), the path that printed the kernels-community line
        ("train", ["train", "--base", tiny_llama, "--data", "d.jsonl", "--out", "run", "--max-steps", "2",
                   "--batch-size", "2", "--max-seq-len", "96", "--logging-steps", "1"]),
        # merged Q4_K_M with --merge-into auto (NF4 dequantize, llama.cpp quantizer, verify in llama.cpp)
        ("export", ["export", "--format", "gguf", "--base", tiny_llama, "--adapter", "run", "--name", "demo",
                    "--quant", "q4_k_m", "--out", "gguf"]),
        ("export", ["export", "--format", "onnx", "--base", tiny_llama, "--adapter", "run", "--name", "demo",
                    "--mode", "separate", "--quant", "int4", "--out", "onnx"]),
        ("bench", ["bench", "gguf", "onnx", "--prompt-tokens", "16", "--gen-tokens", "4", "-r", "1", "--ppl-tokens",
                   "32", "--swap-cycles", "1", "--task", "demo", "--task-limit", "1", "--reference", tiny_llama,
                   "--reference-adapter", "demo=run", "--json", "bench.json"]),
    ]
    for command, args in steps:
        p = cli(*args, cwd=tmp_path, env=SHOW_ALL)
        assert p.returncode == 0, p.stderr[-3000:]
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert lines, f"{command} said nothing on stderr"  # with every stage shown, each step has lines
        foreign = [ln for ln in lines if not ln.startswith(f"[{command}] ")]
        assert not foreign, f"{command}: lines that are not edgepeft's own:\n" + "\n".join(foreign)
