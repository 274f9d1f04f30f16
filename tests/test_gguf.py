"""GGUF export parity: llama.cpp (llama-cpp-python) vs PyTorch PEFT, and vs llama.cpp's own converters.

Tolerances (fp32 tiny models, peaked logits; observed values in parentheses):
- merged F32 GGUF vs PEFT: top-1 >= 99 %, max |Δlogit| <= 0.02 (~0.005);
- merged F16 GGUF vs PEFT: top-1 >= 99 %, max |Δlogit| <= 0.25 (F16 weight rounding);
- separate F32 base + adapter vs merged F32 in llama.cpp: max |Δlogit| <= 0.03.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import assert_clean_error, make_tiny
from lora_factory import ALL_LINEAR, make_lora
from peers import llama_cpp_src, run_peer  # noqa: F401  (session fixture)

TARGETS = ALL_LINEAR
F32_BOUND, F16_BOUND, SEPARATE_BOUND = 0.02, 0.25, 0.03


def make_adapter(base_dir: Path, out: Path, seed: int, r: int = 8, alpha: float = 16, rslora: bool = False,
                 alpha_pattern: dict | None = None) -> Path:
    return make_lora(base_dir, out, seed=seed, r=r, alpha=alpha, b_std=0.3, use_rslora=rslora,
                     alpha_pattern=alpha_pattern or {})


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, tiny_llama, tiny_qwen2):
    """Per arch: 'a' plain LoRA r=8, 'b' rsLoRA r=4 with a per-module alpha (exercises scale folding)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for arch, base in (("llama", tiny_llama), ("qwen2", tiny_qwen2)):
        out[arch] = {
            "a": make_adapter(base, root / f"{arch}-a", seed=1),
            "b": make_adapter(base, root / f"{arch}-b", seed=2, r=4, alpha=8, rslora=True,
                              alpha_pattern={"v_proj": 24}),
        }
    return out


def export(base, out, adapters=(), **kw):
    from edgepeft.export.gguf import export as run
    from edgepeft.export.request import ExportRequest

    kw.setdefault("merge_into", "original")
    kw.setdefault("verify", False)
    req = ExportRequest(format="gguf", base=str(base), adapters=[str(a) for a in adapters], out=out, **kw)
    return run(req)


def eval_ids(tokenizer_dir: Path, n_chunks: int = 2, chunk: int = 140) -> list[list[int]]:
    from transformers import AutoTokenizer

    text = (Path(__file__).parents[1] / "edgepeft/data/wikitext2-valid-slice.txt").read_text()[:6000]
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(text, add_special_tokens=False)["input_ids"]
    return [ids[i * chunk:(i + 1) * chunk] for i in range(n_chunks)]


def peft_logits(base: Path, adapter: Path | None, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([x])).logits[0].float().numpy() for x in ids]


def llama_runtime(path: Path, adapters: dict | None = None, n_ctx: int = 256):
    """The GGUF in runtimes/llamacpp.py (what bench and verify run), adapters loaded, none active."""
    from edgepeft.runtimes.base import Artifact, get_runtime

    rt = get_runtime("llama.cpp")
    rt.load(Artifact(path, "gguf", path, adapters or {}, None), None, n_ctx=n_ctx)
    return rt


def runtime_logits(rt, ids, adapter: str | None = None):
    from edgepeft.export.verify import sequence_logits

    rt.set_adapter(adapter)
    return [sequence_logits(rt, x) for x in ids]


def gguf_logits(path: Path, ids, lora: Path | None = None):
    rt = llama_runtime(path, {"lora": lora} if lora else None)
    try:
        return runtime_logits(rt, ids, "lora" if lora else None)
    finally:
        rt.close()


