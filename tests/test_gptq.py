"""export/gptq.py: GPTQ onto MatMulNBits' int4 grid, against a plain column-by-column reference, RTN, and
ONNX Runtime's port (which never moves an error: the reason this solver exists)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepeft.export import gptq as G


def _data(n=48, k=128, tokens=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)  # correlated inputs, as a layer's are
    x = torch.randn(tokens, k, generator=g) @ mix
    x[:, :8] *= 6  # a few loud columns
    return w, x, x.T.double() @ x.double() / tokens


def _rtn(w, group=32):
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.uint8)
    s_all, z_all = [], []
    for b0 in range(0, k, group):
        s, z = G.grid(w[:, b0:b0 + group])
        q[:, b0:b0 + group] = torch.clamp(torch.round(w[:, b0:b0 + group] / s[:, None]) + z[:, None], 0, 15).to(torch.uint8)
        s_all.append(s)
        z_all.append(z)
    return q, torch.stack(s_all, 1), torch.stack(z_all, 1).to(torch.uint8)


def _reference(w, h, group=32):
    """GPTQ as the paper writes it: every column rounded, its error spread over all later columns at once."""
    w = w.double().clone()
    k = w.shape[1]
    h = h.clone() + G.DAMP * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    for j in range(k):
        if j % group == 0:
            s, z = (t.double() for t in G.grid(w[:, j:j + group].float()))
        qj = (torch.clamp(torch.round(w[:, j] / s) + z, 0, 15) - z) * s
        out[:, j] = qj
        w[:, j + 1:] -= ((w[:, j] - qj) / u[j, j])[:, None] * u[j, j + 1:][None, :]
    return out.float()


def _out_err(wq, w, x):
    return float(((wq - w) @ x.T).pow(2).sum())


def test_matches_the_column_by_column_reference_and_beats_rtn():
    w, x, h = _data()
    q, s, z = G.quantize(w, h)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and z.dtype == torch.uint8 and int(z.max()) <= 15
    got = G.dequantize(q, s, z)
    ref = _reference(w, h)
    # the lazy block updates are the same arithmetic in another order (measured: max difference 3e-8)
    assert (got - ref).abs().max() < 1e-5
    rtn = G.dequantize(*_rtn(w))
    # the point of GPTQ: the error on the inputs, not on the weights, is what it minimizes; measured here 0.27x
    # RTN's output error for 2.3x its mean weight error
    assert _out_err(got, w, x) < 0.5 * _out_err(rtn, w, x)
    assert (got - w).abs().mean() > (rtn - w).abs().mean()


def test_identity_hessian_is_rtn_and_other_hessians_give_other_weights():
    w, _x, h = _data()
    k = w.shape[1]
    q_i, s_i, z_i = G.quantize(w, torch.eye(k, dtype=torch.float64))
    q_r, s_r, z_r = _rtn(w)
    assert torch.equal(q_i, q_r) and torch.allclose(s_i, s_r) and torch.equal(z_i, z_r)
    _w2, _x2, h2 = _data(seed=1)
    assert not torch.equal(G.quantize(w, h)[0], G.quantize(w, h2)[0])


def test_dead_columns_get_zero_weight_and_k_must_fill_groups():
    w, _x, h = _data()
    h[5, :] = 0
    h[:, 5] = 0
    q, s, z = G.quantize(w, h)
    assert torch.allclose(G.dequantize(q, s, z)[:, 5], torch.zeros(w.shape[0]), atol=1e-7)
    with pytest.raises(ValueError, match="multiple of the group size"):
        G.quantize(w[:, :100], h[:100, :100])


def test_int8_levels_use_the_whole_byte_and_cut_the_error():
    """levels=255 (gptq_mixed's int8 MatMuls): the same solver on MatMulNBits' 8-bit grid."""
    w, x, h = _data()
    q4, s4, z4 = G.quantize(w, h)
    q8, s8, z8 = G.quantize(w, h, levels=255)
    assert int(q8.max()) > 15 and int(z8.max()) > 15  # levels and zero points on the 0..255 grid, not 0..15
    e4, e8 = _out_err(G.dequantize(q4, s4, z4), w, x), _out_err(G.dequantize(q8, s8, z8), w, x)
    assert e8 < e4 / 100  # 16x finer steps: the squared error falls by about 256x


def test_more_bits_follows_llama_cpp_q4_k_m():
    """attn_v and ffn_down of llama.cpp's use_more_bits layers (src/llama-quant.cpp), on builder node names:
    30 layers (smollm2-135m) -> 0-2, 5, 8, ..., 23, 26-29; two layers -> the last one."""
    from edgepeft.export.onnx_calib import more_bits

    def names(layers):
        return [f"/model/layers.{i}/{part}/MatMul" for i in range(layers)
                for part in ("attn/q_proj", "attn/v_proj", "attn/o_proj", "mlp/up_proj", "mlp/down_proj")]

    got = more_bits(names(30))
    layers = sorted({int(n.split("/")[2].split(".")[1]) for n in got})
    assert layers == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert {n.split("/")[-2] for n in got} == {"v_proj", "down_proj"} and len(got) == 28
    assert more_bits(names(2)) == {"/model/layers.1/attn/v_proj/MatMul", "/model/layers.1/mlp/down_proj/MatMul"}
    fused = more_bits([n.replace("q_proj", "qkv_proj") for n in names(2) if "v_proj" not in n])  # merged builds
    assert fused == {"/model/layers.1/attn/qkv_proj/MatMul", "/model/layers.1/mlp/down_proj/MatMul"}
    assert more_bits(["/lm_head/MatMul"]) == set()


def test_onnx_calib_pads_k_to_whole_blocks():
    from edgepeft.export.onnx_calib import _solve

    w, _x, h = _data(k=96)
    (qw, scale, zp, k_blocks), = _solve([w[:, :80].T.numpy().copy()], h[:80, :80].numpy(), 32)  # K = 80: 3 blocks
    assert k_blocks == 3 and qw.shape == (48 * 3, 32) and scale.shape == zp.shape == (48 * 3, 1)
    assert qw.dtype == np.uint8 and scale.dtype == np.float32 and zp.dtype == np.uint8
    deq = ((qw.astype(np.float32) - zp) * scale).reshape(48, 96)
    assert np.allclose(deq[:, 80:], 0, atol=1e-7)  # the padding columns quantize to exact zeros
    # weights that share an input are solved as one matrix: the same levels as one by one
    parts = _solve([w[:20].T.numpy().copy(), w[20:].T.numpy().copy()], h.numpy(), 32)
    (whole, *_), = _solve([w.T.numpy().copy()], h.numpy(), 32)
    assert np.array_equal(np.concatenate([p[0] for p in parts]), whole)


def test_onnxruntime_port_ignores_the_hessian():
    """Why export/gptq.py exists: ORT 1.32's neural-compressor GPTQ (W as (K, N)) propagates errors through the
    zero triangle of its Cholesky factor, so any Hessian gives the same weights, min/max RTN. If a later ORT
    fixes it, this fails, and its solver can be reconsidered."""
    from onnxruntime.quantization.neural_compressor import weight_only
    w, _x, h = _data()
    _, _, h2 = _data(seed=1)
    args = {"num_bits": 4, "group_size": 32, "scheme": "asym", "blocksize": 128, "percdamp": 0.01, "actorder": False, "mse": False,
                "perchannel": True}
    a = weight_only.gptq(w.T.numpy().copy(), (2 * h).numpy().copy(), **args)
    b = weight_only.gptq(w.T.numpy().copy(), (2 * h2).numpy().copy(), **args)
    assert np.array_equal(a, b)
    assert np.allclose(a.T, G.dequantize(*_rtn(w)).numpy(), atol=1e-6)
