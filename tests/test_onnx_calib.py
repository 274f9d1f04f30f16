"""ONNX int4 with GPTQ on calibration data (--quant-algo gptq_last): ORT's solver, our one-pass Hessians,
the adapter active while calibrating a separate build."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from conftest import assert_clean_error, run_cli
from lora_factory import make_lora

from edgepeft.keys import ONNX_SIDECAR


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama):
    return make_lora(tiny_llama, tmp_path_factory.mktemp("calib-lora") / "a", seed=3, r=4,
                     targets=["q_proj", "v_proj", "down_proj"], b_std=0.5)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from edgepeft.train.tasks import get_task

    f = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    f.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
                         for e in get_task("demo").examples("train")[:6]))
    return f


def _ops(folder):
    import onnx

    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return Counter(n.op_type for n in m.graph.node), [n.name for n in m.graph.node if n.op_type == "MatMul"]


@pytest.mark.parametrize("mode", ["merged", "separate"])
def test_gptq_export_is_calibrated_verified_and_keeps_lora_float(mode, tiny_llama, adapter, calib_file, tmp_path):
    p = run_cli("export", "--format", "onnx", "--base", tiny_llama, "--adapter", adapter, "--name", "a",
                "--mode", mode, "--quant", "int4", "--quant-algo", "gptq_last", "--merge-into", "original",
                "--calib", calib_file.name, "--out", "out", "--json", cwd=calib_file.parent)
    assert p.returncode == 0, p.stderr
    out = calib_file.parent / "out"
    rec = json.loads((out / ONNX_SIDECAR).read_text())
    assert rec["quant_algo"] == "gptq_last" and rec["calibration"]["kind"] == "file"
    assert rec["calibration"]["texts"] == 6 and "--calib calib.jsonl" in rec["calibration"]["source"]
    g = rec["gptq"]
    assert g["calibration_texts"] == 6 and g["calibration_tokens"] > 6 * 20 and g["last_matmul"] == "int8 rtn"
    assert g["adapters_active"] == (1 if mode == "separate" else 0)
    ops, float_matmuls = _ops(out)
    assert ops["MatMulNBits"] == g["quantized_matmuls"] + 1  # + lm_head at int8
    assert ops["GatherBlockQuantized"] == 1 and g["embedding"] == "int4 rtn"  # no fp32 embedding table left
    # only the LoRA MatMuls stay float (separate), so adapters still plug in
    assert all("lora_" in n for n in float_matmuls) and (bool(float_matmuls) == (mode == "separate"))
    checks = rec["verification"]["checks"] if mode == "merged" else rec["verifications"][1]["checks"]
    assert all(c["passed"] for c in checks) and {c["metric"] for c in checks} >= {"top1_agreement", "ppl_ratio"}


def test_gptq_refuses_other_quants(tiny_llama, tmp_path):
    assert_clean_error(run_cli("export", "--format", "onnx", "--base", tiny_llama, "--quant", "int8",
                               "--quant-algo", "gptq_last", "--out", tmp_path / "o"), "--quant-algo", "int4")
    assert not (tmp_path / "o").exists()


def test_separate_calibration_runs_with_the_adapter_active(tiny_llama, adapter, tmp_path):
    """Feeding the adapter's tensors changes what the base's MatMuls see downstream of an adapted layer
    (and with B zeroed it is the base again): the Hessians GPTQ solves with are the adapter's."""
    import onnx
    from transformers import AutoTokenizer

    from edgepeft.export import onnx_adapters as oa
    from edgepeft.export import onnx_calib as oc
    from edgepeft.export.adapter import load_adapters
    from edgepeft.export.onnx import _slot_adapter, build_genai
    from edgepeft.models import resolve_base

    base = resolve_base(str(tiny_llama))
    (plan,) = load_adapters([adapter], base, ["a"])
    targets = sorted(plan.modules)
    fp32 = tmp_path / "fp32"
    build_genai(base.path, fp32, quant="fp32", ep="cpu", block_size=32, accuracy_level=4, cache=tmp_path / "c",
                extra={"adapter_path": str(_slot_adapter(base, targets, tmp_path / "slots"))})
    slots = oa.make_lora_inputs(fp32 / "model.onnx")
    params = oa.plan_parameters(plan, slots)
    zero_b = {k: (np.zeros_like(v) if ".lora_B." in k else v) for k, v in params.items()}
    ids = oc.calibration_ids(AutoTokenizer.from_pretrained(tiny_llama), ["The quick brown fox jumps over the dog."])
    m = onnx.load(str(fp32 / "model.onnx"))
    for d in [i for i in m.graph.initializer if i.name in slots]:
        m.graph.initializer.remove(d)
    down1 = next(n.input[0] for n in m.graph.node if n.name == "/model/layers.1/mlp/down_proj/MatMul")
    hs = {name: oc._hessians(m, [down1], oc.Feeds(fp32 / "model.onnx", ids, [p]))[down1]
          for name, p in (("adapter", params), ("zero", zero_b))}
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    del probe.graph.output[:]
    probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(down1)])
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    x = sess.run([down1], oc.Feeds(fp32 / "model.onnx", ids, [params]).feed(0))[0].reshape(-1, hs["zero"].shape[0])
    np.testing.assert_allclose(hs["adapter"], 2 * x.T.astype(np.float64) @ x, rtol=1e-6)  # ORT's H = 2/n sum x x^T
    assert np.abs(hs["adapter"] - hs["zero"]).max() > 1e-3 * np.abs(hs["zero"]).max()