def model_meta(path: Path) -> dict:
    """A model GGUF's metadata as llama.cpp reads it (gguf-py's reader is slow on a 49k-token vocab)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


def vocab(path: Path) -> list[tuple[bytes, int]]:
    """Every token's text and attributes, through llama.cpp's vocab API."""
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        v = llama_cpp.llama_model_get_vocab(llm.model)
        return [(llama_cpp.llama_vocab_get_text(v, i), int(llama_cpp.llama_vocab_get_attr(v, i)))
                for i in range(llama_cpp.llama_vocab_n_tokens(v))]
    finally:
        llm.close()


def agreement(ref, got) -> tuple[int, float, float]:
    """(positions, top-1 agreement, max |Δlogit|) between two lists of logit arrays."""
    assert [r.shape for r in ref] == [g.shape for g in got]
    n = sum(r.shape[0] for r in ref)
    top1 = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, got)) / n
    return n, top1, max(float(np.abs(r - g).max()) for r, g in zip(ref, got))


def verifications(rec: dict) -> dict:
    """adapter name (None: the model alone) -> its verification record; each one ran and passed."""
    recs = rec.get("verifications") or [rec["verification"]]
    assert all(r["passed"] is True and r["checks"] for r in recs), recs
    return {r["adapter"]: r for r in recs}


def value(v: dict, metric: str) -> float:
    return next(c["value"] for c in v["checks"] if c["metric"] == metric)


# --- 1. merged GGUF in llama.cpp == PEFT ---------------------------------------------------------

@pytest.mark.parametrize("arch,quant,bound", [("llama", "f32", F32_BOUND), ("qwen2", "f32", F32_BOUND),
                                              ("llama", "f16", F16_BOUND)])
def test_merged_gguf_matches_peft(arch, quant, bound, tiny_llama, tiny_qwen2, adapters, tokenizer_dir, tmp_path):
    base = {"llama": tiny_llama, "qwen2": tiny_qwen2}[arch]
    adapter = adapters[arch]["a"]
    rec = export(base, tmp_path, [adapter], quant=quant, verify=True)
    path = Path(rec["files"][0])
    assert path.name == f"{arch}-a-merged-{quant}.gguf"
    ids = eval_ids(tokenizer_dir)
    n, top1, max_abs = agreement(peft_logits(base, adapter, ids), gguf_logits(path, ids))
    assert n >= 256
    assert top1 >= 0.99, (top1, max_abs)
    assert max_abs <= bound, max_abs
    # the adapter really changes the model (non-zero B): the merged file is not the base
    _, _, diff_base = agreement(peft_logits(base, None, ids), gguf_logits(path, ids))
    assert diff_base > 10 * bound
    # the export verified itself and recorded the numbers
    assert verifications(rec)[None]["positions"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "gguf-export.json"])


# --- 2. separate: base + adapter == merged; hot swap ---------------------------------------------

def test_separate_equals_merged_and_hot_swaps(tiny_llama, adapters, tokenizer_dir, tmp_path):
    a, b = adapters["llama"]["a"], adapters["llama"]["b"]
    rec = export(tiny_llama, tmp_path / "sep", [a, b], mode="separate", quant="f32", adapter_type="f32",
                 names=["alpha", "beta"])
    base_gguf = tmp_path / "sep" / "base-f32.gguf"
    files = {Path(f).name for f in rec["files"]}
    assert files == {"base-f32.gguf", "alpha.lora.gguf", "beta.lora.gguf"}
    ids = eval_ids(tokenizer_dir, n_chunks=1)
    merged = {}
    for name, ad in (("alpha", a), ("beta", b)):
        r = export(tiny_llama, tmp_path / f"m-{name}", [ad], quant="f32")
        merged[name] = gguf_logits(Path(r["files"][0]), ids)
    plain = gguf_logits(base_gguf, ids)
    rt = llama_runtime(base_gguf, {n: tmp_path / f"sep/{n}.lora.gguf" for n in ("alpha", "beta")})
    try:  # one loaded base, adapters swapped with llama_set_adapters_lora
        got = {key: runtime_logits(rt, ids, ap)
               for key, ap in (("none", None), ("alpha", "alpha"), ("beta", "beta"), ("none2", None))}
    finally:
        rt.close()
    for name in ("alpha", "beta"):  # beta is rsLoRA with a per-module alpha: folded scales must be right
        _, top1, max_abs = agreement(merged[name], got[name])
        assert top1 >= 0.99 and max_abs <= SEPARATE_BOUND, (name, top1, max_abs)
    assert agreement(plain, got["none"])[2] <= 1e-4
    assert agreement(got["none"], got["none2"])[2] == 0.0  # back to no adapter: exactly the base again
    assert agreement(got["alpha"], got["beta"])[2] > 1.0
    assert agreement(got["none"], got["alpha"])[2] > 1.0
    # the rsLoRA adapter's scale was folded into B and said so
    beta = next(x for x in rec["adapter_files"] if x["name"] == "beta")
    assert beta["scale_folded_modules"] == 14


def test_lora_path_loads_adapter_and_metadata(tiny_qwen2, adapters, tmp_path):
    """llama-cpp-python's lora_path loads our adapter; edgepeft.* metadata is in every file."""
    import json
    import shutil

    from edgepeft.models import resolve_base
    from edgepeft.security import read_metadata

    run = tmp_path / "run"  # a training run dir: its manifest's summary travels into the adapter GGUF
    shutil.copytree(adapters["qwen2"]["a"], run / "adapter")
    (run / "manifest.json").write_text(json.dumps({
        "base": {"fingerprint": resolve_base(str(tiny_qwen2)).fingerprint}, "task": "demo",
        "data": {"sha256": "ab" * 32}, "train": {"steps": 3, "final_loss": 0.5}, "loss_curve": [[1, 2.0]]}))
    rec = export(tiny_qwen2, tmp_path, [run / "adapter"], names=["qwen2-a"], mode="separate", quant="q8_0",
                 adapter_type="q8_0", verify=True)
    base_gguf, ad = (Path(f) for f in rec["files"])
    assert value(verifications(rec)["qwen2-a"], "top1_agreement") >= 0.9
    meta_b, meta_a = model_meta(base_gguf), read_metadata(ad)
    assert meta_a["general.type"] == "adapter" and meta_a["adapter.type"] == "lora"
    assert meta_a["adapter.lora.alpha"] == 16.0
    assert meta_a["edgepeft.base_fingerprint"] == meta_b["edgepeft.base_fingerprint"] == rec["base_fingerprint"]
    assert meta_a["edgepeft.adapter.sha256"] == rec["adapters"][0]["adapter_sha256"]
    assert meta_a["edgepeft.adapter.name"] == "qwen2-a" and meta_b["edgepeft.version"]
    assert json.loads(meta_a["edgepeft.train"]) == {"task": "demo", "data_sha256": "ab" * 32, "steps": 3,
                                                    "final_loss": 0.5}
    assert meta_b["general.file_type"] == "7"  # MOSTLY_Q8_0, written by llama.cpp's quantizer
    # rank 8 rows are not a multiple of 32: every lora_b fell back to F16, and the record says so
    assert len(rec["adapter_files"][0]["f16_fallback"]) == 14
    ids = [[1, 2, 3, 400, 500, 600, 700, 800]]
    with_lora = gguf_logits(base_gguf, ids, lora=ad)
    assert agreement(gguf_logits(base_gguf, ids), with_lora)[2] > 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edgepeft-tmp")]


