"""smollm2-135m through the ONNX exporter: int4 merged stays close to PyTorch fp32.

In the default run: perplexity of the int4 ORT model vs the fp32 PyTorch model (same random
adapter, same text), a relative check that needs no trained run.

Benchmark-only (``-m benchmark``, deselected by default): demo-task accuracy of int4 ORT vs
PyTorch, within 2 points. It needs a TRAINED demo adapter (``EDGEPEFT_DEMO_ADAPTER``, the run dir
of ``edgepeft train --task demo``) and fails without one. Why not train one in a fixture: the
check is only meaningful where the adapter scores well above 0 (an untrained or 3-step adapter
scores 0 % on both sides, and 0 == 0 proves nothing), and that takes the quickstart's 48 QLoRA
steps, minutes on 2 cores, which the default suite cannot afford.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from test_onnx import make_adapter, run_export

pytestmark = pytest.mark.integration


def _nll(logits, ids: list[int]) -> float:
    from edgepeft.calib import token_nll

    return float(token_nll(logits[:-1], ids[1:]).mean())


def test_smollm2_int4_merged_perplexity(smollm2, tmp_path):
    from importlib.resources import files

    from peft import PeftModel

    from edgepeft.calib import runtime_logits
    from edgepeft.runtimes.base import Artifact, get_runtime

    adapter = make_adapter(smollm2.path, tmp_path / "ad", r=8, seed=0, targets=["q_proj", "v_proj"])
    out = tmp_path / "int4"
    rec = run_export(base="smollm2-135m", adapters=[adapter], names=["demo"], out=out, mode="merged", quant="int4",
                     merge_into="original")
    assert rec["verification"]["passed"] is True, rec["verification"]
    assert rec["bytes"] < 0.5 * sum(f.stat().st_size for f in smollm2.weight_files)  # fp32 base -> int4

    tok = smollm2.load_tokenizer()
    text = (files("edgepeft") / "data" / "wikitext2-valid-slice.txt").read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"][:384]
    model = PeftModel.from_pretrained(smollm2.load_model(torch.float32), adapter).eval()
    with torch.no_grad():
        ppl_torch = math.exp(_nll(model(torch.tensor([ids])).logits[0].numpy(), ids))
    rt = get_runtime("onnxruntime")
    rt.load(Artifact(out, "onnx-genai", out, {}, "int4"), None, n_ctx=len(ids) + 8)
    ppl_ort = math.exp(_nll(runtime_logits(rt)(ids), ids))
    rt.close()
    # measured: plain base fp32 15.0 -> int4 RTN block 32 19.8 (x1.32); with this random adapter 22.9 -> 36.7
    # (x1.6). A broken graph (wrong transpose, lost adapter) lands in the thousands.
    assert ppl_torch < ppl_ort < 2.0 * ppl_torch, (ppl_ort, ppl_torch)


@pytest.mark.benchmark
def test_smollm2_int4_demo_accuracy_matches_pytorch(smollm2, tmp_path):
    # Only an explicitly named adapter: a half-trained one lying around on a machine would make
    # the 2-point check meaningless (8 % vs 0 % measured with a 10-step adapter).
    env = os.environ.get("EDGEPEFT_DEMO_ADAPTER")
    adapter = Path(env) if env else None
    if adapter is not None and (adapter / "adapter" / "adapter_config.json").is_file():
        adapter = adapter / "adapter"  # the run dir of `edgepeft train`
    if adapter is None or not (adapter / "adapter_config.json").is_file():
        pytest.fail(f"EDGEPEFT_DEMO_ADAPTER={env!r} is not a trained demo adapter; train one with "
                    "`edgepeft train --task demo --out RUN` and pass RUN")
    import onnxruntime_genai as og
    from peft import PeftModel

    from edgepeft.evaluate import eval_prompts, hf_generate_batch, score
    from edgepeft.train.tasks import get_task

    out = tmp_path / "int4"
    run_export(base="smollm2-135m", adapters=[adapter], names=["demo"], out=out, mode="merged", quant="int4",
               merge_into="original")
    tok = smollm2.load_tokenizer()
    model = PeftModel.from_pretrained(smollm2.load_model(torch.float32), adapter).eval()
    task = get_task("demo")
    examples = task.examples("eval")[:50]
    prompts = eval_prompts(examples, tok)
    acc_torch = score(hf_generate_batch(model, tok, task.max_new_tokens)(prompts), examples).accuracy
    m = og.Model(str(out))
    preds = []
    for p in prompts:
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        params = og.GeneratorParams(m)
        params.set_search_options(max_length=len(p_ids) + task.max_new_tokens, do_sample=False)
        gen = og.Generator(m, params)
        gen.append_tokens(p_ids)
        while not gen.is_done():
            gen.generate_next_token()
        preds.append(tok.decode(list(gen.get_sequence(0))[len(p_ids):], skip_special_tokens=True))
    acc_ort = score(preds, examples).accuracy
    assert acc_torch >= 0.5, f"the demo adapter scores {acc_torch:.0%} in PyTorch: not trained enough to compare"
    assert abs(acc_ort - acc_torch) <= 0.02 + 1e-9, (acc_ort, acc_torch)
