"""SIGKILL mid-pack and mid-export: nothing half-written under a final name, nothing earlier lost.

The CLI runs in a subprocess with ``EDGEPEFT_PAUSE_AT="<point glob>=<marker>"``
(edgepeft.atomic.fault_point): it writes the marker and sleeps when it reaches the point,
and the test SIGKILLs it there, so the kill lands at the same place on every run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bundle_factory import make_set, write_adapter
from conftest import run_cli

from edgepeft import bundle as B
from edgepeft.atomic import TMP_PREFIX
from edgepeft.errors import EdgepeftError


def kill_at(point: str, *args, tmp_path: Path, timeout: float = 300) -> str:
    """Run ``edgepeft *args`` until it reaches ``point``, SIGKILL it there; return the point's name."""
    marker = tmp_path / f"marker-{time.monotonic_ns()}"
    env = {**os.environ, "EDGEPEFT_PAUSE_AT": f"{point}={marker}"}
    proc = subprocess.Popen([sys.executable, "-m", "edgepeft", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"edgepeft exited ({proc.returncode}) before reaching {point}: {err[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"edgepeft did not reach {point} in {timeout}s")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return marker.read_text()


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(TMP_PREFIX) and TMP_PREFIX not in p.as_posix()}


@pytest.fixture
def src(tmp_path) -> dict[str, Path]:
    return make_set(tmp_path / "src")


@pytest.mark.parametrize("point", ["pack:copied:base", "pack:copied:beta", "before-rename:bundle"])
def test_kill_mid_pack_leaves_nothing_and_rerun_succeeds(src, tmp_path, point):
    out = tmp_path / "work" / "bundle"
    out.parent.mkdir()
    args = ("pack", "--base", src["base"], "--adapter", src["a"], "--adapter", src["b"], "--out", out)
    assert kill_at(point, *args, tmp_path=tmp_path) == point
    assert not out.exists()  # no file (or folder) under the final name
    assert run_cli("verify", out).returncode == 2
    leftovers = list(out.parent.iterdir())
    assert leftovers and all(p.name.startswith(TMP_PREFIX) for p in leftovers)  # only the temp dir
    for p in leftovers:  # a temp dir is not a bundle verify accepts either
        assert run_cli("verify", p).returncode == 2
    ok = run_cli(*args)
    assert ok.returncode == 0, ok.stderr
    assert run_cli("verify", out).returncode == 0


@pytest.mark.parametrize("point", ["before-rename:gamma.gguf", "pack:copied:gamma", "before-rename:manifest.json"])
def test_kill_while_adding_keeps_the_earlier_bundle(src, tmp_path, point):
    out = tmp_path / "bundle"
    assert run_cli("pack", "--base", src["base"], "--adapter", src["a"], "--adapter", src["b"], "--out", out).returncode == 0
    before = snapshot(out)
    gamma = write_adapter(tmp_path / "gamma.gguf", name="gamma", rank=2, seed=9)
    kill_at(point, "pack", "--adapter", gamma, "--out", out, tmp_path=tmp_path)
    checked = B.load_checked(out)  # the earlier bundle: intact, verified, and without gamma
    assert checked.adapter_names == ["alpha", "beta"]
    with pytest.raises(EdgepeftError, match="no adapter 'gamma'"):
        checked.adapter_path("gamma")
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "adapters/gamma.gguf"} == before
    ok = run_cli("pack", "--adapter", gamma, "--out", out)
    assert ok.returncode == 0, ok.stderr
    assert B.load_checked(out).adapter_names == ["alpha", "beta", "gamma"]
    assert not [p for p in out.rglob(TMP_PREFIX + "*")]


def test_kill_mid_tar_keeps_no_partial_tar(src, tmp_path):
    out = tmp_path / "bundle"
    args = ("pack", "--base", src["base"], "--adapter", src["a"], "--out", out, "--tar")
    kill_at("before-rename:bundle.tar", *args, tmp_path=tmp_path)
    assert not out.with_name("bundle.tar").exists()
    assert run_cli("verify", out).returncode == 0  # the directory was complete before the tar began


# --- export ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_dir(tiny_llama, tmp_path_factory) -> Path:
    """A PEFT adapter on the tiny Llama with non-zero B (so it changes the model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft.save_pretrained(out)
    return out


def test_kill_mid_export_leaves_no_final_file(tiny_llama, lora_dir, tmp_path):
    out = tmp_path / "exp"
    args = ("export", "--format", "gguf", "--base", tiny_llama, "--adapter", lora_dir, "--mode", "separate",
            "--quant", "f16", "--no-verify", "--out", out)
    # 1. killed before its first file is renamed into place: a fresh --out gets no final file at all
    kill_at("before-rename:*.gguf", *args, "--name", "one", tmp_path=tmp_path)
    assert not [p for p in out.iterdir() if not p.name.startswith(TMP_PREFIX)]
    assert run_cli("verify", out).returncode == 2
    # 2. the rerun succeeds
    again = run_cli(*args, "--name", "one")
    assert again.returncode == 0, again.stderr
    record = json.loads((out / "gguf-export.json").read_text())
    assert {Path(f).name for f in record["files"]} == {"base-f16.gguf", "one.lora.gguf"}
    earlier = snapshot(out)
    # 3. another export killed inside the same --out: what the earlier run wrote is untouched
    kill_at("before-rename:two.lora.gguf", *args, "--name", "two", tmp_path=tmp_path)
    assert not (out / "two.lora.gguf").exists()
    now = snapshot(out)
    assert {k: now[k] for k in earlier} == earlier


def test_sigterm_mid_export_removes_its_temp_folders(tiny_llama, lora_dir, tmp_path):
    """`kill` (SIGTERM), unlike SIGKILL, lets edgepeft unwind: exit 143, one line, and neither the
    --merge-into auto candidates (in TMPDIR) nor the atomic output folder are left behind."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    out = tmp_path / "exp"
    marker = tmp_path / "marker"
    env = {**os.environ, "TMPDIR": str(tmp), "EDGEPEFT_PAUSE_AT": f"merge-auto:built:*={marker}"}
    proc = subprocess.Popen([sys.executable, "-m", "edgepeft", "export", "--format", "gguf", "--base",
                             str(tiny_llama), "--adapter", str(lora_dir), "--quant", "q8_0", "--merge-into", "auto",
                             "--no-verify", "--out", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "edgepeft never reached the merge-auto candidate"
            time.sleep(0.05)
        assert [p.name for p in tmp.iterdir() if p.name.startswith("edgepeft-merge-auto-")]  # it was there
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "edgepeft: terminated", err
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("edgepeft-")], list(tmp.iterdir())
    assert not out.exists() or not [p for p in out.iterdir()], list(out.iterdir())