def test_check_adapter_fits_refuses_other_base(tiny_llama, tokenizer_dir, adapters, tmp_path):
    from edgepeft.errors import MismatchError
    from edgepeft.fit import check_gguf_pair as check_adapter_fits

    other = make_tiny("llama", tmp_path / "other-base", tokenizer_dir, seed=7)  # same shapes, other weights
    r1 = export(tiny_llama, tmp_path / "one", [adapters["llama"]["a"]], mode="separate", quant="f16")
    r2 = export(other, tmp_path / "two", [], mode="merged", quant="f16")
    base1, ad1 = (Path(f) for f in r1["files"])
    assert check_adapter_fits(base1, ad1)["fingerprint_checked"]
    other_gguf = tmp_path / "two" / "base-merged-f16.gguf"
    assert Path(r2["files"][0]) == other_gguf
    with pytest.raises(MismatchError, match="made for base"):
        check_adapter_fits(other_gguf, ad1)


# --- 3. peer check: llama.cpp's own converters ---------------------------------------------------

def _tensors(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(str(path)).tensors}


def assert_same_tensors(ours: Path, theirs: Path, ratio: dict | None = None) -> None:
    a, b = _tensors(ours), _tensors(theirs)
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        u = b[name]
        assert t.tensor_type == u.tensor_type, name
        assert list(t.shape) == list(u.shape), name
        x = np.asarray(t.data).astype(np.float32) if t.tensor_type.name in ("F32", "F16") else np.asarray(t.data)
        y = np.asarray(u.data).astype(np.float32) if u.tensor_type.name in ("F32", "F16") else np.asarray(u.data)
        if ratio and name in ratio:
            y = y * ratio[name]
        if x.dtype == np.uint8:
            assert np.array_equal(x, y), name
        else:  # within fp16 rounding
            assert np.allclose(x, y, rtol=2 ** -10, atol=1e-6), (name, float(np.abs(x - y).max()))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_matches_llama_cpp_converters(arch, tiny_llama, tiny_qwen2, adapters, llama_cpp_src, tmp_path):  # noqa: F811
    """Tensor for tensor against convert_hf_to_gguf.py and convert_lora_to_gguf.py from the pinned sdist.

    The qwen2 base is compared on its adapter only: llama.cpp's converter identifies the
    pre-tokenizer by hashing a tokenization and does not know our tiny model's mix (SmolLM2
    vocab under Qwen2's split regex), so it refuses that base; the real Qwen2 tokenizer is fine.
    """
    from edgepeft.security import read_metadata

    base = {"llama": tiny_llama, "qwen2": tiny_qwen2}[arch]
    rec = export(base, tmp_path / "ours", [adapters[arch]["a"]], mode="separate", quant="f16")
    ours_base, ours_ad = (Path(f) for f in rec["files"])
    run_peer("convert_lora_to_gguf.py", "--base", base, "--outtype", "f16", "--outfile", tmp_path / "peer-ad.gguf",
             adapters[arch]["a"])
    assert_same_tensors(ours_ad, tmp_path / "peer-ad.gguf")
    mo, mp = read_metadata(ours_ad), read_metadata(tmp_path / "peer-ad.gguf")
    for key in ("general.type", "adapter.type", "adapter.lora.alpha", "general.architecture"):
        assert mo[key] == mp[key], key
    if arch == "qwen2":
        return
    run_peer("convert_hf_to_gguf.py", base, "--outtype", "f16", "--outfile", tmp_path / "peer-base.gguf")
    assert_same_tensors(ours_base, tmp_path / "peer-base.gguf")
    bo, bp = model_meta(ours_base), model_meta(tmp_path / "peer-base.gguf")
    for key in bp:
        # identical hyper-parameters, special ids, template and vocab/merges sizes; only naming and
        # provenance keys differ, and the pre-tokenizer name (see docs/gguf.md)
        if key.startswith((f"{arch}.", "tokenizer.")) and key != "tokenizer.ggml.pre":
            assert bo.get(key) == bp[key], key
    assert vocab(ours_base) == vocab(tmp_path / "peer-base.gguf")  # every token's text and type


