"""The verifier's layer-by-layer PyTorch reference (export/reference.py) equals the full fp32 model.

The oracle below is the reference the verifier computed before it streamed: the whole model
loaded by transformers in fp32, the merged plans added in place (after the NF4 round trip for
the dequantized target), each swappable adapter added and removed around its forward, one
sequence at a time. On every architecture the verifier supports, with adapters on every linear
(non-zero B), both must give the same logits to 1e-5, the same top-1 and the same NLL.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_tiny
from lora_factory import make_lora
from test_archs import CONFIGS, _dir

from edgepeft.archs import ARCHS

ARCH_CASES = ["llama", "mistral", "qwen2", "gemma3_text", "qwen3", "phi3", "smollm3"]
LOGIT_TOL = 1e-5


def full_model_reference(base, merged, target, adapters, variants, seqs) -> dict:
    """{variant: [(len, vocab) float64 logits per sequence]} from the whole fp32 model (the former reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgepeft.export.merge import is_nf4_quantized, nf4_round_trip

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
    params = dict(model.named_parameters(remove_duplicate=False))

    def delta(m):
        return m.scale * (m.b.float() @ m.a.float())

    out = {}
    with torch.no_grad():
        if target == "dequantized":
            for name, w in params.items():
                if is_nf4_quantized(name, tuple(w.shape)):
                    w.copy_(nf4_round_trip(w.detach()))
        for plan in merged:
            for t, m in plan.modules.items():
                params[t + ".weight"].add_(delta(m))
        for v in variants:
            saved = {}
            for t, m in (adapters[v].modules.items() if v else ()):
                saved[t] = params[t + ".weight"].clone()
                params[t + ".weight"].add_(delta(m))
            out[v] = [model(input_ids=torch.tensor([ids])).logits[0].double().numpy() for ids in seqs]
            for t, w0 in saved.items():
                params[t + ".weight"].copy_(w0)
    return out


@pytest.fixture(scope="module")
def fixed_seqs(tokenizer_dir) -> list[list[int]]:
    """The verifier's own sequences: the fixed prompts, then the held-out chunks."""
    from transformers import AutoTokenizer

    from edgepeft.export import verify as V

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [V._ids(tok, p) for p in V.PROMPTS] + V.held_out_ids(tok)


def _assert_same(got, want, seqs, variants) -> None:
    from edgepeft.calib import token_nll

    for v in variants:
        for g, w, ids in zip(got[v], want[v], seqs):
            assert g.rows.shape == w.shape, (v, g.rows.shape, w.shape)
            assert float(np.abs(g.rows - w).max()) <= LOGIT_TOL, (v, float(np.abs(g.rows - w).max()))
            assert (g.argmax == w.argmax(-1)).all(), v
            assert abs(g.nll - float(token_nll(w[:-1], ids[1:]).sum())) <= 1e-6 * abs(g.nll), v


@pytest.mark.parametrize("arch", ARCH_CASES)
def test_streamed_reference_equals_full_model(arch, tokenizer_dir, fixed_seqs, tmp_path, monkeypatch):
    from edgepeft.export import reference
    from edgepeft.export.adapter import load_adapters
    from edgepeft.export.reference import reference_stats
    from edgepeft.models import resolve_base

    monkeypatch.setattr(reference, "HEAD_CHUNK_BYTES", 3000 * 4 * 64)  # the output matrix in several chunks

    folder = make_tiny(arch, tmp_path / _dir(arch), tokenizer_dir, seed=3, **CONFIGS.get(arch, {}))
    targets = ARCHS[arch].lora_targets
    a = make_lora(folder, tmp_path / "a", seed=1, r=8, b_std=0.3, targets=targets)
    b = make_lora(folder, tmp_path / "b", seed=2, r=4, alpha=8, b_std=0.3, targets=targets, use_rslora=True)
    base = resolve_base(str(folder))
    pa, pb = load_adapters([str(a), str(b)], base, ["a", "b"])
    seqs = fixed_seqs
    flags = {"keep_rows": [True] * len(seqs), "nll": [True] * len(seqs)}
    # a merged into the original base; b swapped in on top (a separate export's adapter)
    variants = [None, "b"]
    got = reference_stats(base, [pa], "original", {"b": pb}, variants, seqs, **flags)
    want = full_model_reference(base, [pa], "original", {"b": pb}, variants, seqs)
    _assert_same(got, want, seqs, variants)
    # not trivially equal: the adapters move the logits far beyond the tolerance
    assert float(np.abs(got["b"][0].rows - got[None][0].rows).max()) > 1000 * LOGIT_TOL
    # the dequantized target: NF4 round trip of every decoder linear, then the merge
    got = reference_stats(base, [pa], "dequantized", {}, [None], seqs, **flags)
    want = full_model_reference(base, [pa], "dequantized", {}, [None], seqs)
    _assert_same(got, want, seqs, [None])


def test_reduced_stats_match_full_rows(tiny_llama, fixed_seqs):
    """Without rows (lossy types) the same top-1 and NLL, from the chunked reduction alone."""
    from edgepeft.export.reference import reference_stats, stats
    from edgepeft.models import resolve_base

    base = resolve_base(str(tiny_llama))
    n = len(fixed_seqs)
    full = reference_stats(base, [], "original", {}, [None], fixed_seqs, keep_rows=[True] * n, nll=[True] * n)[None]
    lean = reference_stats(base, [], "original", {}, [None], fixed_seqs, keep_rows=[False] * n, nll=[True] * n)[None]
    for f, s, ids in zip(full, lean, fixed_seqs):
        assert s.rows is None and (s.argmax == f.argmax).all() and s.nll == pytest.approx(f.nll, rel=1e-12)
        one = stats(f.rows, ids, keep_rows=False)  # the runtime side's reduction, all in one chunk
        assert (one.argmax == f.argmax).all() and one.nll == pytest.approx(f.nll, rel=1e-12)


def test_fixed_ids_from_the_cached_tokenizer_equal_autotokenizer(tiny_llama, tmp_path):
    """Once a GGUF export has cached the effective tokenizer.json, the reference tokenizes through
    ``tokenizers`` on it: the same ids and BOS as AutoTokenizer."""
    from conftest import run_cli
    from transformers import AutoTokenizer

    from edgepeft.export import verify as V
    from edgepeft.export.gguf_tokenizer import cached_tokenizer_text
    from edgepeft.export.reference import fixed_ids
    from edgepeft.models import resolve_base

    assert run_cli("export", "--base", tiny_llama, "--quant", "f32", "--out", "o", "--no-verify",
                   cwd=tmp_path).returncode == 0
    base = resolve_base(str(tiny_llama))
    assert cached_tokenizer_text(base.path) is not None
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    pairs = [("<|im_start|>user\nName the colour of the sky.<|im_end|>\n<|im_start|>assistant\n", "Blue."), ("", "a b")]
    assert fixed_ids(base, {"t": pairs}) == ([V._ids(tok, p) for p in V.PROMPTS], V.held_out_ids(tok), tok.bos_token_id,
                                             {"t": V.task_ids(tok, pairs)})
    task = V.task_ids(tok, pairs)
    assert task[0][1] == len(V._ids(tok, pairs[0][0])) and task[1][1] == 1  # no prompt: from the 2nd token on
