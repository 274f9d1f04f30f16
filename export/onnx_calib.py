"""ONNX int4 with a calibration-based algorithm: GPTQ on a float build of the model, Hessians collected in ONNX
Runtime, the solver ``export/gptq.py`` (ORT's bundled Neural Compressor GPTQ never moves an error: see there),
MatMulNBits packed by ORT's own helper.

The builder's own int4 methods (RTN, k-quant) use no data. GPTQ needs the inputs each MatMul sees,
so the builder writes the model in fp32, ORT runs the calibration texts (:func:`edgepeft.calib.select_calibration`:
the run's training data, ``--calib`` or the bundled fallback; plus generic text, :func:`edgepeft.calib.with_generic_text`,
which measured better than the task alone) through it and quantizes every body
MatMul to 4 bits against its input Hessian, block size as asked, asymmetric, like the builder.
For ``--mode separate`` the adapter is active during calibration: its tensors are fed as the
model's LoRA inputs, so the base is quantized where the adapter actually uses it. The output
projection (``*_last`` in the builder's names) stays 8-bit (RTN), as ``k_quant_last`` keeps it.

What ran here (onnxruntime 1.32): ORT's GPTQ runs on CPU but is RTN in effect (``export/gptq.py``); HQQ needs no data (it is not calibration-based);
``nvidia_awq`` needs NVIDIA ModelOpt and a CUDA device, neither of which this toolkit can assume.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgepeft.ui import stage

LAST = "/lm_head/MatMul"
# ``gptq_mixed``: int8 for the MatMuls llama.cpp's Q4_K_M keeps at more bits (Q6_K there): attn_v and ffn_down of
# the layers ``use_more_bits`` picks (llama.cpp src/llama-quant.cpp): the first and last eighth, and every third one
# between them. The builder fuses q, k and v into one ``/model/layers.{i}/attn/qkv_proj/MatMul`` (unfused where an
# adapter plugs in: ``.../attn/v_proj/MatMul``), so the whole fused projection goes to int8. Measured on smollm2-135m
# + the demo adapter, merged (benchmarks/results/onnx_gptq.json, ppl vs PyTorch on held-out wikitext-2): int4 body
# +14.5 %; int8 ffn_down of those layers +9.6 %, of every layer +8.5 %; + qkv of those layers +5.9 % (+6.3 % after the
# Hessians' GEMMs were pooled: fp32 order); qkv + ffn_down of every layer +2.8 % (+21 % bytes); all int8 -0.4 %.
MORE_BITS_MODULES = ("qkv_proj", "v_proj", "down_proj")
_PAST = re.compile(r"^past_key_values\.\d+\.(key|value)$")
MAX_TOKENS = 256  # per calibration text: the builder's attention and our Hessians stay small
# rows of MatMul inputs pooled (over texts) into one x^T x GEMM: held as fp32, 1024 x the widths of every MatMul
# input (400 MB on smollm2-135m)
GEMM_ROWS = 1024


class Feeds:
    """The calibration inputs, one ORT feed per text: an empty KV history and, for separate mode, one
    adapter's LoRA tensors (the adapters take turns)."""

    def __init__(self, model: Path, ids: list[list[int]], adapters: Sequence[dict] = ()):
        import onnx

        graph = onnx.load(str(model), load_external_data=False).graph
        from onnx import numpy_helper

        inits = {i.name: i for i in graph.initializer}
        self.inputs = {i.name: i for i in graph.input if i.name not in inits}
        # LoRA slots and their rank-0 defaults (a module this adapter does not train stays off)
        self.lora = {i.name: numpy_helper.to_array(inits[i.name]) for i in graph.input if i.name in inits}
        self.ids, self.adapters, self.folder = ids, list(adapters), Path(model).parent

    def _kv(self, i) -> np.ndarray:
        import json

        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if not (dims[1] and dims[3]):  # symbolic: the builder's genai_config says
            dec = json.loads((self.folder / "genai_config.json").read_text())["model"]["decoder"]
            dims = [1, int(dec["num_key_value_heads"]), 0, int(dec["head_size"])]
        return np.zeros((1, dims[1], 0, dims[3]), dtype=np.float32)

    def feed(self, k: int) -> dict:
        ids = self.ids[k]
        out = {"input_ids": np.asarray([ids], dtype=np.int64)}
        for name, i in self.inputs.items():
            if name == "attention_mask":
                out[name] = np.ones((1, len(ids)), dtype=np.int64)
            elif name == "position_ids":
                out[name] = np.arange(len(ids), dtype=np.int64)[None]
            elif _PAST.match(name):
                out[name] = self._kv(i)
        if self.adapters:  # every slot fed, so the session's input list is the same for every text
            params = self.adapters[k % len(self.adapters)]
            out.update({n: params.get(n, default) for n, default in self.lora.items()})
        return out

    def __iter__(self):
        return (self.feed(k) for k in range(len(self.ids)))