def test_llama3_rope_scaling_matches_peft_and_peer(tokenizer_dir, adapters, llama_cpp_src, tmp_path):  # noqa: F811
    """Llama 3.1/3.2 rope scaling: llama.cpp needs a rope_freqs tensor that no checkpoint stores.

    original_max_position_embeddings=32 puts the tiny model's 8 frequencies across all three
    bands (kept, divided by factor, smoothed), and the 140-token windows run past it, so a wrong
    or missing tensor moves the logits far beyond the F32 bound.
    """
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    base = make_tiny("llama", tmp_path / "l3", tokenizer_dir, seed=5, rope_parameters=rope)
    rec = export(base, tmp_path / "ours", [adapters["llama"]["a"]], quant="f32")
    ours = Path(rec["files"][0])
    freqs = np.asarray(_tensors(ours)["rope_freqs.weight"].data)
    assert freqs.min() == 1.0 and freqs.max() == 8.0 and ((freqs > 1) & (freqs < 8)).any()  # all three bands
    ids = eval_ids(tokenizer_dir)
    n, top1, max_abs = agreement(peft_logits(base, adapters["llama"]["a"], ids), gguf_logits(ours, ids))
    assert n >= 256 and top1 >= 0.99 and max_abs <= F32_BOUND, (top1, max_abs)
    run_peer("convert_hf_to_gguf.py", base, "--outtype", "f32", "--outfile", tmp_path / "peer.gguf")
    np.testing.assert_array_equal(freqs, np.asarray(_tensors(tmp_path / "peer.gguf")["rope_freqs.weight"].data))


