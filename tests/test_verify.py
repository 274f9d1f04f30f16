"""The one verifier fails real exports with a broken writer, for every format the defect applies to.

Each case runs the real CLI in a subprocess with one writer defect injected (tests/broken_writer.py)
and must exit 2 with one line naming the failed metric against its bound, leaving no --out folder.
The same command without the defect passes (control), so a failure is the defect's, not the setup's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import assert_clean_error, make_tiny, run_cli
from lora_factory import make_lora
from peers import llama_cpp_src  # noqa: F401  (session fixture)

BROKEN = Path(__file__).parent / "broken_writer.py"


@pytest.fixture(scope="module")
def biased_qwen2(tmp_path_factory, tokenizer_dir) -> Path:
    """Tiny qwen2 with non-zero q/k/v biases (HF initialises them to zero, which would hide a dropped bias)."""
    import torch
    from safetensors.torch import load_file, save_file

    out = make_tiny("qwen2", tmp_path_factory.mktemp("biased-qwen2"), tokenizer_dir, seed=4)
    f = out / "model.safetensors"
    torch.manual_seed(4)
    sd = {k: (torch.randn_like(v) * 0.5 if k.endswith(".bias") else v) for k, v in load_file(str(f)).items()}
    assert sum(k.endswith(".bias") for k in sd) == 6  # q/k/v over 2 layers
    save_file(sd, str(f), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def rslora(tmp_path_factory, tiny_llama) -> Path:
    """rsLoRA r=4, alpha=8: scale alpha/sqrt(r) = 4, where alpha/r would give 2."""
    return make_lora(tiny_llama, tmp_path_factory.mktemp("rs") / "rs", seed=5, r=4, alpha=8, b_std=0.3,
                     use_rslora=True)


def broken(defect: str, *args, cwd: Path):
    import os
    import subprocess

    return subprocess.run([sys.executable, str(BROKEN), defect, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=dict(os.environ), timeout=900, check=False)


# (defect, format, quant, mode, base fixture, with the rsLoRA adapter, metric that must fail)
CASES = [
    ("qk_permutation", "gguf", "f32", "merged", "tiny_llama", False, "top1_agreement"),
    ("lora_scale", "gguf", "f32", "merged", "tiny_llama", True, "max_abs_logit_diff"),
    ("lora_scale", "gguf", "f32", "separate", "tiny_llama", True, "max_abs_logit_diff"),
    ("tokenizer", "gguf", "f32", "merged", "tiny_llama", False, "tokenizer_agreement"),
    ("bias", "gguf", "f32", "merged", "biased_qwen2", False, "max_abs_logit_diff"),
    # ONNX: the builder lays out Q/K itself (no permutation of ours to break)
    ("lora_scale", "onnx", "fp32", "merged", "tiny_llama", True, "max_abs_logit_diff"),
    ("lora_scale", "onnx", "fp32", "separate", "tiny_llama", True, "max_abs_logit_diff"),
    ("tokenizer", "onnx", "fp32", "merged", "tiny_llama", False, "tokenizer_agreement"),
    ("bias", "onnx", "fp32", "merged", "biased_qwen2", False, "max_abs_logit_diff"),
    # QNN HTP (int8 static graphs in the HTP simulator; lossy, so top-1 and perplexity are its checks)
    ("lora_scale", "qnn", "int8", "merged", "tiny_llama", True, "top1_agreement"),
    ("tokenizer", "qnn", "int8", "merged", "tiny_llama", False, "tokenizer_agreement"),
    ("bias", "qnn", "int8", "merged", "biased_qwen2", False, "top1_agreement"),
]
QNN = ["--target", "qnn-htp", "--device", "snapdragon-8-gen-3"]


@pytest.mark.parametrize("defect,fmt,quant,mode,base,adapter,metric", CASES,
                         ids=[f"{c[1]}-{c[3]}-{c[0]}" for c in CASES])
def test_broken_writer_fails_the_export(defect, fmt, quant, mode, base, adapter, metric, request, rslora, tmp_path):
    base_dir = request.getfixturevalue(base)
    args = ["export", "--format", "onnx" if fmt == "qnn" else fmt, "--base", base_dir, "--quant", quant, "--mode", mode,
            "--out", "out", *(QNN if fmt == "qnn" else [])]
    if adapter:
        args += ["--adapter", rslora, "--name", "rs", "--merge-into", "original"]
    proc = broken(defect, *args, "--quiet", cwd=tmp_path)  # quiet: no progress lines, the error is the one line
    assert_clean_error(proc, "failed verification", metric)
    assert not proc.stdout.strip(), proc.stdout  # no native library banner either (QNN's "# LIBNATIVE: ...")
    assert not (tmp_path / "out").exists(), list((tmp_path / "out").rglob("*"))
    # control: the same export without the defect passes and records every check
    ok = run_cli(*args, "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    rec = json.loads(ok.stdout)
    recs = rec.get("verifications") or [rec["verification"]]
    assert all(r["passed"] is True for r in recs), recs
    assert any(c["metric"] == metric for r in recs for c in r["checks"])


def test_no_verify_is_the_way_out(tiny_llama, tmp_path):
    proc = broken("qk_permutation", "export", "--base", tiny_llama, "--quant", "f32", "--out", "out", "--no-verify",
                  "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    v = json.loads(proc.stdout)["verification"]
    assert v["passed"] is None and v["skipped"] == "--no-verify" and v["checks"] == [], v
    assert (tmp_path / "out" / "base-merged-f32.gguf").is_file()
    shown = run_cli("export", "--base", tiny_llama, "--quant", "f32", "--out", "out2", "--no-verify", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "not verified: out2/base-merged-f32.gguf" in shown.stdout and "verified out2" not in shown.stdout, shown.stdout


# --- edgepeft verify ARTIFACT --reference: artifacts other tools made, and ours -----------------------

def test_verify_catches_llama_cpp_rslora_scale_and_passes_ours(tiny_llama, rslora, llama_cpp_src, tmp_path):  # noqa: F811
    """convert_lora_to_gguf.py applies alpha/r to an rsLoRA adapter (scale 2 where PEFT uses alpha/sqrt(r) = 4)."""
    from peers import run_peer

    peer = tmp_path / "peer"
    peer.mkdir()
    run_peer("convert_hf_to_gguf.py", tiny_llama, "--outtype", "f32", "--outfile", peer / "base-f32.gguf")
    run_peer("convert_lora_to_gguf.py", "--base", tiny_llama, "--outtype", "f16", "--outfile", peer / "rs.lora.gguf",
             rslora)
    ref = ["--reference", tiny_llama, "--reference-adapter", f"rs={rslora}"]
    # llama.cpp's own base conversion passes; its adapter does not
    proc = run_cli("verify", "peer", *ref, cwd=tmp_path)
    assert_clean_error(proc, "failed verification", "adapter rs")
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("PASS peer:") and any(ln.startswith("FAIL peer + adapter rs") for ln in lines), lines
    assert "top1_agreement" in proc.stdout and "max_abs_logit_diff" in proc.stdout
    # the same adapter through our export passes, as a folder and as a bundle
    assert run_cli("export", "--base", tiny_llama, "--adapter", rslora, "--name", "rs", "--mode", "separate",
                   "--quant", "f32", "--out", "ours", "--no-verify", cwd=tmp_path).returncode == 0
    ok = run_cli("verify", "ours", *ref, "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["ok"] and [v["adapter"] for v in doc["verifications"]] == [None, "rs"], doc
    assert all(c["passed"] for v in doc["verifications"] for c in v["checks"])
    assert run_cli("pack", "--base", "ours/base-f32.gguf", "--adapter", "ours/rs.lora.gguf", "--out", "bundle",
                   cwd=tmp_path).returncode == 0
    assert run_cli("verify", "bundle", *ref, cwd=tmp_path).returncode == 0
    assert run_cli("verify", "bundle", cwd=tmp_path).returncode == 0  # no --reference: the integrity check


def test_verify_merged_gguf_and_onnx_against_merged_reference(tiny_qwen2, tmp_path):
    """A --reference-adapter the artifact has no adapter for is merged into the reference."""
    ad = make_lora(tiny_qwen2, tmp_path / "ad", seed=6, r=4, b_std=0.3)
    for fmt, quant, out in (("gguf", "f16", "g"), ("onnx", "fp32", "o")):
        assert run_cli("export", "--format", fmt, "--base", tiny_qwen2, "--adapter", ad, "--name", "ad",
                       "--quant", quant, "--merge-into", "original", "--out", out, "--no-verify",
                       cwd=tmp_path).returncode == 0
        target = f"g/ad-merged-{quant}.gguf" if fmt == "gguf" else out
        ok = run_cli("verify", target, "--reference", tiny_qwen2, "--reference-adapter", f"ad={ad}", cwd=tmp_path)
        assert ok.returncode == 0, (ok.stdout, ok.stderr)
        assert ok.stdout.startswith(f"PASS {target} (reference: base + ad merged)"), ok.stdout
        # against the base alone the merged artifact is wrong, and verify says so
        bad = run_cli("verify", target, "--reference", tiny_qwen2, cwd=tmp_path)
        assert_clean_error(bad, "failed verification", target)


def test_architecture_rows_override_only_their_architecture():
    from edgepeft.export.tolerances import ARCH_TOLERANCES, TOLERANCES, bounds_for

    for (fmt, quant, arch), row in ARCH_TOLERANCES.items():
        assert (fmt, quant) in TOLERANCES  # an override, never a type the table lacks
        assert bounds_for(fmt, quant.upper(), arch) == row
        assert bounds_for(fmt, quant, "llama") == bounds_for(fmt, quant) == TOLERANCES[(fmt, quant)] != row
