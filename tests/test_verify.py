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
    # an adapter the artifact lost, at 4 bits, where top-1 and ppl are judged loosely (on smollm2-135m + the demo
    # adapter only adapter_kept and task_kept failed it: top-1 0.87, ppl 0.91)
    ("adapter_lost", "gguf", "q4_k_m", "merged", "tiny_llama", True, "adapter_kept"),
    ("adapter_lost", "onnx", "int8", "merged", "tiny_llama", True, "adapter_kept"),
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


# --- the task check: the adapter's own examples ------------------------------------------------------

def test_task_metrics_count_completion_positions_and_whole_examples():
    import numpy as np

    from edgepeft.export.reference import SeqStats
    from edgepeft.export.verify import TASK_MIN_LEARNED, _task_metrics

    # (ids, prompt length): positions 1-2 and 0-1 predict the completions; the prompt rows differ and are not read
    task = [([5, 6, 7, 8], 2), ([1, 2, 3], 1)]
    ref = [SeqStats(np.array([0, 7, 8, 0]), 0.0, 10), SeqStats(np.array([2, 3, 0]), 0.0, 10)]
    got = [SeqStats(np.array([9, 7, 8, 9]), 0.0, 10), SeqStats(np.array([2, 4, 0]), 0.0, 10)]
    m = _task_metrics(got * TASK_MIN_LEARNED, ref * TASK_MIN_LEARNED, task * TASK_MIN_LEARNED)
    assert m["task_kept"] == 0.5  # PyTorch right on every example, the artifact on the first of each pair
    t = m["task"]
    assert t["examples"] == 2 * TASK_MIN_LEARNED and t["positions"] == 4 * TASK_MIN_LEARNED
    assert t["top1_agreement"] == 0.75 and t["examples_agreeing"] == TASK_MIN_LEARNED
    assert (t["learned"], t["kept"]) == (2 * TASK_MIN_LEARNED, TASK_MIN_LEARNED)
    assert t["exact_match"] == {"reference": 1.0, "artifact": 0.5}
    few = _task_metrics(got[:1] * (TASK_MIN_LEARNED - 1), ref[:1] * (TASK_MIN_LEARNED - 1),
                        task[:1] * (TASK_MIN_LEARNED - 1))
    assert "task_kept" not in few and few["task"]["learned"] == TASK_MIN_LEARNED - 1  # too few learned: not judged


def _learned_task(base: Path, adapter: Path, out: Path, n: int = 24, new_tokens: int = 4) -> Path:
    """A task file the reference (base + adapter, PEFT, fp32) has learned: each completion is its own greedy
    continuation of the chat-rendered prompt, kept where the completion's text tokenizes back to those ids."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepeft.train.chat import render_prompt

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    rows = []
    for i in range(n):
        prompt = f"Item {i}: what comes next?"
        p_ids = tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        ids = list(p_ids)
        with torch.no_grad():
            for _ in range(new_tokens):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        gen = ids[len(p_ids):]
        text = tok.decode(gen)
        if tok(text, add_special_tokens=False)["input_ids"] == gen:
            rows.append({"prompt": prompt, "completion": text})
    assert len(rows) >= 16, len(rows)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_task_check_runs_each_adapters_own_examples(tiny_llama, rslora, tmp_path):
    """--calib is the adapter's task: its examples are checked on the adapter's variant (separate) or on the
    merged model, never on the base alone; an adapter that has learned nothing of a file is not judged on it."""
    from edgepeft.export.tolerances import bounds_for
    from edgepeft.export.verify import TASK_EXAMPLES

    task = _learned_task(tiny_llama, rslora, tmp_path / "task.jsonl")
    common = ["--base", tiny_llama, "--adapter", rslora, "--name", "rs", "--merge-into", "original", "--json"]
    sep = run_cli("export", "--format", "gguf", "--quant", "f32", "--mode", "separate", "--calib", task,
                  "--out", "g", *common, cwd=tmp_path)
    assert sep.returncode == 0, sep.stderr
    base_rec, ad_rec = json.loads(sep.stdout)["verifications"]
    assert "task" not in base_rec and "task_kept" not in {c["metric"] for c in base_rec["checks"]}
    assert ad_rec["task"]["examples"] == TASK_EXAMPLES and ad_rec["task"]["learned"] >= TASK_EXAMPLES - 1, ad_rec
    check = next(c for c in ad_rec["checks"] if c["metric"] == "task_kept")
    assert check["passed"] and check["bound"] == bounds_for("gguf", "f32").task_kept, check
    # the standalone verifier runs the same check on the folder
    alone = run_cli("verify", "g", "--reference", tiny_llama, "--reference-adapter", f"rs={rslora}", "--calib", task,
                    cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert "task_kept" in alone.stdout and f"task: {TASK_EXAMPLES} examples" in alone.stdout, alone.stdout
    merged = run_cli("export", "--format", "onnx", "--quant", "fp32", "--mode", "merged", "--calib", task,
                     "--out", "o", *common, cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    rec = json.loads(merged.stdout)["verification"]
    assert rec["adapter"] is None and rec["task"]["examples"] == TASK_EXAMPLES
    assert any(c["metric"] == "task_kept" and c["passed"] for c in rec["checks"]), rec["checks"]
    # a file the adapter never learned: reported, not judged
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}"}) + "\n"
                             for i in range(20)))
    unl = run_cli("export", "--format", "gguf", "--quant", "f32", "--mode", "separate", "--calib", other,
                  "--out", "u", *common, cwd=tmp_path)
    assert unl.returncode == 0, unl.stderr
    rec = json.loads(unl.stdout)["verifications"][1]
    assert rec["task"]["learned"] < 4 and "task_kept" not in {c["metric"] for c in rec["checks"]}, rec


def test_task_check_fails_a_writer_that_loses_the_task(tiny_llama, rslora, tmp_path):
    """The rsLoRA scale defect, on the adapter's own learned examples: task_kept is named among the failures."""
    task = _learned_task(tiny_llama, rslora, tmp_path / "task.jsonl")
    proc = broken("lora_scale", "export", "--base", tiny_llama, "--adapter", rslora, "--name", "rs", "--quant", "f32",
                  "--mode", "separate", "--calib", task, "--out", "out", "--quiet", cwd=tmp_path)
    assert_clean_error(proc, "failed verification", "task_kept")
    assert not (tmp_path / "out").exists()


