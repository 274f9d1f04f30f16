"""--quant-algo source_grid: MatMulNBits that keeps a 4-bit GGUF source's grid (export/onnx_grid.py).

Real ONNX Runtime: a MatMul quantized by ORT's own MatMulNBits quantizer, rewritten onto the grid of its
weights, must compute the weights exactly where they are on a 16-level grid and exactly what the
builder's quantization computed where they are not. The CLI refusal runs the real command.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from edgepeft.export.onnx_grid import land_on_grid, recover

N, K = 96, 128  # HF weight (out, in); four blocks of 32 per row


def _q4_1_grid(rng, n=N, k=K):
    """Weights on a Q4_1 grid per block of 32 (d * q + m, fp16 d and m as llama.cpp stores them)."""
    q = rng.integers(0, 16, (n, k // 32, 32)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp's Q4_1 puts the block's min and max on levels 0 and 15
    d = rng.uniform(0.001, 0.02, (n, k // 32, 1)).astype(np.float16).astype(np.float32)
    m = (-8 * d + rng.normal(0, 0.001, d.shape)).astype(np.float16).astype(np.float32)
    return (d * q + m).reshape(n, k)


def test_recover_is_exact_on_4bit_grids_and_refuses_off_grid():
    rng = np.random.default_rng(0)
    w = _q4_1_grid(rng)
    q, d, m, on = recover(w)
    assert on.all()
    back = (d[..., None] * q + m[..., None]).reshape(w.shape)
    assert np.abs(back - w).max() <= 1e-6 * np.abs(w).max()
    # Q4_0 (d * (q - 8)) with levels missing: the smallest gap finds the step
    q0 = rng.integers(0, 16, (N, K // 32, 32)).astype(np.float32)
    q0[..., 0] = 0
    w0 = (rng.uniform(0.001, 0.02, (N, K // 32, 1)) * (q0 - 8)).astype(np.float32).reshape(N, K)
    assert recover(w0)[3].mean() > 0.99
    # a quarter step of noise: no block is on a grid
    noisy = w + rng.normal(0, 0.0025, w.shape).astype(np.float32)
    assert not recover(noisy)[3].any()


def _quantized_model(tmp_path, w_hf):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/model/layers.0/attn/q_proj/MatMul")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, N])],
                              [numpy_helper.from_array(np.ascontiguousarray(w_hf.T), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    quant = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=False, accuracy_level=0)
    quant.process()
    path = tmp_path / "model.onnx"
    onnx.save(quant.model.model, str(path), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    return path


def _run(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_land_on_grid_computes_the_source_weights_in_onnxruntime(tmp_path):
    rng = np.random.default_rng(1)
    w = _q4_1_grid(rng)
    w[:8] += rng.normal(0, 0.01, (8, K)).astype(np.float32)  # 8 rows off the grid: the builder's blocks stay
    path = _quantized_model(tmp_path, w)
    x = rng.normal(0, 1, (1, 3, K)).astype(np.float32)
    before = _run(path, x)
    stats = land_on_grid(path, lambda name: w if name == "model.layers.0.self_attn.q_proj.weight" else None)
    assert stats["tensors"] == 1 and stats["corrections"] == 1
    assert stats["blocks"] == (N - 8) * (K // 32) and stats["blocks_total"] == N * (K // 32)
    after = _run(path, x)
    exact = x @ w.T
    scale = np.abs(exact).max()
    on_rows = slice(8, None)
    assert np.abs(after[..., on_rows] - exact[..., on_rows]).max() <= 1e-5 * scale
    # the builder's integer zero point is off by a share of a step on these rows; the grid is not
    assert np.abs(before[..., on_rows] - exact[..., on_rows]).max() > 100 * np.abs(
        after[..., on_rows] - exact[..., on_rows]).max()
    # off-grid rows: the builder's own quantization, rewritten to a float minimum, computes the same
    assert np.abs(after[..., :8] - before[..., :8]).max() <= 1e-5 * scale
    # the external data file was rewritten, not appended to
    assert (tmp_path / "model.onnx.data").stat().st_size < 2 * N * K


def test_source_grid_refuses_merged_mode_before_anything_is_built(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    r = subprocess.run([sys.executable, "-m", "edgepeft", "export", "--format", "onnx", "--mode", "merged",
                        "--base", "smollm2-135m", "--adapter", str(run), "--quant-algo", "source_grid",
                        "--out", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "source_grid" in lines[0] and "--mode separate" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_regrid_note_names_source_grid():
    from edgepeft.export.quantize import regrid_note

    assert "source_grid" in regrid_note("q4_1", "onnx", "int4", "separate")
    assert regrid_note("q4_1", "onnx", "int4", "separate", "source_grid") is None