def test_rslora_scale_folded_against_peer(tiny_llama, adapters, llama_cpp_src, tmp_path):  # noqa: F811
    """llama.cpp's converter ignores rsLoRA/alpha_pattern; ours folds s·r/alpha into B (alpha/r at runtime)."""
    import math

    rec = export(tiny_llama, tmp_path, [adapters["llama"]["b"]], mode="separate", quant="f16", adapter_type="f16")
    ours = Path(rec["files"][1])
    run_peer("convert_lora_to_gguf.py", "--base", tiny_llama, "--outtype", "f16", "--outfile", tmp_path / "p.gguf",
             adapters["llama"]["b"])
    r, alpha = 4, 8.0
    ratio = {}
    for name in _tensors(ours):
        if name.endswith(".lora_b"):
            module_alpha = 24.0 if "attn_v" in name else alpha
            ratio[name] = (module_alpha / math.sqrt(r)) * r / alpha
    assert_same_tensors(ours, tmp_path / "p.gguf", ratio=ratio)


# --- quantizer, bad input -------------------------------------------------------------------------

def test_q4_k_m_uses_llama_cpp_quantizer_and_leaves_no_temp(tiny_llama, tokenizer_dir, tmp_path):
    import llama_cpp
    from gguf import GGUFReader, LlamaFileType

    # without an importance matrix: the byte-identity below is against the quantizer's plain call
    rec = export(tiny_llama, tmp_path, [], quant="q4_k_m", verify=True, imatrix="none")
    path = Path(rec["files"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, "gguf-export.json"]
    v = verifications(rec)[None]
    assert [c["metric"] for c in v["checks"]] == ["tokenizer_agreement", "top1_agreement", "ppl_ratio"], v
    # the stored record names files relative to itself (relocatable); the returned one holds full paths
    assert json.loads((tmp_path / "gguf-export.json").read_text())["files"] == [path.name]
    # llama.cpp's quantizer, called here directly on the f32 export of the same model, writes the same
    # tensors byte for byte: same per-tensor type mix, same blocks
    f32 = Path(export(tiny_llama, tmp_path / "f32", [], quant="f32")["files"][0])
    ref = tmp_path / "f32" / "ref-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(ref).encode(), params) == 0

    def tensors(p):
        r = GGUFReader(str(p))
        return r, {t.name: (t.tensor_type.name, bytes(t.data)) for t in r.tensors}

    reader, ours = tensors(path)
    assert ours == tensors(ref)[1]
    assert int(reader.fields["general.file_type"].parts[-1][0]) == LlamaFileType.MOSTLY_Q4_K_M
    # every matrix is a block type (64-wide rows are no multiple of 256, so llama.cpp falls back from K-quants)
    assert {t for n, (t, _) in ours.items() if n.endswith(".weight") and "norm" not in n} <= \
        {"Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q4_0", "Q8_0", "Q5_1", "Q4_1", "IQ4_NL"}
    ids = eval_ids(tokenizer_dir)
    positions, top1, _ = agreement(peft_logits(tiny_llama, None, ids), gguf_logits(path, ids))
    # measured 0.729 over these 280 positions (the tiny random model's logits are flat, so 4-bit noise flips
    # many near-ties); a wrong permutation, scale or tokenizer lands near 0
    assert positions == sum(len(x) for x in ids) == 280 and top1 >= 0.68, top1


def _cli(*args, env=None):
    """``edgepeft export --format gguf ARGS`` as a user runs it: the real CLI in a subprocess."""
    from conftest import run_cli

    return run_cli("export", "--format", "gguf", *args, env=env)


def test_bad_input_one_line_exit_2_no_files(tiny_llama, tiny_qwen2, adapters, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(_cli("--base", tiny_llama, "--quant", "q3_x", "--out", out), "--quant", "q4_k_m")
    # unsupported architecture: a gpt2 config
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny_llama, gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert_clean_error(_cli("--base", gpt2, "--out", out), "unsupported architecture", "llama", "qwen2")
    # base without a tokenizer
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama / f, notok / f)
    assert_clean_error(_cli("--base", notok, "--out", out, "--quant", "f16"), "tokenizer")
    # adapter trained on another base: its run manifest records another fingerprint
    run = tmp_path / "run"
    shutil.copytree(adapters["llama"]["a"], run / "adapter")
    (run / "manifest.json").write_text(json.dumps({"base": {"fingerprint": "f" * 64}}))
    assert_clean_error(_cli("--base", tiny_llama, "--adapter", run / "adapter", "--out", out), "trained on base")
    # output dir that cannot be created (its parent is a file)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_error(_cli("--base", tiny_llama, "--out", blocker / "sub", "--quant", "f16"), "output directory")
    # full disk: every shutil.disk_usage in the child reports 1 KiB free (tests/disk_full/sitecustomize.py)
    full = str(Path(__file__).parent / "disk_full")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [full, os.environ.get("PYTHONPATH")]))}
    assert_clean_error(_cli("--base", tiny_llama, "--out", out, "--quant", "q8_0", env=env), "free")
    assert not out.exists() or not list(out.iterdir())


