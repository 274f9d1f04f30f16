"""--target qnn-htp: static graphs equal the HF model, the compiled graphs in the HTP simulator pass the
one verifier against PyTorch, CPU fallback is disabled, unmapped nodes are named, device profiles resolve."""

from __future__ import annotations

import json

import pytest
import torch
from test_onnx import make_adapter, run_export

from edgepeft.errors import EdgepeftError


def test_static_prefill_and_decode_match_hf(tiny_qwen2):
    """The fixed-shape re-statement (prefill, then one decode step into the fixed KV cache) == HF forward."""
    from transformers import AutoModelForCausalLM

    from edgepeft.export.qnn import CACHE_LEN, MASK_NEG, PREFILL_LEN, StaticLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    ids = [1, 520, 33, 1000, 77, 9, 4021]
    nxt = 311
    with torch.no_grad():
        ref = hf(torch.tensor([ids + [nxt]])).logits[0]
        padded = torch.zeros(1, PREFILL_LEN, dtype=torch.int32)
        padded[0, : len(ids)] = torch.tensor(ids)
        pre = StaticLM(hf, "prefill")(padded)
        torch.testing.assert_close(pre[0][0, : len(ids)], ref[: len(ids)], atol=1e-4, rtol=1e-4)
        past = []
        for t in pre[1:]:
            buf = torch.zeros(1, t.shape[1], CACHE_LEN, t.shape[3])
            buf[:, :, : len(ids)] = t[:, :, : len(ids)]
            past.append(buf)
        mask = torch.full((1, 1, 1, CACHE_LEN + 1), MASK_NEG)
        mask[..., : len(ids)] = 0
        mask[..., -1] = 0
        dec = StaticLM(hf, "decode")(torch.tensor([[nxt]], dtype=torch.int32),
                                     torch.tensor([[len(ids)]], dtype=torch.int32), mask, *past)
        torch.testing.assert_close(dec[0][0, 0], ref[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_qnn_htp_simulator_matches_cpu_ep(tiny_llama, tmp_path):
    ad = make_adapter(tiny_llama, tmp_path / "ad", r=4, seed=3)
    out = tmp_path / "qnn"
    rec = run_export(base=str(tiny_llama), adapters=[ad], out=out, mode="merged", quant="int8", target="qnn-htp",
                     device="snapdragon-8-gen-3", merge_into="original")
    q = rec["qnn"]
    assert (q["soc_model"], q["htp_arch"], q["cpu_fallback"]) == ("57", "75", "disabled")
    for kind in ("prefill", "decode"):
        g = q["graphs"][kind]
        assert (out / g["ctx"]).is_file() and list(out.glob(f"{kind}_ctx*.bin")), kind
        assert g["unmapped_nodes"] == [] and g["ctx_nodes"] == 1  # the whole graph is one EPContext node
    # the one verifier ran the compiled graphs in the HTP simulator against PyTorch fp32 and they passed
    v = rec["verification"]
    assert v["passed"] is True and v["runtime"] == "qnn-htp" and v["positions"] > 0, v
    # adapter_kept: the merged adapter moves enough top-1 tokens of the tiny model to be judged
    assert {c["metric"] for c in v["checks"]} == {"tokenizer_agreement", "top1_agreement", "ppl_ratio", "adapter_kept"}
    manifest = json.loads((out / "edgepeft-onnx.json").read_text())
    assert manifest["adapters"][0]["adapter_sha256"] and manifest["qnn"]["graphs"]["decode"]["ctx"] == "decode_ctx.onnx"


def test_unmapped_nodes_are_named_with_fallback_disabled(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgepeft.export.qnn import HtpTarget, compile_htp

    g = helper.make_graph([helper.make_node("Det", ["x"], ["y"], name="det0")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    path = tmp_path / "det.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(EdgepeftError, match="Det:det0"):
        compile_htp(path, tmp_path / "det_ctx.onnx", HtpTarget("60", "73"))
    assert not (tmp_path / "det_ctx.onnx").exists()


def test_htp_target_resolution():
    from edgepeft.export.qnn import resolve_target

    assert resolve_target("soc=57,htp=75").soc_model == "57"
    assert resolve_target("snapdragon-x-elite").htp_arch == "73"
    with pytest.raises(EdgepeftError, match="no QNN HTP"):
        resolve_target("x86-64-cpu")
    with pytest.raises(EdgepeftError, match="unknown device"):
        resolve_target("pixel-99")
    with pytest.raises(EdgepeftError, match="SoC"):
        resolve_target("soc=abc")


def test_dynamic_shapes_refused(tiny_llama, tmp_path):
    from edgepeft.export.request import ExportRequest

    req = ExportRequest(format="onnx", base=str(tiny_llama), adapters=[], out=tmp_path / "o", quant="int8",
                        target="qnn-htp", static_shapes=False)
    from edgepeft.export.onnx import export

    with pytest.raises(EdgepeftError, match="static shapes"):
        export(req)
    assert not (tmp_path / "o").exists()
