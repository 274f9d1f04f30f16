"""The CPU 4-bit kernel path is the same whatever bitsandbytes' AVX-512 BF16 check says.

bitsandbytes switches CPU inference to a fused bf16 kernel (and logs a kernels-community line) when
its native library reports AVX-512 BF16. edgepeft pins the dequantize-fp32 path instead
(edgepeft/train/kernels.py) and silences the log line (edgepeft/quiet.py). Every test here forces
that check in subprocesses (tests/bnb_force/sitecustomize.py), so a machine with the flag also tests the
path of machines without it, and the reverse.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

FORCE_DIR = Path(__file__).parent / "bnb_force"
# The tests whose results depend on the 4-bit CPU kernels or on bitsandbytes' log lines.
BNB_TESTS = (
    "tests/test_train.py::test_4bit_cpu_run_learns_and_writes_run_dir",
    "tests/test_train.py::test_saved_adapter_in_plain_peft_matches_trainer_logits",
    "tests/test_train.py::test_bad_jsonl_names_file_and_line",
    "tests/test_train.py::test_existing_checkpoints_need_resume_and_resume_needs_same_data",
    "tests/test_surgery.py::test_merge_dequantized_matches_qlora_model",
    "tests/test_bad_input.py::test_train_malformed_jsonl",
)
BNB_TEST_COUNT = 9  # test_bad_jsonl_names_file_and_line has 4 cases


def forced_env(value: str) -> dict:
    path = os.pathsep.join(p for p in (str(FORCE_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "EDGEPEFT_TEST_AVX512BF16": value}


@pytest.mark.parametrize("value", ["0", "1"])
def test_feature_check_is_forced(value):
    code = ("import bitsandbytes.functional as F, bitsandbytes.nn as nn; import torch;"
            "print(F.has_avx512bf16(), nn.Linear4bit(8, 8).support_avx512bf16_for_cpu)")
    out = subprocess.run([sys.executable, "-c", code], env=forced_env(value), capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()
    assert out == [str(value == "1")] * 2


def native_check() -> str:
    """What bitsandbytes' AVX-512 BF16 check says on this machine, unforced: "1" or "0"."""
    code = "import bitsandbytes.functional as F; print(int(F.has_avx512bf16()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return out.stdout.split()[-1]


def test_bnb_dependent_tests_pass_on_the_other_path():
    """Merge parity (1e-4), saved-adapter parity (5e-3), manifest and one-line errors hold on both paths.

    This suite runs BNB_TESTS on the machine's own path; here they run again with the check forced the
    other way, so every machine tests both (forcing the machine's own value would repeat the suite's run)."""
    native = native_check()
    assert native in ("0", "1"), native
    root = Path(__file__).parent.parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                           *BNB_TESTS], cwd=root, env=forced_env("0" if native == "1" else "1"), capture_output=True,
                          text=True, timeout=1800, check=False)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    m = re.search(r"(\d+) passed", proc.stdout)
    assert m and int(m.group(1)) == BNB_TEST_COUNT, tail  # every listed test ran, none skipped or deselected
    assert " skipped" not in proc.stdout.splitlines()[-1], tail


@pytest.mark.parametrize("value", ["0", "1"])
def test_train_prints_only_edgepeft_lines(value, tmp_path, tiny_llama):
    """No kernels-community line (or any other library line) with the check either way; --debug shows it."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "2+2", "completion": "4"}\n{"prompt": "3+3", "completion": "6"}\n')
    proc = run_cli("train", "--base", tiny_llama, "--data", data, "--out", tmp_path / "run", "--max-steps", "1",
                   cwd=tmp_path, env=forced_env(value))
    assert proc.returncode == 0, proc.stderr
    noise = re.compile(r"kernels-community|Failed to load|[Ww]arning|deprecated|it/s\]|^\[transformers\]")
    assert not [ln for ln in proc.stderr.splitlines() if noise.search(ln)], proc.stderr
    assert "kernels-community" not in proc.stdout
    kernels = json.loads((tmp_path / "run" / "manifest.json").read_text())["kernels"]
    assert kernels["cpu_4bit_path"] == "dequantize-fp32"
    assert kernels["bitsandbytes_cpu_default"] == ("fused-bf16" if value == "1" else "dequantize-fp32")


def test_debug_keeps_library_lines(tmp_path, tiny_llama):
    """The silencing is what removes the line: --debug shows bitsandbytes' own log line again."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "oops\n')
    proc = run_cli("train", "--debug", "--base", tiny_llama, "--data", data, "--out", tmp_path / "run",
                   cwd=tmp_path, env=forced_env("1"))
    assert proc.returncode != 0 and "kernels-community" in proc.stderr, proc.stderr[-2000:]
