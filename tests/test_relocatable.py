"""Relocatable artifacts and normal file modes, the way users make them.

Everything is written with relative paths from a working directory outside the checkout: a
training run dir, a GGUF and an ONNX export from it, a bundle. The folder is moved, the export
runs from the moved run dir, then everything is moved again and benched and verified from yet
another directory. Every path a record stores must be relative (edgepeft.paths), and every file
written must have the mode a plain ``open()`` gives under the umask (0666 & ~umask), ONNX
external data and bundle members included.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import run_cli

from edgepeft.paths import from_record

UMASK = 0o027  # not the default 022: a file that ignores the umask (0644) fails as surely as a 0600 one
FILE_MODE = 0o666 & ~UMASK
DIR_MODE = 0o777 & ~UMASK
SMALL = ["--prompt-tokens", "16", "--gen-tokens", "4", "-r", "1", "--ppl-tokens", "32", "--swap-cycles", "1"]


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def _assert_relative(record_file: Path, roots: list[Path]) -> dict:
    """No stored string is an absolute path or names the directories it was written in."""
    doc = json.loads(record_file.read_text())
    for s in _strings(doc):
        assert not s.startswith("/"), (record_file, s)
        assert not any(str(r) in s for r in roots), (record_file, s)
    return doc


def _assert_modes(root: Path) -> int:
    n = 0
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        want = DIR_MODE if p.is_dir() else FILE_MODE
        assert mode == want, f"{p.relative_to(root.parent)} has mode {mode:o}, expected {want:o}"
        n += p.is_file()
    return n


@pytest.mark.slow
def test_moved_run_exports_and_bundle_still_work(tiny_llama, tmp_path):
    first, second, elsewhere = tmp_path / "first", tmp_path / "second", tmp_path / "elsewhere"
    first.mkdir()
    elsewhere.mkdir()
    old = os.umask(UMASK)  # the CLI subprocesses inherit it
    try:
        _ok(run_cli("train", "--base", tiny_llama, "--task", "demo", "--bits", "32", "--max-steps", "1",
                    "--batch-size", "1", "--max-seq-len", "64", "--rank", "2", "--out", "runs/demo", cwd=first))
        shutil.move(first, second)  # the run dir moves before anything reads it
        _ok(run_cli("export", "--format", "gguf", "--base", tiny_llama, "--adapter", "runs/demo", "--name", "demo",
                    "--mode", "separate", "--quant", "f32", "--no-verify", "--out", "out/gguf", cwd=second))
        _ok(run_cli("export", "--format", "onnx", "--base", tiny_llama, "--adapter", "runs/demo", "--name", "demo",
                    "--mode", "separate", "--quant", "fp32", "--no-verify", "--out", "out/onnx", cwd=second))
        _ok(run_cli("pack", "--base", "out/gguf/base-f32.gguf", "--adapter", "out/gguf/demo.lora.gguf",
                    "--onnx", "out/onnx", "--out", "bundle", cwd=second))
        # every file an export and a pack write: 0666 & ~umask (ONNX external data was 0600)
        assert (second / "out/onnx/model.onnx.data").is_file()
        for d in ("out/gguf", "out/onnx", "bundle"):
            assert _assert_modes(second / d) >= 2, d

        roots = [first, second, tmp_path]
        run = _assert_relative(second / "runs/demo/manifest.json", roots)
        assert from_record(run["adapter"]["path"], second / "runs/demo/manifest.json").is_dir()
        # PEFT writes the load path (the dequantized cache, absolute); the run names the base as typed
        peft_cfg = _assert_relative(second / "runs/demo/adapter/adapter_config.json", roots)
        assert from_record(peft_cfg["base_model_name_or_path"], second / "runs/demo/adapter/x").resolve() == \
            Path(tiny_llama).resolve()
        rec = _assert_relative(second / "out/gguf/gguf-export.json", roots)
        for f in rec["files"] + [a["path"] for a in rec["adapter_files"]]:
            assert from_record(f, second / "out/gguf/gguf-export.json").is_file(), f
        assert [a["source"] for a in rec["adapters"]] == ["../../runs/demo/adapter"]
        _assert_relative(second / "out/onnx/edgepeft-onnx.json", roots)
        _assert_relative(second / "bundle/manifest.json", roots)

        moved = elsewhere / "moved"
        shutil.move(second, moved)  # everything moves again: bench and verify from another cwd
        _ok(run_cli("verify", "moved/bundle", cwd=elsewhere))
        _ok(run_cli("bench", "moved/out/gguf", "moved/bundle", *SMALL, "--no-ppl", "--json", "b.json", cwd=elsewhere))
        doc = _assert_relative(elsewhere / "b.json", roots + [moved])
        seen = {(Path(r["artifact"]).name, r["adapter"]) for r in doc["records"]}
        assert seen == {("gguf", "none"), ("gguf", "demo"), ("bundle", "none"), ("bundle", "demo")}, seen
        for r in doc["records"]:
            assert from_record(r["model_file"], elsewhere / "b.json").is_file(), r["model_file"]
        # an export from the twice-moved run dir still finds its adapter and base fingerprint
        _ok(run_cli("export", "--format", "gguf", "--base", tiny_llama, "--adapter", "moved/runs/demo",
                    "--mode", "merged", "--quant", "f32", "--no-verify", "--merge-into", "original",
                    "--out", "merged", cwd=elsewhere))
        _assert_modes(elsewhere / "merged")
    finally:
        os.umask(old)
