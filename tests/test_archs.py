"""The newer small-model architectures: gemma3_text, qwen3, phi3, smollm3 (tiny random-init configs).

Per architecture: GGUF merged and separate against the PyTorch PEFT model in llama.cpp (the
Llama family's bounds from test_gguf), tensor for tensor against llama.cpp's own converters
from the pinned sdist, the per-tensor transforms on base weights and LoRA B, ONNX merged and
separate through the onnxruntime-genai builder with ``.onnx_adapter`` swaps, and a QLoRA run.

Tiny configs keep what makes each architecture itself:
- gemma3_text: 6 layers (5 sliding + 1 global, Gemma 3's interleave), sliding_window 32 under
  140-token windows, separate rope bases per kind, q/k norms, tied embeddings, norm +1;
- qwen3: q/k norms, head_dim (32) != hidden/heads (16), tied embeddings;
- phi3: fused qkv_proj and gate_up_proj (its PEFT adapters target those, never q_proj);
- smollm3: 4 layers, so layer 3 is a NoPE layer; Llama's Q/K permutation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error, make_tiny, run_cli
from lora_factory import make_lora
from peers import llama_cpp_src, run_peer  # noqa: F401  (session fixture)
from test_gguf import (
    F32_BOUND,
    SEPARATE_BOUND,
    _tensors,
    agreement,
    assert_same_tensors,
    eval_ids,
    export,
    gguf_logits,
    llama_runtime,
    model_meta,
    peft_logits,
    runtime_logits,
    verifications,
)
from test_onnx import Ort

from edgepeft.archs import ARCHS

NEW = ["gemma3_text", "qwen3", "phi3", "smollm3"]
CONFIGS = {
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "num_hidden_layers": 6, "sliding_window": 32,
                    "tie_word_embeddings": True},
    "qwen3": {"head_dim": 32, "tie_word_embeddings": True},
    "phi3": {"original_max_position_embeddings": 256},  # = max_position_embeddings: no LongRoPE (see LONGROPE)
    "smollm3": {"num_hidden_layers": 4},
}


def _dir(mt: str) -> str:
    """Folder (hence general.name) for a tiny model: llama.cpp's vocab loader special-cases names that
    contain "phi3" and looks up "</s>", which the SmolLM2 vocabulary of the tiny models lacks."""
    return mt.replace("phi3", "fused-qkv")


@pytest.fixture(scope="session")
def tiny_new(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-new")
    return {mt: make_tiny(mt, root / _dir(mt), tokenizer_dir, **CONFIGS[mt]) for mt in NEW}


@pytest.fixture(scope="session")
def new_adapters(tmp_path_factory, tiny_new) -> dict[str, Path]:
    """Non-zero B on every linear the architecture has (phi3: the fused modules)."""
    root = tmp_path_factory.mktemp("new-adapters")
    return {mt: make_lora(tiny_new[mt], root / _dir(mt), seed=1, r=8, alpha=16, b_std=0.3, targets=ARCHS[mt].lora_targets)
            for mt in NEW}


# --- GGUF: llama.cpp == PEFT ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", NEW)
def test_gguf_merged_and_separate_match_peft(arch, tiny_new, new_adapters, tokenizer_dir, tmp_path):
    base, ad = tiny_new[arch], new_adapters[arch]
    ids = eval_ids(tokenizer_dir)
    ref, ref_base = peft_logits(base, ad, ids), peft_logits(base, None, ids)
    rec = export(base, tmp_path / "m", [ad], quant="f32", verify=True)
    merged = Path(rec["files"][0])
    n, top1, max_abs = agreement(ref, gguf_logits(merged, ids))
    assert n >= 256 and top1 >= 0.99 and max_abs <= F32_BOUND, (top1, max_abs)
    assert agreement(ref_base, gguf_logits(merged, ids))[2] > 10 * F32_BOUND  # the adapter matters
    verifications(rec)

    rec = export(base, tmp_path / "s", [ad], mode="separate", quant="f32", adapter_type="f32", names=["ad"])
    base_gguf, ad_gguf = (Path(f) for f in rec["files"])
    _, top1, max_abs = agreement(ref_base, gguf_logits(base_gguf, ids))
    assert top1 >= 0.99 and max_abs <= F32_BOUND, ("base", top1, max_abs)
    _, top1, max_abs = agreement(ref, gguf_logits(base_gguf, ids, lora=ad_gguf))
    assert top1 >= 0.99 and max_abs <= SEPARATE_BOUND, ("base+lora", top1, max_abs)


def test_gemma3_sliding_window_is_followed(tiny_new, tokenizer_dir, tmp_path):
    """The parity above is sensitive to the interleave: with no sliding window PyTorch moves far off llama.cpp."""
    base = tiny_new["gemma3_text"]
    ids = eval_ids(tokenizer_dir, n_chunks=1)
    rec = export(base, tmp_path / "m", [], quant="f32")
    got = gguf_logits(Path(rec["files"][0]), ids)
    assert agreement(peft_logits(base, None, ids), got)[2] <= F32_BOUND
    wide = tmp_path / "wide"
    make_tiny("gemma3_text", wide, tokenizer_dir, **{**CONFIGS["gemma3_text"], "sliding_window": 4096})
    assert agreement(peft_logits(wide, None, ids), got)[2] > 10 * F32_BOUND
    meta = model_meta(Path(rec["files"][0]))
    assert meta["gemma3.attention.sliding_window"] == "32"
    assert float(meta["gemma3.rope.freq_base_swa"]) == 10000.0 and float(meta["gemma3.rope.freq_base"]) == 1e6


# --- GGUF: tensor for tensor against llama.cpp's converters ----------------------------------------

@pytest.mark.parametrize("arch", NEW)
def test_gguf_matches_llama_cpp_converters(arch, tiny_new, new_adapters, llama_cpp_src, tmp_path):  # noqa: F811
    from edgepeft.security import read_metadata

    base, ad = tiny_new[arch], new_adapters[arch]
    rec = export(base, tmp_path / "ours", [ad], mode="separate", quant="f16")
    ours_base, ours_ad = (Path(f) for f in rec["files"])
    run_peer("convert_lora_to_gguf.py", "--base", base, "--outtype", "f16", "--outfile", tmp_path / "peer-ad.gguf", ad)
    assert_same_tensors(ours_ad, tmp_path / "peer-ad.gguf")
    mo, mp = read_metadata(ours_ad), read_metadata(tmp_path / "peer-ad.gguf")
    for key in ("general.type", "adapter.type", "adapter.lora.alpha", "general.architecture"):
        assert mo[key] == mp[key], key
    if arch == "phi3":
        # llama.cpp's Phi-3 converter reads tokenizer.model (Phi-3) unless the tokenizer class is
        # GPT2Tokenizer (Phi-4-mini); the tiny model's BPE tokenizer is the latter kind
        import shutil

        base = shutil.copytree(base, tmp_path / "fused-qkv-bpe")
        tc = json.loads((base / "tokenizer_config.json").read_text())
        (base / "tokenizer_config.json").write_text(json.dumps({**tc, "tokenizer_class": "GPT2Tokenizer"}))
    run_peer("convert_hf_to_gguf.py", base, "--outtype", "f16", "--outfile", tmp_path / "peer-base.gguf")
    assert_same_tensors(ours_base, tmp_path / "peer-base.gguf")
    bo, bp = model_meta(ours_base), model_meta(tmp_path / "peer-base.gguf")
    prefix = bp["general.architecture"] + "."
    arch_keys = [k for k in bp if k.startswith(prefix)]
    assert arch_keys and {k: bo.get(k) for k in arch_keys} == {k: bp[k] for k in arch_keys}
    assert sorted(k for k in bo if k.startswith(prefix)) == sorted(arch_keys)  # nothing extra either


# --- per-tensor transforms: base weights and LoRA B -----------------------------------------------

def _hf(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def _lora(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return {k.removeprefix("base_model.model."): v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


def _data(t) -> np.ndarray:
    return np.asarray(t.data).astype(np.float32).reshape([int(d) for d in reversed(t.shape)])


@pytest.mark.parametrize("arch", NEW)
def test_per_tensor_transforms_on_base_and_lora_b(arch, tiny_new, new_adapters, tmp_path):
    from edgepeft.export.gguf_tensors import permute_qk
    from edgepeft.models import resolve_base

    base, ad = tiny_new[arch], new_adapters[arch]
    rec = export(base, tmp_path, [ad], mode="separate", quant="f32", adapter_type="f32")
    g_base, g_ad = (_tensors(Path(f)) for f in rec["files"])
    hf, lora = _hf(base), _lora(ad)
    cfg = resolve_base(str(base)).config
    shift = 1.0 if arch == "gemma3_text" else 0.0
    # norms: Gemma stores 1 + w (every *norm, q/k norms included); the others store w
    np.testing.assert_array_equal(_data(g_base["output_norm.weight"]), hf["model.norm.weight"] + shift)
    np.testing.assert_array_equal(_data(g_base["blk.0.attn_norm.weight"]), hf["model.layers.0.input_layernorm.weight"] + shift)
    if arch in ("gemma3_text", "qwen3"):
        np.testing.assert_array_equal(_data(g_base["blk.1.attn_q_norm.weight"]),
                                      hf["model.layers.1.self_attn.q_norm.weight"] + shift)
        np.testing.assert_array_equal(_data(g_base["blk.1.attn_k_norm.weight"]),
                                      hf["model.layers.1.self_attn.k_norm.weight"] + shift)
    # embeddings: never scaled in the file (llama.cpp's Gemma graph multiplies by sqrt(hidden));
    # tied models have no output tensor, llama.cpp reuses token_embd
    np.testing.assert_array_equal(_data(g_base["token_embd.weight"]), hf["model.embed_tokens.weight"])
    assert ("output.weight" in g_base) == ("lm_head.weight" in hf) == (not cfg.get("tie_word_embeddings"))
    if arch == "phi3":  # fused modules stay fused, base and LoRA alike
        qkv, b = "model.layers.1.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj.lora_B.weight"
        np.testing.assert_array_equal(_data(g_base["blk.1.attn_qkv.weight"]), hf[qkv + ".weight"])
        np.testing.assert_array_equal(_data(g_ad["blk.1.attn_qkv.weight.lora_b"]), lora[b])
        np.testing.assert_array_equal(_data(g_ad["blk.1.ffn_up.weight.lora_b"]),
                                      lora["model.layers.1.mlp.gate_up_proj.lora_B.weight"])
        assert "blk.1.attn_q.weight" not in g_base
        return
    # Q rows: permuted for the Llama family (smollm3), as they are otherwise; LoRA B follows the weight
    q = "model.layers.1.self_attn.q_proj"
    want_w, want_b = hf[q + ".weight"], lora[q + ".lora_B.weight"]
    if ARCHS[arch].permute_qk:
        want_w, want_b = permute_qk(want_w, q + ".weight", ARCHS[arch], cfg), permute_qk(want_b, q + ".weight", ARCHS[arch], cfg)
        assert not np.array_equal(want_b, lora[q + ".lora_B.weight"])
    np.testing.assert_array_equal(_data(g_base["blk.1.attn_q.weight"]), want_w)
    np.testing.assert_array_equal(_data(g_ad["blk.1.attn_q.weight.lora_b"]), want_b)
    np.testing.assert_array_equal(_data(g_ad["blk.1.attn_q.weight.lora_a"]), lora[q + ".lora_A.weight"])


# --- Phi-4-mini's LongRoPE ------------------------------------------------------------------------

# Phi-4-mini's shape of rope: partial rotary (0.75), long/short factors per rotary frequency, an
# original context (256 here, 4096 there) below the maximum (x4: attention factor sqrt(1.25))
LONGROPE = {"partial_rotary_factor": 0.75, "max_position_embeddings": 1024, "original_max_position_embeddings": 256,
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                "original_max_position_embeddings": 256,
                                "short_factor": [1.0, 1.3, 1.9, 2.6, 3.5, 4.0],
                                "long_factor": [1.5, 3.0, 6.0, 12.0, 24.0, 40.0]}}


def test_phi4_mini_longrope_matches_peft_and_peer(tokenizer_dir, llama_cpp_src, tmp_path):  # noqa: F811
    """Both factor sets reach llama.cpp: a context up to the original one runs the short factors (HF:
    sequences up to it), a longer context the long ones (HF: longer sequences); base and adapter."""
    import shutil

    base = make_tiny("phi3", tmp_path / "fused-qkv-longrope", tokenizer_dir, **LONGROPE)
    ad = make_lora(base, tmp_path / "ad", seed=1, r=8, alpha=16, b_std=0.3, targets=ARCHS["phi3"].lora_targets)
    rec = export(base, tmp_path / "s", [ad], mode="separate", quant="f32", adapter_type="f32", names=["ad"],
                 verify=True)
    verifications(rec)
    base_gguf, ad_gguf = (Path(f) for f in rec["files"])
    short, long = eval_ids(tokenizer_dir, n_chunks=1), eval_ids(tokenizer_dir, n_chunks=1, chunk=300)
    assert len(short[0]) < 256 < len(long[0])
    for ids, n_ctx in ((short, 256), (long, 512)):
        rt = llama_runtime(base_gguf, {"ad": ad_gguf}, n_ctx=n_ctx)
        try:
            for name, want in ((None, peft_logits(base, None, ids)), ("ad", peft_logits(base, ad, ids))):
                _, top1, max_abs = agreement(want, runtime_logits(rt, ids, name))
                assert top1 >= 0.99 and max_abs <= SEPARATE_BOUND, (n_ctx, name, top1, max_abs)
        finally:
            rt.close()
    # the factor sets differ in effect: the short sequence in a long context (llama.cpp: long factors)
    rt = llama_runtime(base_gguf, n_ctx=512)
    try:
        assert agreement(peft_logits(base, None, short), runtime_logits(rt, short))[2] > 10 * F32_BOUND
    finally:
        rt.close()
    peer = shutil.copytree(base, tmp_path / "fused-qkv-longrope-bpe")  # GPT2Tokenizer: see the converter test
    tc = json.loads((peer / "tokenizer_config.json").read_text())
    (peer / "tokenizer_config.json").write_text(json.dumps({**tc, "tokenizer_class": "GPT2Tokenizer"}))
    run_peer("convert_hf_to_gguf.py", peer, "--outtype", "f32", "--outfile", tmp_path / "peer.gguf")
    assert_same_tensors(base_gguf, tmp_path / "peer.gguf")
    ours, theirs = model_meta(base_gguf), model_meta(tmp_path / "peer.gguf")
    keys = [k for k in theirs if k.startswith("phi3.")]
    assert "phi3.rope.scaling.attn_factor" in keys and {k: ours.get(k) for k in keys} == {k: theirs[k] for k in keys}


# --- ONNX through the onnxruntime-genai builder ----------------------------------------------------

# the third is longer than gemma3_text's 32-token sliding window: the window mask is exercised
IDS = [[1, 520, 33, 1000, 77, 9, 4021], [1, 17, 300, 4000, 12], [1, *range(200, 3000, 61)]]


@pytest.mark.parametrize("arch", [a for a in NEW if not ARCHS[a].onnx_refusal])
def test_onnx_merged_and_separate_match_peft(arch, tiny_new, new_adapters, tmp_path):
    from edgepeft.export.onnx import export as onnx_export
    from edgepeft.export.request import ExportRequest

    base, ad = tiny_new[arch], new_adapters[arch]
    ref, ref_base = peft_logits(base, ad, IDS), peft_logits(base, None, IDS)
    rec = onnx_export(ExportRequest(format="onnx", base=str(base), adapters=[ad], out=tmp_path / "m", mode="merged",
                                    quant="fp32", merge_into="original"))
    verifications(rec)
    lm = Ort(tmp_path / "m")
    for ids, r in zip(IDS, ref):
        np.testing.assert_allclose(lm.logits(ids), r, atol=2e-4, rtol=1e-4)
    rec = onnx_export(ExportRequest(format="onnx", base=str(base), adapters=[ad], names=["A"], out=tmp_path / "s",
                                    mode="separate", quant="fp32"))
    verifications(rec)
    lm = Ort(tmp_path / "s", {"A": tmp_path / "s" / "adapters" / "A.onnx_adapter"})
    for name, refs in (("A", ref), (None, ref_base), ("A", ref)):  # swap in, out and in again, one session
        for ids, r in zip(IDS, refs):
            np.testing.assert_allclose(lm.logits(ids, name), r, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", [a for a in NEW if ARCHS[a].onnx_refusal])
def test_onnx_refuses_what_the_builder_cannot_build(arch, tiny_new, tmp_path):
    proc = run_cli("export", "--format", "onnx", "--base", tiny_new[arch], "--out", "out", "--quant", "fp32",
                   cwd=tmp_path)
    assert_clean_error(proc, f"ONNX export of {arch} is not supported", "onnxruntime-genai", "--format gguf")
    assert not (tmp_path / "out").exists()


def test_quickstart_skips_only_the_onnx_the_builder_refuses(tiny_new):
    """The quickstart on SmolLM3 leaves out both ONNX artifacts with the builder's reason (and bench and
    bundle go on with the GGUF ones); on Gemma 3, which the builder now builds, nothing is skipped."""
    from edgepeft.quickstart import skipped_artifacts

    skipped = skipped_artifacts(str(tiny_new["smollm3"]))
    assert sorted(skipped) == ["onnx-merged", "onnx-separate"], skipped
    assert all("NoPE" in why and "onnxruntime-genai 0.18" in why for why in skipped.values()), skipped
    assert skipped_artifacts(str(tiny_new["gemma3_text"])) == {}


# --- train, and the one-line refusal --------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gemma3_text", "qwen3", "phi3", "smollm3"])
def test_qlora_trains_each_arch(arch, tiny_new, tmp_path):
    from test_train import _jsonl

    data = _jsonl(tmp_path / "d.jsonl", n=16)
    proc = run_cli("train", "--base", tiny_new[arch], "--data", data, "--out", "run", "--max-steps", "4",
                   "--batch-size", "2", "--max-seq-len", "48", "--lr", "5e-3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["quantization"]["quant_type"] == "nf4" and m["train"]["steps"] == 4
    losses = [loss for _, loss in m["loss_curve"]]
    assert losses and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    want = {t for t in ARCHS[arch].lora_targets}
    assert set(m["lora"]["target_modules"]) == want, m["lora"]


def test_phi3_q_proj_target_is_refused_naming_the_fused_modules(tiny_new, tmp_path):
    """Phi-3 has no q_proj: its adapters are on qkv_proj / gate_up_proj, and the refusal says so."""
    from test_train import _jsonl

    data = _jsonl(tmp_path / "d.jsonl", n=4)
    proc = run_cli("train", "--base", tiny_new["phi3"], "--data", data, "--out", "run", "--max-steps", "1",
                   "--target", "q_proj,v_proj", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("edgepeft: error: ")]
    assert len(errors) == 1 and "--target q_proj,v_proj" in errors[0], proc.stderr
    assert "qkv_proj" in errors[0] and "gate_up_proj" in errors[0], errors


def test_unsupported_arch_lists_every_supported_one(tiny_new, tmp_path):
    import shutil

    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_new["qwen3"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    proc = run_cli("export", "--format", "gguf", "--base", "gpt2", "--out", "out", cwd=tmp_path)
    assert_clean_error(proc, "unsupported architecture 'gpt2'", *sorted(ARCHS))
