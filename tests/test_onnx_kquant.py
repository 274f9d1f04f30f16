"""ORT's k-quant in row chunks (export/onnx.py): the same bytes as one call, a fraction of the memory.

One k-quant call on Gemma 3's tied 262144 x 640 lm_head peaked the int4 ONNX build at 9.4 GB (10 GB in
the quickstart); in chunks the same export peaks at 4.4 GB with an identical model.onnx.data. The chunks run on every core (at least
one chunk per thread), which changes no byte either. Memory is
not asserted here (no timed or RSS asserts): what is checked is that the builder's large MatMuls go
through the chunks, and that the chunks change no byte.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _ort_k_quant():
    from onnxruntime.quantization.neural_compressor import weight_only as W

    return W.quant_tensor_k_quant_cuda


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("bits", [4, 8])
def test_chunks_give_the_bytes_of_one_call(bits, threads):
    from edgepeft.export.onnx import k_quant_in_chunks

    rng = np.random.default_rng(bits)
    w = rng.standard_normal((96, 1001)).astype(np.float32)  # K x N, as a MatMul weight; 1001 rows: a ragged last chunk
    w[:, 7] = 0.25  # a constant group (rmin == rmax) takes ORT's other branch
    whole = _ort_k_quant()(w.T, bits, 32)
    chunked = k_quant_in_chunks(_ort_k_quant(), w.T, bits, 32, chunk=96 * 100, threads=threads)
    assert chunked[0].dtype == np.uint8
    assert np.array_equal(whole[0], whole[0].round()) and whole[0].max() <= 2**bits - 1
    assert chunked[0].tobytes() == whole[0].astype(np.uint8).tobytes()
    for a, b in zip(whole[1:], chunked[1:]):
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and a.tobytes() == b.tobytes()


def _build(src: Path, out: Path, chunk: int, threads: int, monkeypatch) -> list[tuple[int, int]]:
    """An int4 k_quant_last build of ``src`` on ``threads`` threads; returns the (rows, cols) of every call
    ORT's k-quant got."""
    from onnxruntime.quantization.neural_compressor import weight_only as W

    from edgepeft.export import onnx as O

    calls, original = [], W.quant_tensor_k_quant_cuda

    def spy(data, num_bits=4, group_size=32):
        calls.append(data.shape)
        return original(data, num_bits, group_size)

    monkeypatch.setattr(W, "quant_tensor_k_quant_cuda", spy)
    monkeypatch.setattr(O, "K_QUANT_CHUNK", chunk)
    monkeypatch.setattr(O, "k_quant_threads", lambda: threads)
    O.build_genai(src, out, quant="int4", ep="cpu", block_size=32, accuracy_level=4, cache=out.parent / "cache",
                  extra={"algo_config": "k_quant_last"})
    assert W.quant_tensor_k_quant_cuda is spy  # the build put ORT's function back
    return calls


def test_builder_quantizes_the_tied_lm_head_in_chunks_with_identical_bytes(tiny_qwen2, tmp_path, monkeypatch):
    """Tiny Qwen2 ties its embeddings like Gemma 3: the builder's int8 lm_head is also the embedding
    table (GatherBlockQuantized), so both read the chunked bytes."""
    import onnx

    whole = _build(tiny_qwen2, tmp_path / "whole", 1 << 40, 1, monkeypatch)
    chunked = _build(tiny_qwen2, tmp_path / "chunked", 64 * 1000, 2, monkeypatch)  # the chunks on 2 threads
    lm_rows = max(r for r, _ in whole)
    assert lm_rows > 1000 and (lm_rows, 64) in whole  # one call on the lm_head (vocab x hidden) without chunks
    assert max(r for r, _ in chunked) <= 1000 and sum(r for r, c in chunked if c == 64) >= lm_rows
    m = onnx.load(str(tmp_path / "chunked" / "model.onnx"), load_external_data=False)
    ops = {n.name: n.op_type for n in m.graph.node}
    assert ops.get("/model/embed_tokens/GatherBlockQuantized") == "GatherBlockQuantized"
    assert ops.get("/lm_head/MatMul_Q8") == "MatMulNBits"
    for f in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "chunked" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f
