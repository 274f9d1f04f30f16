"""``--quant int4 --quant-algo source_grid``: MatMulNBits that keeps a 4-bit GGUF source's grid exactly.

A base dequantized from a 4-bit GGUF (the default ``smollm2-135m`` is Q4_1) holds at most 16 evenly spaced
values in every block of 32 weights: ``w = d * q + m``, q in 0..15, a float scale d and a float minimum m
(Q4_1; Q4_K's sub-blocks are the same form; Q4_0 is ``d * (q - 8)``). ONNX Runtime's MatMulNBits stores
``s * (q - zp)`` with an *integer* zero point at int4 speed, so the builder's RTN / k-quant snaps m to a
multiple of s and quantizes every block afresh: median relative error 0.083 on smollm2-135m's weights,
where the source's own grid has none (``benchmarks/results/onnx_grid.json``). A float zero point is
exact but runs the unpacked path, ~40x slower per call (same file).

This rewrite keeps the int4 kernel and puts the minimum beside it, exactly:

    W x = sum_b (d_b * q_b) . x_b + m_b * sum(x_b)
        = MatMulNBits(x; q, scales=d, zero_points=0) + MatMul(blocksum(x), M)

where ``blocksum`` sums each block of 32 inputs (Reshape + ReduceSum, shared by every projection that
reads the same activation) and ``M`` is the (K/32, N) float matrix of minima: 1/32 of the weight count.
Blocks that are not on a 16-level grid (a Q5/Q6/Q8 source tensor, or a block of one that is) keep the
builder's own quantization for that block, written in the same form (``m = -zp * s``), so a rewritten
tensor is never further from the base than the builder's. Each block's grid is recovered from the fp32
weights themselves (``recover``), so Q/K row permutations of the GGUF conversion do not matter, and every
recovered block is checked against the weights it came from.

The cost is the extra nodes and one float per block (``benchmarks/results/onnx_source_grid.json``: decode
0.83x, +12 % bytes). It applies where the weights are the base's own, ``--mode separate``; a merged model's
weights are off the grid after the merge, so the request refuses ``--mode merged``.
"""

from __future__ import annotations

import re
from pathlib import Path

GROUP = 32  # the GGUF 4-bit formats' block; MatMulNBits must use the same --block-size
LEVELS = 16
# a block counts as on its grid when d * q + m gives back every weight within this share of the block's range
# (the dequantizer computes d * q + m in fp32 from fp16 d and m: a few ulp)
REL_TOL = 1e-5

# builder MatMulNBits node -> Hugging Face weight (names as data)
BUILDER_NODE = re.compile(r"^/model/layers\.(?P<layer>\d+)/(?P<block>attn|mlp)/(?P<proj>\w+)/MatMul(_Q4)?$")
_BLOCKS = {"attn": "self_attn", "mlp": "mlp"}


def keeps_source_grid(origin_quant: str | None) -> bool:
    """Whether a base dequantized from a GGUF of this file type has 4-bit grids for ``land_on_grid`` to keep
    (Q4_0, Q4_1, and the Q4_K tensors of a Q4_K_M/Q4_K_S file)."""
    return bool(origin_quant) and origin_quant.startswith("q4")


def hf_weight(node_name: str) -> str | None:
    """The Hugging Face weight a builder MatMulNBits node computes with, or None (lm_head and the rest)."""
    m = BUILDER_NODE.match(node_name)
    if not m:
        return None
    return f"model.layers.{m['layer']}.{_BLOCKS[m['block']]}.{m['proj']}.weight"