# --- tokenizer job: resolved in a child beside the tensors, cached by content ---------------------

def test_tokenizer_job_matches_transformers_and_caches(tiny_llama, tmp_path, monkeypatch):
    from edgepeft.export import gguf_tokenizer as gtok

    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gtok, "_RESOLVED", {})
    with gtok.tokenizer_job(tiny_llama) as job:
        assert job._proc is not None  # cold: a child process resolves it
        got = job.result()
    assert got == gtok.effective_tokenizer_json(tiny_llama)
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 1
    monkeypatch.setattr(gtok, "_RESOLVED", {})
    with gtok.tokenizer_job(tiny_llama) as job:
        assert job._proc is None and job.result() == got  # warm: read from the disk cache, no child
    # any change to the tokenizer files is a new key, never a stale hit
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 77}))
    assert gtok._content_key(other) != gtok._content_key(tiny_llama)


@pytest.mark.parametrize("quant", ["q8_0", "f16"])
def test_cold_and_warm_tokenizer_give_identical_files(quant, tiny_llama, tmp_path, monkeypatch):
    """Block quants get the tokenizer keys after quantizing; the bytes must not depend on when it arrived."""
    from edgepeft.export import gguf_tokenizer as gtok

    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path / "cache"))
    files = []
    for run in ("cold", "warm"):
        monkeypatch.setattr(gtok, "_RESOLVED", {})
        rec = export(tiny_llama, tmp_path / run, [], quant=quant)
        files.append(Path(rec["files"][0]).read_bytes())
        assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 1  # the warm run reads it
    assert files[0] == files[1]
    meta = model_meta(tmp_path / "cold" / f"base-merged-{quant}.gguf")
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["general.file_type"] == {"q8_0": "7", "f16": "1"}[quant]
    keys = list(meta)
    assert keys.index("tokenizer.ggml.model") < keys.index("edgepeft.version")


