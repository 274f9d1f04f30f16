# ruff: noqa: F811  (pytest fixtures imported from bench_artifacts are parameters by design)
"""Each runtime on tiny exported artifacts: load, prefill, decode, swap, close; unknown runtime."""

from __future__ import annotations

import numpy as np
import pytest
from bench_artifacts import gguf_sep, onnx_sep, peft_adapters  # noqa: F401  (session fixtures)

from edgepeft.artifacts import runtime_artifact as discover
from edgepeft.errors import EdgepeftError, MismatchError
from edgepeft.profiles import load_profile
from edgepeft.runtimes.base import RUNTIMES, get_runtime

TEXT = "The quick brown fox jumps over the lazy dog and keeps running"


def exercise(rt, artifact) -> dict:
    """The whole protocol once; returns per-adapter full-sequence logits."""
    rt.load(artifact, load_profile("x86-64-cpu"), n_ctx=64)
    assert rt.load_ms > 0
    toks = rt.tokenize(TEXT)
    assert len(toks) > 5
    # special tokens come back as text: task accuracy stops generating at the end-of-turn marker
    eot = rt.tokenize("<|im_end|>", special=True)
    assert len(eot) == 1 and rt.detokenize([*toks[:2], *eot]).endswith("<|im_end|>")
    out, passes = {}, [None, *artifact.adapters, None]
    for i, name in enumerate(passes):
        rt.set_adapter(name)
        rt.prefill(toks, all_logits=True)
        logits = rt.logits()
        assert logits.shape[0] == len(toks) and np.isfinite(logits).all()
        gen = rt.decode(4)
        assert len(gen) == 4 and all(0 <= t < logits.shape[1] for t in gen)
        assert rt.logits().shape[0] == 1
        if i == len(passes) - 1:
            # back to none after the adapters (first pass vs this last one): KV cache and adapter state
            # really reset
            assert artifact.adapters and None in out
            np.testing.assert_allclose(logits, out[None], atol=1e-4)
        else:
            out[name] = logits
    # greedy continuation is deterministic after a reset
    rt.reset()
    rt.prefill(toks)
    first = rt.decode(3)
    rt.reset()
    rt.prefill(toks)
    assert rt.decode(3) == first
    rt.close()
    return out


def test_discover_gguf_export_folder(gguf_sep):
    art = discover(gguf_sep)
    assert art.format == "gguf" and set(art.adapters) == {"sql", "chat"} and art.quant == "f32"
    assert art.model.name.startswith("base-") and art.model_bytes == art.model.stat().st_size


@pytest.fixture(scope="module")
def llamacpp_logits(gguf_sep):
    return exercise(get_runtime("llama.cpp"), discover(gguf_sep))


def test_llamacpp_runtime(llamacpp_logits):
    out = llamacpp_logits
    for name in ("sql", "chat"):  # non-zero B: each adapter changes the logits, differently
        assert np.abs(out[name] - out[None]).max() > 1e-2
    assert np.abs(out["sql"] - out["chat"]).max() > 1e-2


@pytest.mark.parametrize("runtime", ["onnxruntime-genai", "onnxruntime"])
def test_onnx_runtimes(runtime, onnx_sep, llamacpp_logits):
    art = discover(onnx_sep)
    assert art.format == "onnx-genai" and set(art.adapters) == {"sql", "chat"}
    out = exercise(get_runtime(runtime), art)
    ref = llamacpp_logits
    for name in (None, "sql", "chat"):  # same f32 weights: runtimes agree on every position's top-1
        assert (out[name].argmax(1) == ref[name].argmax(1)).mean() >= 0.9, name
        assert np.abs(out[name] - ref[name]).max() < 0.05, name


def test_unknown_runtime_lists_known():
    with pytest.raises(EdgepeftError) as e:
        get_runtime("tensorflow-lite")
    for name in RUNTIMES:
        assert name in str(e.value)


def test_unknown_adapter_name(gguf_sep):
    rt = get_runtime("llama.cpp")
    rt.load(discover(gguf_sep), load_profile("x86-64-cpu"), n_ctx=32)
    try:
        with pytest.raises(EdgepeftError, match="sql"):
            rt.set_adapter("nope")
    finally:
        rt.close()


def test_adapter_from_other_base_refused(gguf_sep, tiny_qwen2, tmp_path):
    """The exporter's fit check runs before llama.cpp sees the file."""
    from bench_artifacts import export, make_peft

    other = export("gguf", tiny_qwen2, {"q": make_peft(tiny_qwen2, tmp_path / "q", 3)}, tmp_path / "q-out",
                   mode="separate", quant="f32", merge_into="original")
    foreign = next(f for f in other["files"] if f.endswith(".lora.gguf"))
    art = discover(gguf_sep, {"foreign": foreign})
    with pytest.raises(MismatchError):
        get_runtime("llama.cpp").load(art, load_profile("x86-64-cpu"), n_ctx=32)


@pytest.mark.slow
def test_qnn_static_graphs_on_plain_onnxruntime(tiny_llama, peft_adapters, llamacpp_logits, tmp_path):
    """export --target qnn-htp (merged) runs on the HTP simulator through the static prefill/decode driver."""
    pytest.importorskip("onnxruntime_qnn")
    from bench_artifacts import export

    out = tmp_path / "qnn"
    export("onnx", tiny_llama, {"sql": peft_adapters["sql"]}, out, mode="merged", quant="int8", target="qnn-htp",
           device="snapdragon-x-elite")
    art = discover(out)
    assert art.format == "onnx-static" and art.quant == "qnn-ctx"
    rt = get_runtime("onnxruntime")
    rt.load(art, load_profile("snapdragon-x-elite"), n_ctx=64)
    toks = rt.tokenize(TEXT)
    rt.prefill(toks, all_logits=True)
    logits = rt.logits()
    assert logits.shape[0] == len(toks) and np.isfinite(logits).all()
    assert len(rt.decode(4)) == 4
    # uint16/uint8 QDQ of the merged model: mostly the same top-1 as llama.cpp's f32 base + sql adapter
    agree = (logits.argmax(1) == llamacpp_logits["sql"].argmax(1)).mean()
    assert agree >= 0.3, agree  # random weights would agree ~0
    rt.close()
