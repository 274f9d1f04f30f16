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


@pytest.fixture(scope="module")
def tied_adapter(tmp_path_factory, tiny_qwen2):
    return make_lora(tiny_qwen2, tmp_path_factory.mktemp("calib-lora-tied") / "a", seed=3, r=4,
                     targets=["q_proj", "v_proj", "down_proj"], b_std=0.5)


@pytest.mark.parametrize("mode", ["merged", "separate", "merged-tied"])
def test_gptq_export_is_calibrated_verified_and_keeps_lora_float(mode, tiny_llama, tiny_qwen2, adapter, tied_adapter,
                                                                 calib_file, tmp_path):
    """No fp32 table is left: an own embedding goes to 4 bits; a tied one (tiny qwen2, as smollm2) reads the
    lm_head's 8-bit blocks, as the builder's k-quant does."""
    tied = mode.endswith("-tied")
    base, adapter = (tiny_qwen2, tied_adapter) if tied else (tiny_llama, adapter)
    mode = mode.removesuffix("-tied")
    p = run_cli("export", "--format", "onnx", "--base", base, "--adapter", adapter, "--name", "a",
                "--mode", mode, "--quant", "int4", "--quant-algo", "gptq_last", "--merge-into", "original",
                "--calib", calib_file.name, "--out", "out", "--json", *(["--no-verify"] if tied else []),
                cwd=calib_file.parent)
    assert p.returncode == 0, p.stderr
    out = calib_file.parent / "out"
    rec = json.loads((out / ONNX_SIDECAR).read_text())
    assert rec["quant_algo"] == "gptq_last" and rec["calibration"]["kind"] == "file"
    assert rec["calibration"]["texts"] == 6 and "--calib calib.jsonl" in rec["calibration"]["source"]
    g = rec["gptq"]
    # the 6 task texts plus calib.with_generic_text's wikitext-2 chunks (disjoint from --merge-into auto's)
    from edgepeft.calib import GPTQ_TEXT_CHUNKS

    assert g["generic_text"]["kind"] == "bundled" and g["generic_text"]["texts"] == GPTQ_TEXT_CHUNKS
    assert g["calibration_texts"] == 6 + GPTQ_TEXT_CHUNKS and g["calibration_tokens"] > 6 * 20 + GPTQ_TEXT_CHUNKS * 100
    assert g["last_matmul"] == "int8 rtn"
    assert g["adapters_active"] == (1 if mode == "separate" else 0)
    ops, float_matmuls = _ops(out)
    assert ops["MatMulNBits"] == g["quantized_matmuls"] + 1  # + lm_head at int8
    assert ops["GatherBlockQuantized"] == 1  # the table is quantized, and no fp32 copy of it is left
    assert g["embedding"] == ("int8, tied to the lm_head's blocks" if tied else "int4 rtn")
    import onnx

    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    cfg = json.loads((base / "config.json").read_text())
    table = cfg["vocab_size"] * cfg["hidden_size"]  # no fp32 initializer that large is left
    assert all(i.data_type != onnx.TensorProto.FLOAT or np.prod(i.dims) < table for i in m.graph.initializer)
    # only the LoRA MatMuls stay float (separate), so adapters still plug in
    assert all("lora_" in n for n in float_matmuls) and (bool(float_matmuls) == (mode == "separate"))
    if tied:  # int4 GPTQ of a random 2-layer model misses the top-1 bound with an fp32 table too (0.43 < 0.45)
        _assert_table_rows_match(out, base)
        return
    checks = rec["verification"]["checks"] if mode == "merged" else rec["verifications"][1]["checks"]
    assert all(c["passed"] for c in checks) and {c["metric"] for c in checks} >= {"top1_agreement", "ppl_ratio"}


