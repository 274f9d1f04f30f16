"""Malformed input, one case per test, through the real CLI in a subprocess.

Every case must give exactly one line ``edgepeft: error: ...`` naming the problem, exit
status 2, no traceback, and write no file (the tree under tmp_path is unchanged).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import FP_B, make_set, write_adapter
from conftest import assert_clean_error, run_cli

from edgepeft.bundle import seal_manifest


def files_under(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def bad(tmp_path: Path, *args, needles=(), root: Path | None = None):
    """Run ``edgepeft *args``; assert a clean one-line error and that nothing was written."""
    root = root or tmp_path
    before = files_under(root)
    proc = run_cli(*args)
    assert_clean_error(proc, *needles)
    assert files_under(root) == before, "bad input must not write files"
    return proc


@pytest.fixture
def src(tmp_path) -> dict[str, Path]:
    return make_set(tmp_path / "src")


@pytest.fixture
def bundle(src, tmp_path) -> Path:
    out = tmp_path / "bundle"
    assert run_cli("pack", "--base", src["base"], "--adapter", src["a"], "--out", out).returncode == 0
    return out


def _reseal(root: Path, edit) -> None:
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_bytes(seal_manifest(m))


# --- pack ------------------------------------------------------------------------------------

def test_pack_truncated_gguf(src, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src["a"].read_bytes()[:-500])
    bad(tmp_path, "pack", "--base", src["base"], "--adapter", cut, "--out", tmp_path / "o", needles=["truncated"])


def test_pack_zero_byte_file(src, tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    bad(tmp_path, "pack", "--base", src["base"], "--adapter", tmp_path / "empty.gguf", "--out", tmp_path / "o",
        needles=["empty", "0 bytes"])


def test_pack_directory_where_a_file_is_expected(src, tmp_path):
    (tmp_path / "dir.gguf").mkdir()
    bad(tmp_path, "pack", "--base", tmp_path / "dir.gguf", "--out", tmp_path / "o", needles=["directory"])


def test_pack_not_a_gguf(src, tmp_path):
    (tmp_path / "notes.gguf").write_text("hello, I am a text file\n")
    bad(tmp_path, "pack", "--base", tmp_path / "notes.gguf", "--out", tmp_path / "o", needles=["not a GGUF"])


def test_pack_adapter_for_another_base_with_same_shapes(src, tmp_path):
    other = write_adapter(tmp_path / "other.gguf", fingerprint=FP_B)
    bad(tmp_path, "pack", "--base", src["base"], "--adapter", other, "--out", tmp_path / "o",
        needles=["made for base bbbbbbbb"])


def test_pack_rank_mismatch(src, tmp_path):
    r = write_adapter(tmp_path / "r.gguf", rank=4, b_rank=8)
    bad(tmp_path, "pack", "--base", src["base"], "--adapter", r, "--out", tmp_path / "o",
        needles=["rank mismatch", "lora_a rank 4", "lora_b rank 8"])


def test_pack_adapter_passed_as_base(src, tmp_path):
    bad(tmp_path, "pack", "--base", src["a"], "--out", tmp_path / "o", needles=["not a model"])


def test_pack_output_is_a_file(src, tmp_path):
    (tmp_path / "taken").write_text("x")
    bad(tmp_path, "pack", "--base", src["base"], "--out", tmp_path / "taken", needles=["is a file"])


def test_pack_output_under_a_file(src, tmp_path):
    (tmp_path / "taken").write_text("x")
    bad(tmp_path, "pack", "--base", src["base"], "--out", tmp_path / "taken" / "bundle", needles=["is a file"])


def test_pack_output_dir_without_write_permission(src, tmp_path):
    # tests run as root, which ignores chmod; sysfs refuses everyone
    bad(tmp_path, "pack", "--base", src["base"], "--out", "/sys/edgepeft-bundle", needles=["cannot write in /sys"])


def test_pack_onnx_folder_without_sidecar(src, tmp_path):
    d = tmp_path / "onnx-merged"
    d.mkdir()
    (d / "genai_config.json").write_text("{}")
    bad(tmp_path, "pack", "--base", src["base"], "--onnx", d, "--out", tmp_path / "o", needles=["sidecar"])


# --- verify ----------------------------------------------------------------------------------

def test_verify_bit_flipped_adapter(bundle, tmp_path):
    p = bundle / "adapters/alpha.gguf"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))
    bad(tmp_path, "verify", bundle, needles=["adapters/alpha.gguf", "hash check"])


def test_verify_manifest_path_with_dotdot(bundle, tmp_path):
    _reseal(bundle, lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0" * 64, "size": 1}}))
    bad(tmp_path, "verify", bundle, needles=["../../etc/passwd", "leaves the bundle"])


def test_verify_malformed_manifest(bundle, tmp_path):
    (bundle / "manifest.json").write_text('{"manifest_version": 1, "files": {')
    bad(tmp_path, "verify", bundle, needles=["manifest.json", "not valid JSON"])


def test_verify_not_a_bundle(tmp_path):
    (tmp_path / "empty").mkdir()
    bad(tmp_path, "verify", tmp_path / "empty", needles=["no manifest.json"])


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes | None = None) -> Path:
    with tarfile.open(path, "w") as tf:
        tf.addfile(member, io.BytesIO(data) if data else None)
    return path


def test_verify_tar_with_path_traversal(tmp_path):
    m = tarfile.TarInfo("../../escaped.txt")
    m.size = 4
    tar = _tar_with(tmp_path / "evil.tar", m, b"evil")
    bad(tmp_path, "verify", tar, needles=["leaves the bundle"])
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_verify_tar_with_symlink(tmp_path):
    m = tarfile.TarInfo("manifest.json")
    m.type, m.linkname = tarfile.SYMTYPE, "/etc/passwd"
    bad(tmp_path, "verify", _tar_with(tmp_path / "link.tar", m), needles=["link"])


# --- inspect ---------------------------------------------------------------------------------

def test_inspect_truncated_gguf(src, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src["base"].read_bytes()[:2000])
    bad(tmp_path, "inspect", cut, needles=["truncated"])


# --- bench -----------------------------------------------------------------------------------

def test_bench_unknown_device(src, tmp_path):
    bad(tmp_path, "bench", src["base"], "--device", "pocket-calculator", needles=["unknown device", "x86-64-cpu"])


def test_bench_bad_yaml_profile(src, tmp_path):
    y = tmp_path / "dev.yaml"
    y.write_text("name: mine\nmemory_gb: [1,\n")
    bad(tmp_path, "bench", src["base"], "--device", y, needles=["dev.yaml:", "invalid YAML"])


def test_bench_profile_with_bad_value(src, tmp_path):
    y = tmp_path / "dev.yaml"
    text = (Path(__file__).parents[1] / "devices" / "x86-64-cpu.yaml").read_text()
    y.write_text(text.replace("memory_gb: 16", "memory_gb: -16"))
    bad(tmp_path, "bench", src["base"], "--device", y, needles=["memory_gb", "dev.yaml:"])


def test_bench_unreachable_ssh_host(src, tmp_path):
    bad(tmp_path, "bench", src["base"], "--device", "ssh://nobody@127.0.0.1:1", "--profile", "x86-64-cpu",
        "--timeout", "10", needles=["unreachable"])


# --- export (real tiny models; each case fails before any weights are written) --------------

@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    """A minimal PEFT LoRA folder for the tiny Llama (q_proj, rank 4, non-zero B)."""
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("lora") / "adapter"
    d.mkdir()
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(2):
        pre = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{pre}.lora_A.weight"] = rng.standard_normal((4, 64)).astype(np.float32)
        tensors[f"{pre}.lora_B.weight"] = rng.standard_normal((64, 4)).astype(np.float32)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    return d


def _copy_model(src: Path, dst: Path, skip=(), config_edit=None) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _copy_lora(lora: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in lora.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_export_unsupported_architecture(tiny_llama, tmp_path):
    m = _copy_model(tiny_llama, tmp_path / "gpt2ish", config_edit=lambda c: c.update(model_type="gpt2"))
    bad(tmp_path, "export", "--base", m, "--out", tmp_path / "o", needles=["gpt2", "llama"])


def test_export_missing_tokenizer(tiny_llama, tmp_path):
    m = _copy_model(tiny_llama, tmp_path / "notok", skip={"tokenizer.json", "tokenizer_config.json",
                                                          "special_tokens_map.json", "vocab.json", "merges.txt"})
    bad(tmp_path, "export", "--base", m, "--out", tmp_path / "o", needles=["tokenizer"])


def test_export_adapter_for_another_base(tiny_llama, lora, tmp_path):
    a = _copy_lora(lora, tmp_path / "run" / "adapter")
    (a / "manifest.json").write_text(json.dumps({"base": {"fingerprint": "f" * 64}}))
    bad(tmp_path, "export", "--base", tiny_llama, "--adapter", a, "--mode", "separate", "--out", tmp_path / "o",
        needles=["trained on base ffffffff"])


def test_export_rank_mismatch_between_config_and_weights(tiny_llama, lora, tmp_path):
    a = _copy_lora(lora, tmp_path / "r8")
    cfg = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    bad(tmp_path, "export", "--base", tiny_llama, "--adapter", a, "--mode", "separate", "--out", tmp_path / "o",
        needles=["rank 4", "r=8"])


def test_export_pickle_adapter_refused(tiny_llama, lora, tmp_path):
    a = _copy_lora(lora, tmp_path / "pickled")
    (a / "adapter_model.safetensors").rename(a / "adapter_model.bin")
    bad(tmp_path, "export", "--base", tiny_llama, "--adapter", a, "--mode", "separate", "--out", tmp_path / "o",
        needles=["pickle"])


def test_export_unknown_quant(tiny_llama, tmp_path):
    bad(tmp_path, "export", "--base", tiny_llama, "--quant", "q3_xl", "--out", tmp_path / "o",
        needles=["--quant", "q4_k_m"])


# --- train -----------------------------------------------------------------------------------

def test_train_malformed_jsonl(tiny_llama, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "2+2", "completion": "4"}\n{"prompt": "oops\n')
    bad(tmp_path, "train", "--base", tiny_llama, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "run",
        needles=["d.jsonl:2", "malformed JSON"])


# --- quickstart ------------------------------------------------------------------------------

def test_quickstart_output_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    bad(tmp_path, "quickstart", "--fast", "--out", tmp_path / "taken", needles=["is a file"])


@pytest.mark.parametrize("args,needles", [
    (("trian",), ("No such command 'trian'", "edgepeft --help")),
    (("export", "nowhere", "--format", "gguf"), ("edgepeft export", "Missing option '--base'")),
    (("bench", "--task"), ("edgepeft bench", "'--task' requires an argument")),
    (("verify", "--no-such-flag"), ("edgepeft verify", "No such option")),
])
def test_click_usage_errors_are_one_line(tmp_path, args, needles):
    """click's own usage errors (unknown command, missing/unknown option) follow the same one-line rule."""
    bad(tmp_path, *args, needles=needles)