def recover(w):
    """Per block of 32 inputs of ``w`` (N, K): ``(q, d, m, on_grid)`` with ``d * q + m == w`` on the blocks
    where ``on_grid``; q is uint8 (N, K/32, 32), d and m float32 (N, K/32), on_grid bool (N, K/32).

    Two steps are tried per block, from its smallest value: its range over 15, then the smallest gap
    between its distinct values (ties of one level compare equal, the next level is at least one step
    away); a block is on its grid when every value is within ``REL_TOL`` of ``m + d * q`` with q in 0..15.
    """
    import numpy as np

    n, k = w.shape
    b = w.reshape(n, k // GROUP, GROUP).astype(np.float64)
    s = np.sort(b, axis=-1)
    lo, hi = s[..., 0], s[..., -1]
    span = hi - lo
    gaps = np.diff(s, axis=-1)
    gaps = np.where(gaps > span[..., None] * 1e-4, gaps, np.inf)
    # two candidate steps: the range over 15 (Q4_1 and Q4_0 put the extremes on levels 0 and 15, or 0 and 8
    # for Q4_0's negative side) and the smallest gap between distinct values (Q4_K's optimized scales)
    q, d, m, on = _fit(b, lo, span, span / (LEVELS - 1))
    q2, d2, m2, on2 = _fit(b, lo, span, gaps.min(axis=-1))
    take = ~on & on2
    q = np.where(take[..., None], q2, q)
    return q, np.where(take, d2, d), np.where(take, m2, m), on | on2


def _fit(b, lo, span, step):
    """Levels ``q`` of every block on ``lo + step * q``, then d and m refitted to them (least squares, which
    removes the step's rounding), and whether every value came back within ``REL_TOL`` with q in 0..15."""
    import numpy as np

    flat = ~(np.isfinite(step) & (step > 0))  # every value equal: q = 0, d = 0
    step = np.where(flat, 1.0, step)
    q = np.rint((b - lo[..., None]) / step[..., None])
    qm, bm = q.mean(-1), b.mean(-1)
    var = ((q - qm[..., None]) ** 2).sum(-1)
    d = np.where(var > 0, ((q - qm[..., None]) * (b - bm[..., None])).sum(-1) / np.where(var > 0, var, 1), 0.0)
    m = bm - d * qm
    err = np.abs(d[..., None] * q + m[..., None] - b).max(-1)
    on = (q.max(-1) < LEVELS) & (err <= REL_TOL * np.maximum(span, np.abs(lo)))  # q >= 0: lo is the minimum
    on |= flat
    return q.clip(0, LEVELS - 1).astype(np.uint8), d.astype(np.float32), m.astype(np.float32), on


def _unpack(packed, n: int, nb: int):
    """MatMulNBits' packed 4-bit levels (N, nb, 16) -> (N, nb, 32): element 2i in the low nibble."""
    import numpy as np

    p = packed.reshape(n, nb, GROUP // 2)
    return np.stack([p & 0x0F, p >> 4], axis=-1).reshape(n, nb, GROUP)


def _pack(q):
    import numpy as np

    n, nb, _ = q.shape
    pairs = q.reshape(n, nb, GROUP // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def _zero_points(zp, n: int, nb: int):
    """MatMulNBits' 4-bit zero points, packed two per byte along the blocks of a row, as (N, nb) uint8."""
    import numpy as np

    if zp is None:
        return np.full((n, nb), 8, np.uint8)
    z = zp.reshape(n, -1)
    return np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)[:, :nb]


def land_on_grid(model_path: Path, weights) -> dict:
    """Rewrite the MatMulNBits nodes of ``model_path`` (in place) onto the source grid of ``weights``
    (``name -> (N, K) float array``, the Hugging Face weights the graph was built from).

    Returns ``{"tensors": rewritten, "blocks": on-grid blocks, "blocks_total": ..., "corrections": nodes}``.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from edgepeft.export.onnx_adapters import save_rewritten

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=True)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    blocksums: dict[str, str] = {}  # activation -> its blocksum output
    new_nodes, stats = [], {"tensors": 0, "blocks": 0, "blocks_total": 0, "corrections": 0}
    for node in g.node:
        new_nodes.append(node)
        name = hf_weight(node.name) if node.op_type == "MatMulNBits" else None
        if name is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("bits") != 4 or attrs.get("block_size") != GROUP:
            continue
        n, k = attrs["N"], attrs["K"]
        w = weights(name)
        if w is None or tuple(w.shape) != (n, k) or k % GROUP:
            continue
        nb = k // GROUP
        q, d, m, on = recover(np.asarray(w, dtype=np.float32))
        stats["blocks_total"] += on.size
        if not on.any():
            continue
        # off-grid blocks keep the builder's levels and scale, their zero point as a float minimum
        bq = _unpack(numpy_helper.to_array(inits[node.input[1]]), n, nb)
        bs = numpy_helper.to_array(inits[node.input[2]]).reshape(n, nb).astype(np.float32)
        zp_init = inits.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        bz = _zero_points(numpy_helper.to_array(zp_init) if zp_init is not None else None, n, nb)
        q = np.where(on[..., None], q, bq)
        d = np.where(on, d, bs)
        m = np.where(on, m, -bz.astype(np.float32) * bs)
        stats["tensors"] += 1
        stats["blocks"] += int(on.sum())
        prefix = node.output[0]
        g.initializer.remove(inits[node.input[1]])
        g.initializer.remove(inits[node.input[2]])
        if zp_init is not None:
            g.initializer.remove(zp_init)
        q_name, d_name, z_name, m_name = (f"{prefix}.grid_{x}" for x in ("q", "d", "zp", "min"))
        g.initializer.extend([
            numpy_helper.from_array(_pack(q), q_name),
            numpy_helper.from_array(d.reshape(-1), d_name),
            numpy_helper.from_array(np.zeros(n * ((nb + 1) // 2), np.uint8), z_name),
            numpy_helper.from_array(np.ascontiguousarray(m.T), m_name),  # (nb, N)
        ])
        x = node.input[0]
        main = f"{prefix}.grid_main"
        ins = list(node.input)
        while len(ins) < 4:
            ins.append("")
        ins[1:4] = [q_name, d_name, z_name]
        node.input[:] = ins
        out = node.output[0]
        node.output[0] = main
        if x not in blocksums:
            shape = f"{x}.grid_shape"
            g.initializer.append(numpy_helper.from_array(np.array([0, 0, nb, GROUP], np.int64), shape))
            axes = f"{x}.grid_axes"
            g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
            new_nodes.insert(len(new_nodes) - 1, helper.make_node("Reshape", [x, shape], [f"{x}.grid_blocks"],
                                                                  name=f"{x}.grid_Reshape"))
            new_nodes.insert(len(new_nodes) - 1, helper.make_node(
                "ReduceSum", [f"{x}.grid_blocks", axes], [f"{x}.grid_sum"], keepdims=0, name=f"{x}.grid_ReduceSum"))
            blocksums[x] = f"{x}.grid_sum"
        new_nodes.append(helper.make_node("MatMul", [blocksums[x], m_name], [f"{prefix}.grid_corr"],
                                          name=f"{prefix}.grid_MatMul"))
        new_nodes.append(helper.make_node("Add", [main, f"{prefix}.grid_corr"], [out], name=f"{prefix}.grid_Add"))
        stats["corrections"] += 1
    if stats["tensors"]:
        del g.node[:]
        g.node.extend(new_nodes)
        save_rewritten(model, model_path)
    return stats


def base_weights(base):
    """``name -> (N, K) float32 array or None``: the base's own safetensors weights, read one at a time."""
    from safetensors import safe_open

    files = {}
    for f in base.weight_files:
        with safe_open(str(f), "np") as h:
            files.update(dict.fromkeys(h.keys(), f))

    def get(name: str):
        if name not in files:
            return None
        with safe_open(str(files[name]), "np") as h:
            return h.get_tensor(name)

    return get