def _assert_table_rows_match(out, base):
    """The embedding subgraph of the export, run in onnxruntime, gives the base's rows to within int8 rounding."""
    import onnx
    import onnxruntime as ort
    from safetensors.numpy import load_file

    m = onnx.load(str(out / "model.onnx"))
    (node,) = [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
    made = {o: n for n in m.graph.node for o in n.output}
    nodes, todo = [], [node]
    while todo:  # the gather and what feeds it, inside the graph
        n = todo.pop()
        nodes.insert(0, n)
        todo += [made[i] for i in n.input if i in made]
    used = {i for n in nodes for i in n.input}
    ids_in = next(i for i in m.graph.input if i.name == "input_ids")
    graph = onnx.helper.make_graph(nodes, "embedding", [ids_in],
                                   [onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
                                   [i for i in m.graph.initializer if i.name in used])
    part = onnx.helper.make_model(graph, opset_imports=m.opset_import)
    ids = np.array([[0, 7, 123, 4000, 49151]], dtype=np.int64)
    sess = ort.InferenceSession(part.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids})[0][0]
    table = next(v for k, v in load_file(str(base / "model.safetensors")).items() if k.endswith("embed_tokens.weight"))
    want = table[ids[0]]
    step = np.abs(want).reshape(len(ids[0]), -1, 32).max(-1).repeat(32, -1) * 2 / 255  # one int8 step per block
    assert got.shape == want.shape and np.all(np.abs(got - want) <= step * 0.51 + 1e-7)


def test_gptq_mixed_keeps_q4_k_m_more_bits_matmuls_at_int8(tiny_llama, adapter, calib_file, tmp_path):
    """--quant-algo gptq_mixed: GPTQ int4, with the attention input projection and ffn_down of llama.cpp's
    use_more_bits layers (of two layers: the last) solved at int8 too; verified like any int4 export."""
    from onnx import helper

    p = run_cli("export", "--format", "onnx", "--base", tiny_llama, "--adapter", adapter, "--name", "a",
                "--quant", "int4", "--quant-algo", "gptq_mixed", "--merge-into", "original", "--calib", calib_file,
                "--out", tmp_path / "out", "--json")
    assert p.returncode == 0, p.stderr
    rec = json.loads((tmp_path / "out" / ONNX_SIDECAR).read_text())
    assert rec["quant_algo"] == "gptq_mixed" and rec["gptq"]["int8_matmuls"] == 2
    import onnx

    m = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    bits = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}["bits"]
            for n in m.graph.node if n.op_type == "MatMulNBits"}
    eight = sorted(n for n, b in bits.items() if b == 8)
    assert len(eight) == 3 and all("layers.1/" in n or "lm_head" in n for n in eight), eight
    assert {n.split("/")[-2] for n in eight if "layers.1/" in n} == {"qkv_proj", "down_proj"}, eight
    assert all(b == 4 for n, b in bits.items() if n not in eight)
    assert all(c["passed"] for c in rec["verification"]["checks"])


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
    # ORT's H = 2/n sum x x^T; x^T x is an fp32 GEMM (summed in fp64): fp32 rounding, relative to the largest entry
    want = 2 * x.T.astype(np.float64) @ x
    np.testing.assert_allclose(hs["adapter"], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert np.abs(hs["adapter"] - hs["zero"]).max() > 1e-3 * np.abs(hs["zero"]).max()


@pytest.mark.parametrize("case", ["merged-calib", "merged-no-data", "separate"])
def test_quant_algo_auto_picks_gptq_only_with_task_data(case, tiny_llama, adapter, calib_file, tmp_path):
    """--quant-algo auto (the default): GPTQ for merged int4 when the task's data is there (--calib or a training
    run), the builder's k-quant otherwise; separate on a base not from a 4-bit GGUF: k-quant (source_grid needs one)."""
    mode = case.split("-")[0]
    args = ["export", "--format", "onnx", "--base", tiny_llama, "--adapter", adapter, "--name", "a", "--mode", mode,
            "--quant", "int4", "--merge-into", "original", "--no-verify", "--out", tmp_path / "out", "--json"]
    if case == "merged-calib":
        args += ["--calib", calib_file]
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    rec = json.loads((tmp_path / "out" / ONNX_SIDECAR).read_text())
    want = "gptq_mixed" if case == "merged-calib" else "k_quant_last"
    assert rec["quant_algo"] == want
    assert ("--quant-algo auto: gptq_mixed (GPTQ on --calib" in p.stderr) == (case == "merged-calib"), p.stderr
    assert ("gptq" in rec) == (case == "merged-calib")