def test_tokenizer_transformers_cannot_load_is_one_line(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    tok = json.loads((broken / "tokenizer.json").read_text())
    tok["model"]["merges"].insert(0, ["zzz", "qqq"])  # a merge of tokens the vocab does not have
    (broken / "tokenizer.json").write_text(json.dumps(tok))
    out = tmp_path / "out"
    # --quiet: the tokenizer child fails after the "[export] embed the tokenizer" stage line has shown
    # (stages show after 2 s, tests/test_ui.py); the promise here is the one error line
    assert_clean_error(_cli("--base", broken, "--out", out, "--quant", "q8_0", "--no-verify", "--quiet"),
                       "could not load the tokenizer", "zzz")
    assert not out.exists() or not list(out.iterdir())


# --- 4. the real model (integration) ---------------------------------------------------------------

@pytest.mark.integration
def test_smollm2_separate_f16_verifies(smollm2, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    model = smollm2.load_model(torch.float32)
    torch.manual_seed(3)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"],
                                          init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    pm.save_pretrained(tmp_path / "smol-ad")
    del pm, model
    rec = export("smollm2-135m", tmp_path / "out", [tmp_path / "smol-ad"], mode="separate", quant="f16", verify=True)
    v = verifications(rec)
    for name in (None, "smol-ad"):
        assert value(v[name], "top1_agreement") >= 0.99 and value(v[name], "max_abs_logit_diff") <= 0.5, v
    assert rec["peak_rss_mb"] < 4 * 1024


@pytest.mark.slow
def test_merge_into_auto_records_choice(tiny_llama, adapters, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"prompt": f"Order {i}:", "completion": f" {i} red lamps to Oslo"})
                               for i in range(4)))
    rec = export(tiny_llama, tmp_path / "out", [adapters["llama"]["a"]], quant="f16", merge_into="auto", calib=calib,
                 verify=True)
    auto, losses = rec["merge"]["auto"], rec["merge"]["auto"]["losses"]
    # the factory's adapter is not known to be non-NF4-trained, so both candidates are scored
    assert set(losses) == {"dequantized", "original"} and losses["dequantized"] != losses["original"]
    assert auto["chosen"] == min(losses, key=losses.get) and rec["merge"]["target"] == auto["chosen"]
    # each candidate's loss is its task loss (the --calib file) plus its loss on generic text, both recorded
    assert auto["sets"]["task"]["kind"] == "file" and auto["sets"]["text"]["kind"] == "bundled", auto
    for target, loss in losses.items():
        assert set(auto["parts"][target]) == {"task", "text"}
        assert loss == pytest.approx(sum(auto["parts"][target].values()), rel=1e-12)
    # the file written is the chosen candidate: scored again in llama.cpp, it has the recorded (lower) losses
    from transformers import AutoTokenizer

    from edgepeft.calib import MergeChoice, runtime_logits

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    sets = MergeChoice.for_request(SimpleNamespace(calib=calib, adapters=[adapters["llama"]["a"]]), tok)
    rt = llama_runtime(tmp_path / "out" / "llama-a-merged-f16.gguf", n_ctx=264)
    try:
        written = sets.losses(runtime_logits(rt))
    finally:
        rt.close()
    assert written == pytest.approx(auto["parts"][auto["chosen"]], rel=1e-5)
    verifications(rec)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gguf-export.json", "llama-a-merged-f16.gguf"]


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_merge_into_auto_refuses_calib_without_completions_before_any_work(fmt, tiny_llama, adapters, tmp_path):
    """A --calib whose lines have nothing to score is one line before --out exists (it was found after both
    candidates were built and quantized)."""
    from conftest import run_cli

    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "Order 1:", "completion": ""}) + "\n")
    proc = run_cli("export", "--format", fmt, "--base", tiny_llama, "--adapter", adapters["llama"]["a"],
                   "--calib", "c.jsonl", "--quant", "f16" if fmt == "gguf" else "fp32", "--out", "out", cwd=tmp_path)
    assert_clean_error(proc, "no completion tokens", "--calib")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_q4_1_lands_on_a_q4_1_base_exactly(tiny_llama, tmp_path):
    """The default base is a dequantized Q4_1 GGUF: every block of 32 weights already sits on ``q * d + m``.
    ``--quant q4_1`` (a float minimum per block) quantizes onto that same grid, so the base comes back bit for
    bit (and its verification is the float one's); ``q4_0`` (no minimum) quantizes it afresh."""
    import torch
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader
    from gguf.quants import dequantize, quantize
    from safetensors.torch import load_file, save_file

    src = tmp_path / "grid"
    shutil.copytree(tiny_llama, src)
    sd = load_file(str(src / "model.safetensors"))
    on_grid = {k: torch.from_numpy(dequantize(quantize(v.float().numpy(), T.Q4_1), T.Q4_1)) if v.ndim == 2 else v
               for k, v in sd.items()}
    save_file(on_grid, str(src / "model.safetensors"), metadata={"format": "pt"})
    hf = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}  # attn_q/attn_k: rows permuted by the converter
    err, top1 = {}, {}
    for quant, matrix in (("q4_1", "none"), ("q4_1+m", "auto"), ("q4_0", "none")):  # +m: with the importance matrix
        rec = export(src, tmp_path / quant, quant=quant[:4], verify=True, imatrix=matrix)
        tensors = {t.name: t for t in GGUFReader(rec["files"][0]).tensors}
        for i in range(2):
            for g, h in hf.items():
                t = tensors[f"blk.{i}.{g}.weight"]
                want = on_grid[f"model.layers.{i}.{h}.weight"].numpy()
                err[quant, i, g] = (t.tensor_type.name, float(np.abs(dequantize(t.data, t.tensor_type).reshape(want.shape)
                                                                      - want).max()))
        v = verifications(rec)[None]
        assert v["passed"], v
        top1[quant] = value(v, "top1_agreement")
    assert all(e == ("Q4_1", 0.0) for (q, *_), e in err.items() if q.startswith("q4_1")), err
    assert all(kind == "Q4_0" and e > 1e-3 for (q, *_), (kind, e) in err.items() if q == "q4_0"), err
    # measured: 0.945 for both q4_1 exports (the embedding and output take other types), q4_0 0.496
    assert min(top1["q4_1"], top1["q4_1+m"]) >= 0.9 > top1["q4_0"] + 0.2, top1


