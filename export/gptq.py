"""GPTQ (Frantar et al., 2022) onto MatMulNBits' asymmetric int4 grid: the solver behind ``--quant-algo gptq*``.

Why not ONNX Runtime's own: ``onnxruntime.quantization.neural_compressor.weight_only.gptq`` (onnxruntime 1.32)
works on the ONNX layout, W as (K, N), and propagates each rounded row's error with ``Hinv1[i:, i]`` and
``Hinv[i2:, i1:i2]``: the column below the diagonal of the *upper* Cholesky factor it just made, which is zero.
No error ever moves, so it returns plain min/max RTN whatever the Hessian: two very different Hessians give
bit-identical weights (tests/test_onnx_calib.py holds that here), and on smollm2-135m + the quickstart adapter
its ``gptq_last`` export scored exactly the same perplexity and task with 32 or 48 calibration texts
(``benchmarks/results/onnx_gptq.json``). This module is the algorithm as published, in PyTorch, in the
Hugging Face (N, K) layout: one input column at a time, the rounding error of each column moved onto the
columns not yet rounded through the upper Cholesky factor of H⁻¹ (its row), in lazy blocks of one quantization
group with one matmul for the columns after the block.

H = E[x xᵀ] of the linear's inputs on the calibration texts (``export/onnx_calib.py`` collects it in ORT). The
grid of each (row, group of 32 input columns) is min/max, zero inside, as MatMulNBits stores it (a 4-bit
integer zero point), chosen when the group's turn comes from its weights as the earlier groups' errors left
them, as the reference implementation does. Damping 1 % of the mean diagonal, as there.
"""

from __future__ import annotations

LEVELS = 15  # int4: q in 0..15 (int8: 255)
DAMP = 0.01  # of the mean diagonal of H, added to its diagonal (GPTQ's default)


def grid(block, levels: int = LEVELS):
    """MatMulNBits' asymmetric grid of ``block`` (N, G): ``(scale, zero)``, each (N,), float32; zero is an
    integer level in 0..levels (15 for int4, 255 for int8), so 0.0 is always a level."""
    import torch

    lo = torch.clamp(block.min(1).values, max=0)
    hi = torch.clamp(block.max(1).values, min=0)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / scale).clamp(0, levels)


def quantize(w, h, group: int = 32, levels: int = LEVELS):
    """GPTQ of ``w`` (N, K) against ``h`` (K, K), the second moment of its inputs; K a multiple of ``group``;
    ``levels``: 15 (int4) or 255 (int8).

    Returns ``(q, scale, zero)``: uint8 levels (N, K), float32 scales (N, K/group) and uint8 zero points
    (N, K/group), with ``w ≈ (q - zero) * scale`` per group (:func:`dequantize`). Input columns that never saw a
    non-zero input (diag 0) carry no error and get weight 0, as in the reference."""
    import torch

    w = torch.as_tensor(w).detach().float().clone()
    h = torch.as_tensor(h).detach().double().clone()
    n, k = w.shape
    if k % group:
        raise ValueError(f"GPTQ: {k} input columns are not a multiple of the group size {group}")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    eye = torch.eye(k, dtype=h.dtype)
    damp = DAMP * torch.mean(torch.diag(h))
    for _ in range(4):  # not positive definite: damp more, as the reference's callers do
        try:
            u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h + damp * eye)), upper=True)
            break
        except RuntimeError:
            damp = damp * 10
    else:
        raise ValueError("GPTQ: the calibration Hessian is not positive definite even damped 1000x")
    u = u.float()
    q = torch.empty(n, k, dtype=torch.uint8)
    scale = torch.empty(n, k // group)
    zero = torch.empty(n, k // group)
    for b0 in range(0, k, group):
        b1 = b0 + group
        wb = w[:, b0:b1].clone()
        s, z = grid(wb, levels)
        scale[:, b0 // group], zero[:, b0 // group] = s, z
        err = torch.empty_like(wb)
        ub = u[b0:b1, b0:b1]
        for j in range(group):
            col = wb[:, j]
            lv = torch.clamp(torch.round(col / s) + z, 0, levels)
            q[:, b0 + j] = lv.to(torch.uint8)
            e = (col - (lv - z) * s) / ub[j, j]
            wb[:, j + 1:] -= e[:, None] * ub[j, j + 1:][None, :]
            err[:, j] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return q, scale, zero.to(torch.uint8)


def dequantize(q, scale, zero, group: int = 32):
    """The weights MatMulNBits computes with: ``(q - zero) * scale`` per group, (N, K) float32."""
    n, k = q.shape
    qb = q.reshape(n, k // group, group).float()
    return ((qb - zero.float()[..., None]) * scale[..., None]).reshape(n, k)
