"""ONNX export: merged and separate artifacts checked against PEFT, adapter swaps, bad input.

References are PEFT models (not our own merge), LoRA B is non-zero, and the ONNX side is
read back from disk and run by onnxruntime / onnxruntime-genai.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error
from lora_factory import ALL_LINEAR, make_lora

TARGETS = list(ALL_LINEAR)
IDS = [[1, 520, 33, 1000, 77, 9, 4021], [1, 17, 300, 4000, 12]]


def make_adapter(base_dir: Path, out: Path, r: int, seed: int, targets=TARGETS, rslora=False) -> Path:
    return make_lora(base_dir, out, seed=seed, r=r, targets=targets, use_rslora=rslora)


def peft_logits(base_dir: Path, adapter: Path | None, ids=IDS) -> list:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return [model(torch.tensor([i])).logits[0].numpy() for i in ids]


class Ort:
    """An ONNX folder under plain onnxruntime (runtimes/ort.py, what bench and verify run): full-sequence logits."""

    def __init__(self, folder: Path, adapters: dict | None = None):
        from edgepeft.runtimes.base import Artifact, get_runtime

        self.rt = get_runtime("onnxruntime")
        self.rt.load(Artifact(folder, "onnx-genai", folder, adapters or {}, None), None, n_ctx=64)

    def logits(self, ids, adapter: str | None = None):
        from edgepeft.export.verify import sequence_logits

        self.rt.set_adapter(adapter)
        return sequence_logits(self.rt, ids)


def checks(rec: dict) -> list[dict]:
    """Every verification record of an export (one, or several for separate adapters), each passed."""
    recs = rec.get("verifications") or [rec["verification"]]
    assert recs and all(r["passed"] is True and r["checks"] for r in recs), recs
    return recs


def run_export(**kw) -> dict:
    from edgepeft.export.onnx import export
    from edgepeft.export.request import ExportRequest

    return export(ExportRequest(format="onnx", **kw))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama, tiny_qwen2):
    root = tmp_path_factory.mktemp("onnx-adapters")
    out = {}
    for name, base in (("llama", tiny_llama), ("qwen2", tiny_qwen2)):
        out[name] = {
            "a": make_adapter(base, root / f"{name}-a", r=4, seed=1),
            "b": make_adapter(base, root / f"{name}-b", r=8, seed=2, targets=["q_proj", "v_proj", "down_proj"],
                              rslora=True),
        }
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_merged_fp32_matches_peft(model_type, adapters, tiny_llama, tiny_qwen2, tmp_path):
    base = {"llama": tiny_llama, "qwen2": tiny_qwen2}[model_type]
    ad = adapters[model_type]["a"]
    rec = run_export(base=str(base), adapters=[ad], out=tmp_path / "m", mode="merged", quant="fp32",
                     merge_into="original")
    out = tmp_path / "m"
    (v,) = checks(rec)
    assert {c["metric"]: c["value"] for c in v["checks"]}["max_abs_logit_diff"] < 1e-3, v
    for f in ("model.onnx", "genai_config.json", "tokenizer.json", "edgepeft-onnx.json"):
        assert (out / f).is_file(), f
    manifest = json.loads((out / "edgepeft-onnx.json").read_text())
    from edgepeft.models import resolve_base

    assert manifest["base"]["fingerprint"] == resolve_base(str(base)).fingerprint
    from edgepeft.fingerprint import sha256_file

    assert manifest["adapters"][0]["adapter_sha256"] == sha256_file(ad / "adapter_model.safetensors")
    lm = Ort(out)
    for got, ref in zip([lm.logits(i) for i in IDS], peft_logits(base, ad)):
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
    base_ref = peft_logits(base, None)
    assert max(np.abs(r - b).max() for r, b in zip(peft_logits(base, ad), base_ref)) > 1e-2  # adapter matters


def test_separate_swaps_match_peft_and_merged(adapters, tiny_llama, tmp_path):
    """A (r=4, all projections) -> B (r=8 rsLoRA, 3 projections) -> none -> A, one session, no reload."""
    import onnxruntime_genai as og

    from edgepeft.export.onnx_adapters import check_onnx_adapter_fits

    a, b = adapters["llama"]["a"], adapters["llama"]["b"]
    rec = run_export(base=str(tiny_llama), adapters=[a, b], names=["A", "B"], out=tmp_path / "s", mode="separate",
                     quant="fp32")
    out = tmp_path / "s"
    assert [v["adapter"] for v in checks(rec)] == [None, "A", "B"]
    assert rec["slots"] == 14  # union of both adapters' targets over 2 layers
    files = {n: out / "adapters" / f"{n}.onnx_adapter" for n in "AB"}
    assert check_onnx_adapter_fits(out, files["B"])["ranks"]["model.layers.0.self_attn.q_proj"] == 8
    refs = {"A": peft_logits(tiny_llama, a), "B": peft_logits(tiny_llama, b), None: peft_logits(tiny_llama, None)}

    lm = Ort(out, files)  # plain ORT: RunOptions.add_active_adapter per run
    for name in ("A", "B", None, "A"):
        for ids, ref in zip(IDS, refs[name]):
            np.testing.assert_allclose(lm.logits(ids, name), ref, atol=2e-4, rtol=1e-4)

    model = og.Model(str(out))  # onnxruntime-genai: og.Adapters + set_active_adapter per generator
    ogad = og.Adapters(model)
    for n, p in files.items():
        ogad.load(str(p), n)
    for name in ("B", "A", None):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=64)
        gen = og.Generator(model, params)
        if name:
            gen.set_active_adapter(ogad, name)
        gen.append_tokens(IDS[0])
        np.testing.assert_allclose(gen.get_logits()[0, -1], refs[name][0][-1], atol=2e-4, rtol=1e-4)

    run_export(base=str(tiny_llama), adapters=[a], out=tmp_path / "m", mode="merged", quant="fp32",
               merge_into="original")
    merged = Ort(tmp_path / "m")
    for ids in IDS:
        np.testing.assert_allclose(lm.logits(ids, "A"), merged.logits(ids), atol=1e-4, rtol=1e-4)


def test_int4_separate_keeps_lora_float_and_passes_options(adapters, tiny_qwen2, tmp_path):
    import onnx

    rec = run_export(base=str(tiny_qwen2), adapters=[adapters["qwen2"]["a"]], out=tmp_path / "q", mode="separate",
                     quant="int4", block_size=16, accuracy_level=1)
    checks(rec)
    m = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False)
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert nbits, "base matmuls must be int4"
    assert rec["quant_algo"] == "k_quant_last"
    for n in nbits:
        attrs = {a.name: a.i for a in n.attribute}
        # the default k_quant_last keeps the output projection at int8 (what keeps a fine-tune's answers)
        assert attrs["bits"] == (8 if "lm_head" in n.name else 4), n.name
        assert attrs["block_size"] == 16 and attrs["accuracy_level"] == 1
        assert not any("lora" in i for i in n.input)
    assert any("lm_head" in n.name for n in nbits)
    lora_mm = [n for n in m.graph.node if n.op_type == "MatMul" and any(".lora_" in i for i in n.input)]
    assert len(lora_mm) == 28
    inputs = {i.name: i for i in m.graph.input}
    a_in = inputs["model.layers.0.self_attn.q_proj.lora_A.weight"].type.tensor_type.shape.dim
    assert a_in[1].dim_param == "lora_r.model.layers.0.self_attn.q_proj"  # one symbolic rank per module
    init = {i.name: list(i.dims) for i in m.graph.initializer}
    assert init["model.layers.0.self_attn.q_proj.lora_A.weight"] == [64, 0]  # rank-0 default


def test_adapter_that_does_not_fit_is_refused(adapters, tiny_llama, tmp_path, tokenizer_dir):
    from edgepeft.errors import MismatchError
    from edgepeft.export.onnx_adapters import (
        check_onnx_adapter_fits,
        read_onnx_adapter,
        write_onnx_adapter,
    )

    run_export(base=str(tiny_llama), adapters=[adapters["llama"]["b"]], out=tmp_path / "s", mode="separate",
               quant="fp32", verify=False)
    out = tmp_path / "s"
    good = read_onnx_adapter(out / "adapters" / "llama-b.onnx_adapter")
    renamed = {k.replace("self_attn", "attn"): v for k, v in good.items()}
    write_onnx_adapter(renamed, tmp_path / "renamed.onnx_adapter")
    with pytest.raises(MismatchError, match="model.layers.0.attn.q_proj.lora_A.weight"):
        check_onnx_adapter_fits(out, tmp_path / "renamed.onnx_adapter")
    wrong = dict(good)
    key = "model.layers.0.self_attn.q_proj.lora_A.weight"
    wrong[key] = np.zeros((32, 8), np.float32)
    write_onnx_adapter(wrong, tmp_path / "wrong.onnx_adapter")
    with pytest.raises(MismatchError, match="shape"):
        check_onnx_adapter_fits(out, tmp_path / "wrong.onnx_adapter")
    # an adapter with a module the base has no slot for (the base was exported with adapter b's 3 targets)
    with pytest.raises(MismatchError, match="no LoRA slot"):
        from edgepeft.export.adapter import load_adapter
        from edgepeft.export.onnx_adapters import model_slots, plan_parameters
        from edgepeft.models import resolve_base

        plan = load_adapter(adapters["llama"]["a"], resolve_base(str(tiny_llama)))
        plan_parameters(plan, model_slots(out))


def test_bad_input_one_line_no_output(cli, adapters, tiny_llama, tmp_path):
    common = ["export", "--format", "onnx", "--base", tiny_llama, "--adapter", adapters["llama"]["a"]]
    cases = [
        (["--quant", "fp16", "--target", "cpu"], ["--quant", "cpu"]),
        (["--quant", "fp32", "--target", "qnn-htp"], ["qnn-htp", "int8"]),
        (["--quant", "int8", "--target", "qnn-htp", "--device", "no-such-phone"], ["no-such-phone"]),
        (["--quant", "int8", "--mode", "separate", "--target", "qnn-htp"], ["separate", "qnn"]),
        (["--quant", "int8", "--target", "qnn-htp", "--dynamic-shapes"], ["static shapes"]),
    ]
    for i, (extra, needles) in enumerate(cases):
        out = tmp_path / f"o{i}"
        proc = cli(*common, *extra, "--out", out)
        assert_clean_error(proc, *needles)
        assert not out.exists() or not any(out.iterdir())


def test_pruned_adapter_with_per_module_ranks_runs_separate(adapters, tiny_llama, tmp_path):
    """Pruning leaves different ranks per module; each module's rank is its own symbolic dim in ORT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgepeft.export.onnx_adapters import check_onnx_adapter_fits

    a = tmp_path / "ranked"
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                     rank_pattern={"q_proj": 2, "down_proj": 6})
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), cfg).save_pretrained(a)
    kw = {"base": str(tiny_llama), "adapters": [a], "names": ["A"], "quant": "fp32", "prune": "energy=0.97"}
    run_export(out=tmp_path / "s", mode="separate", **kw)
    run_export(out=tmp_path / "m", mode="merged", merge_into="original", **kw)
    file = tmp_path / "s" / "adapters" / "A.onnx_adapter"
    ranks = set(check_onnx_adapter_fits(tmp_path / "s", file)["ranks"].values())
    assert len(ranks) > 1, ranks
    sep, merged = Ort(tmp_path / "s", {"A": file}), Ort(tmp_path / "m")
    for ids in IDS:  # tolerance: fp32 graphs, low-rank vs merged summation order only
        np.testing.assert_allclose(sep.logits(ids, "A"), merged.logits(ids), atol=1e-4, rtol=1e-4)


def test_merge_into_auto_with_text_only_calib(cli, adapters, tiny_llama, tmp_path):
    """--calib lines with only ``text`` (no prompt) are scored from their second token on (was an IndexError)."""
    calib = tmp_path / "text.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"{i} red lamps were shipped to Oslo today."}) for i in range(3)))
    proc = cli("export", "--format", "onnx", "--base", tiny_llama, "--adapter", adapters["llama"]["a"],
               "--quant", "fp32", "--merge-into", "auto", "--calib", "text.jsonl", "--no-verify", "--json",
               "--out", "auto", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    auto = json.loads(proc.stdout)["merge"]["auto"]
    losses = auto["losses"]
    assert set(losses) == {"dequantized", "original"} and all(0 < v < 50 for v in losses.values()), auto
    assert auto["chosen"] == min(losses, key=losses.get) and auto["calib_pairs"] == 3