def test_a_task_only_miss_says_the_type_loses_the_task():
    from edgepeft.errors import VerificationError
    from edgepeft.export.verify import require_passed

    def rec(*failed):
        return {"passed": False, "artifact": "m.gguf", "adapter": None,
                "checks": [{"metric": m, "value": 0.5, "bound": 0.55, "op": ">=", "passed": m not in failed}
                           for m in ("top1_agreement", "task_kept")]}

    with pytest.raises(VerificationError) as task_only:
        require_passed([rec("task_kept")], "gguf q4_k_m merged export")
    assert task_only.value.fix == VerificationError.TASK_FIX and "task_kept 0.5 < 0.55" in str(task_only.value)
    with pytest.raises(VerificationError) as both:
        require_passed([rec("task_kept", "top1_agreement")], "gguf q4_k_m merged export")
    assert both.value.fix == VerificationError.EXPORT_FIX


def test_onnx_quant_is_read_from_the_graph(tmp_path):
    """A folder without edgepeft's record (the builder's, Olive's) gets its tolerance row from its weights."""
    import numpy as np
    from onnx import helper, numpy_helper, save

    from edgepeft.artifacts import onnx_quant

    def graph(nodes, inits):
        g = helper.make_graph(nodes, "g", [], [], [numpy_helper.from_array(a, n) for n, a in inits.items()])
        path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx"
        save(helper.make_model(g), str(path))
        return onnx_quant(path)

    def nbits(bits, name):
        return helper.make_node("MatMulNBits", ["x", "w"], [name], domain="com.microsoft", bits=bits, K=8, N=8,
                                block_size=32)

    assert graph([nbits(4, "a"), nbits(8, "b")], {}) == "int4"  # k_quant_last: int4 body, int8 head
    assert graph([nbits(8, "a")], {}) == "int8"
    assert graph([helper.make_node("DequantizeLinear", ["q", "s"], ["y"])], {}) == "int8"
    assert graph([], {"w": np.zeros((8, 8), np.float16), "b": np.zeros(4, np.float32)}) == "fp16"
    assert graph([], {"w": np.zeros((8, 8), np.float32)}) == "fp32"
    assert graph([], {}) is None


def test_verify_reads_the_quant_of_a_folder_without_a_record(tiny_llama, tmp_path):
    """`edgepeft verify` on an ONNX folder another tool wrote (no edgepeft-onnx.json) picks the row itself."""
    assert run_cli("export", "--format", "onnx", "--base", tiny_llama, "--quant", "int8", "--out", "o",
                   "--no-verify", cwd=tmp_path).returncode == 0
    (tmp_path / "o" / "edgepeft-onnx.json").unlink()
    r = run_cli("verify", "o", "--reference", tiny_llama, "--json", cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    rec = json.loads(r.stdout)["verifications"][0]
    assert (rec["format"], rec["quant"], rec["passed"]) == ("onnx", "int8", True)