def quantize_folder(req, base, src: Path, out: Path, adapters: Sequence[dict] = ()) -> dict:
    """``src`` (an fp32 builder folder) -> ``out`` at int4 GPTQ, on :func:`edgepeft.calib.select_calibration`'s data;
    ``adapters``: each adapter's LoRA tensors (separate mode), one active per calibration text, in turn.
    Returns the record entries (``calibration``, ``gptq``)."""
    import shutil

    from edgepeft.calib import select_calibration, with_generic_text

    tok = base.load_tokenizer()
    cal, text = with_generic_text(select_calibration(req, tok))
    feeds = Feeds(src / "model.onnx", calibration_ids(tok, cal.texts + (text.texts if text else [])), adapters)
    info = gptq(src / "model.onnx", out / "model.onnx", feeds, block_size=req.block_size,
                accuracy_level=req.accuracy_level, last_int8=req.quant_algo != "gptq",
                mixed=req.quant_algo == "gptq_mixed")
    for f in src.iterdir():  # genai_config.json, tokenizer files: the fp32 build's, unchanged by quantizing
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy2(f, out / f.name)
    info["adapters_active"] = len(adapters)
    info["generic_text"] = text.record() if text else None
    return {"calibration": cal.record(), "gptq": info}


def calibration_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each chat-rendered calibration text (special tokens parsed, no BOS of our own)."""
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][:MAX_TOKENS]
        if len(ids) >= 2:
            out.append(list(ids))
    return out


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's rule for the layers whose attn_v and ffn_down Q4_K_M stores at Q6_K (integer division, as there)."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def more_bits(names: Sequence[str]) -> set[str]:
    """The MatMuls of ``names`` that ``gptq_mixed`` quantizes at int8 (:data:`MORE_BITS_MODULES` x :func:`use_more_bits`)."""
    from edgepeft.export.onnx_grid import BUILDER_NODE  # the builder's node names, kept in one place

    found = {n: m for n in names if (m := BUILDER_NODE.match(n))}
    layers = 1 + max((int(m["layer"]) for m in found.values()), default=-1)
    return {n for n, m in found.items() if m["proj"] in MORE_BITS_MODULES and use_more_bits(int(m["layer"]), layers)}


def gptq(model: Path, out: Path, feeds: Feeds, *, block_size: int, accuracy_level: int,
         last_int8: bool = True, mixed: bool = False) -> dict:
    """Quantize ``model`` (fp32 ONNX) into ``out`` (``model.onnx`` + ``model.onnx.data``) with GPTQ.

    The solver is ``export/gptq.py`` (ORT's ``neural_compressor.weight_only.gptq`` returns RTN whatever the
    Hessian); the MatMulNBits packing is ORT's (``make_matmul_weight_only_node``). The driver is ours too: ORT's
    ``gptq_quantize`` runs the whole model once per distinct MatMul input per text (121 x 64 forward
    passes on smollm2-135m, hours on 2 cores); here one pass per text collects every Hessian at once,
    accumulated as ORT does (rows averaged per text, scaled by 2; GPTQ is invariant to the scale)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.neural_compressor import weight_only as W

    m = onnx.load(str(model))  # weights in memory: the quantizer reads them as arrays
    # the LoRA slots lose their rank-0 defaults while ORT calibrates (every text feeds an adapter, and ORT
    # takes only plain inputs in a feed that fixes the input list); they get them back afterwards
    defaults = [i for i in m.graph.initializer if i.name in feeds.lora]
    for d in defaults:
        m.graph.initializer.remove(d)
    inits = {i.name: i for i in m.graph.initializer}
    body = [(k, n) for k, n in enumerate(m.graph.node) if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2 and not (last_int8 and n.name == LAST)]
    hessians = _hessians(m, sorted({n.input[0] for _, n in body}), feeds)
    eight = more_bits([n.name for _, n in body]) if mixed else set()
    with stage(f"GPTQ int4 ({len(body)} MatMuls, {len(eight)} of them int8, {len(feeds.ids)} calibration texts)",
               total=len(body), unit="MatMuls") as st:
        by_input: dict[tuple, list] = {}  # q/k/v (and gate/up) read one activation: one solve for them all
        for k, node in body:
            by_input.setdefault((node.input[0], 8 if node.name in eight else 4), []).append((k, node))
        for (x_name, bits), group in by_input.items():
            weights = [numpy_helper.to_array(inits[node.input[1]]).astype(np.float32) for _, node in group]  # (K, N)
            solved = _solve(weights, hessians[x_name], block_size, levels=2 ** bits - 1)
            for (k, node), weight, (qw, scale, zp, k_blocks) in zip(group, weights, solved):
                w_name = node.input[1]  # node is rewritten in place below
                new, new_inits = W.make_matmul_weight_only_node(
                    node=node, weight_shape=weight.shape, num_bits=bits, group_size=block_size, k_blocks=k_blocks,
                    q_weight=qw, scale=scale, zero_point=zp, accuracy_level=accuracy_level)
                m.graph.node[k].CopyFrom(new)  # in place: the graph stays topologically sorted
                m.graph.initializer.remove(inits[w_name])
                m.graph.initializer.extend(new_inits)
                st.advance()
    m.graph.initializer.extend(defaults)
    # the output projection (``*_last``) at 8 bits and an own embedding table at 4 (ORT quantizes a Gather at 4
    # bits only) by RTN: a table left fp32 doubled the folder on smollm2-135m (113 MB of 220). A tied table
    # (the Gather reads the head's weight through a Transpose) then reads the head's 8-bit blocks.
    inits = {i.name for i in m.graph.initializer}
    table = [n.name for n in m.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    last = last_int8 and any(n.name == LAST and n.op_type == "MatMul" for n in m.graph.node)
    for bits, names, op in ((8, [LAST] if last else [], "MatMul"), (4, table, "Gather")):
        if names:
            m = _rtn(m, names, op, bits, block_size, accuracy_level)
    embedding = "int4 rtn" if table else (_share_head_with_table(m) if last else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(m, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out.name + ".data", size_threshold=0)
    return {"algorithm": "gptq", "solver": "edgepeft.export.gptq",
            "quantized_matmuls": len(body), "int8_matmuls": len(eight), "last_matmul": "int8 rtn" if last_int8 else "int4 gptq",
            "embedding": embedding,
            "calibration_texts": len(feeds.ids), "calibration_tokens": sum(map(len, feeds.ids))}


def _solve(weights: Sequence[np.ndarray], hessian: np.ndarray, block_size: int, levels: int = 15) -> list[tuple]:
    """GPTQ of ONNX MatMul weights (K, N_i) that read the same input, against its Hessian (K, K)
    (``export/gptq.py``; rows are independent given H, so they are solved as one (sum N_i, K) matrix), each in the
    form ORT's MatMulNBits packer takes: levels (N_i * k_blocks, block) uint8, scales and zero points
    (N_i * k_blocks, 1), and k_blocks. K is padded to whole blocks with zero columns that saw no input."""
    import torch

    from edgepeft.export import gptq as G

    k = weights[0].shape[0]
    k_blocks = (k + block_size - 1) // block_size
    pad = k_blocks * block_size - k
    w = torch.nn.functional.pad(torch.from_numpy(np.ascontiguousarray(np.concatenate(weights, axis=1).T)), (0, pad))
    h = torch.nn.functional.pad(torch.from_numpy(np.asarray(hessian, dtype=np.float64)), (0, pad, 0, pad))
    q, scale, zero = G.quantize(w, h, block_size, levels)
    out, row = [], 0
    for wt in weights:
        n = wt.shape[1]
        rows = slice(row, row + n)
        out.append((q[rows].reshape(n * k_blocks, block_size).numpy(),
                    scale[rows].reshape(-1, 1).numpy().astype(np.float32), zero[rows].reshape(-1, 1).numpy(), k_blocks))
        row += n
    return out


def _share_head_with_table(m) -> str | None:
    """A tied embedding (``Gather(Transpose(W_head))``) reads the head's 8-bit MatMulNBits blocks instead:
    GatherBlockQuantized over the same initializers, as the builder's own k-quant ties smollm2's table
    (bits 8, block = the head's). Returns the record's description, or None where the graph is not that shape
    (or K is padded to the block, which the gathered rows would carry) and the table stays fp32."""
    from onnx import helper, numpy_helper

    head = next((n for n in m.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits"), None)
    if head is None or len(head.input) < 4:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    k, n, block = attrs.get("K"), attrs.get("N"), attrs.get("block_size")
    consumers = [g for g in m.graph.node if g.op_type == "Gather" and g.input[0] in
                 {t.output[0] for t in m.graph.node if t.op_type == "Transpose"}]
    if not (k and n and block) or k % block or len(consumers) != 1:
        return None
    gather = consumers[0]
    transpose = next(t for t in m.graph.node if t.op_type == "Transpose" and t.output[0] == gather.input[0])
    weight = transpose.input[0]
    shape = weight + "_table_shape"  # a Constant node, not an initializer: those are all saved as external data,
    # which shape inference cannot read
    const = helper.make_node("Constant", [], [shape], name=gather.name + "_table_shape",
                             value=numpy_helper.from_array(np.array([n, k], dtype=np.int64)))
    reshape = helper.make_node("Reshape", [head.input[1], shape], [weight + "_table"], name=gather.name + "_table")
    tied = helper.make_node("GatherBlockQuantized", [weight + "_table", gather.input[1], head.input[2], head.input[3]],
                            [gather.output[0]], name=gather.name.replace("Gather", "GatherBlockQuantized"),
                            domain="com.microsoft", bits=attrs.get("bits", 8), block_size=block, gather_axis=0,
                            quantize_axis=1)
    at = list(m.graph.node).index(transpose)
    for old in (gather, transpose):
        m.graph.node.remove(old)
    for node in (tied, reshape, const):  # Constant, Reshape, then the gather: still topologically sorted
        m.graph.node.insert(at, node)
    if not any(weight in x.input for x in m.graph.node):  # the fp32 matrix is gone from the graph
        m.graph.initializer.remove(next(i for i in m.graph.initializer if i.name == weight))
    return f"int{attrs.get('bits', 8)}, tied to the lm_head's blocks"


def _rtn(m, names: list[str], op: str, bits: int, block_size: int, accuracy_level: int):
    """ORT's default (RTN) weight-only quantizer on the named nodes only."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    algo = DefaultWeightOnlyQuantConfig(block_size=block_size, bits=bits, is_symmetric=False,
                                        accuracy_level=accuracy_level, op_types_to_quantize=(op,),
                                        quant_axes=((op, 1 if op == "Gather" else 0),))
    others = [n.name for n in m.graph.node if n.name not in set(names)]
    quant = MatMulNBitsQuantizer(m, bits=bits, block_size=block_size, is_symmetric=False,
                                 accuracy_level=accuracy_level, nodes_to_exclude=others, algo_config=algo)
    quant.process()
    return quant.model.model


def _hessians(m, names: list[str], feeds: Feeds) -> dict[str, np.ndarray]:
    """Every MatMul input's GPTQ Hessian from one ORT pass per text (the model's own outputs dropped)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del probe
    sums: dict[str, np.ndarray] = {}
    pending: dict[str, list[np.ndarray]] = {name: [] for name in names}

    def flush(name: str) -> None:
        # x^T x as one fp32 GEMM over the rows of several texts, summed in fp64. GEMM rows matter: on 2 AVX-512
        # cores numpy reaches 16-100 GFLOP/s at a text's 60-250 rows and 255-320 at 1024 (smollm2-135m, 48 texts:
        # 29 s of GEMMs one text at a time; pooled, the whole stage is 13.5 s, 9 s of it the ORT forward)
        x = np.concatenate(pending[name]) if len(pending[name]) > 1 else pending[name][0]
        xtx = (x.T @ x).astype(np.float64)
        sums[name] = xtx if name not in sums else sums[name] + xtx
        pending[name] = []

    n = 0
    with stage("collect MatMul input statistics in onnxruntime", total=len(feeds.ids), unit="texts") as st:
        for feed in feeds:
            outs = sess.run(names, feed)
            n += 1
            for name, x in zip(names, outs):
                pending[name].append(np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32))
                if sum(len(p) for p in pending[name]) >= GEMM_ROWS:
                    flush(name)
            st.advance()
    for name in names:
        if pending[name]:
            flush(name)
    # ORT's form: the mean over texts of 2 x^T x (GPTQ itself is invariant to the scale)
    return {name: h * (2.0 / n) for name, h in sums.items()}