def test_a_4_bit_source_names_the_type_that_keeps_it(smollm2):
    """The default base remembers its Q4_1 source; a 4-bit export onto a grid says what keeps its weights."""
    from edgepeft.export.quantize import regrid_note

    assert smollm2.origin_quant == "q4_1"
    assert "--quant q4_1 keeps its weights exactly" in regrid_note("q4_1", "gguf", "q4_k_m", "separate")
    assert "rounds back onto the base's own grid" in regrid_note("q4_1", "gguf", "q4_1", "merged")
    assert "--quant int8 keeps it" in regrid_note("q4_k_m", "onnx", "int4", "merged")
    assert "gptq_mixed on the task's data held" in regrid_note("q4_1", "onnx", "int4", "merged", "gptq_mixed")
    for source, fmt, quant, mode in (("q4_1", "gguf", "q4_1", "separate"), ("q4_1", "gguf", "q4_k_m", "merged"),
                                     ("q4_1", "gguf", "q8_0", "separate"), ("q4_1", "onnx", "int8", "separate"),
                                     ("f16", "onnx", "int4", "merged"), (None, "gguf", "q4_0", "separate"),
                                     ("q8_0", "onnx", "int4", "merged")):
        assert regrid_note(source, fmt, quant, mode) is None, (source, fmt, quant, mode)


def test_q4_1_of_a_q4_1_source_separate_skips_the_matrix(smollm2):
    """Separate q4_1 of the default base re-lands its grid exactly: the importance matrix would cost seconds for
    the same bytes, so ``auto`` turns it off there (and only there)."""
    from edgepeft.export.gguf import _matrix_plan
    from edgepeft.export.quantize import get_quant

    def plan(quant, mode):
        req = SimpleNamespace(imatrix="auto", mode=mode, calib=None, adapters=[])
        return _matrix_plan(req, smollm2, [], get_quant(quant)).record

    assert plan("q4_1", "separate") == {"used": False,
                                        "reason": "q4_1 of a Q4_1 source: its grid comes back exactly"}
    assert plan("q4_1", "merged")["used"] is True and plan("q4_k_m", "separate")["used"] is True
