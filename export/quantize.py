"""llama.cpp's own quantizer, called through llama-cpp-python's bindings.

K-quants and the legacy block types are produced by ``llama_model_quantize`` itself (the
code behind ``llama-quantize``), never by a port, so the mix of types per tensor (Q4_K_M
keeps some tensors at Q6_K, etc.) is exactly what llama.cpp would choose.

An importance matrix (edgepeft/imatrix.py) reaches the quantizer as llama.cpp's own C array of
``llama_model_imatrix_data {name, data, size}`` (NULL-terminated), and tensor-type overrides as
``llama_model_tensor_override {pattern, type}``: both built with ctypes from the pinned bindings'
struct definitions, as ``llama-quantize --imatrix FILE --tensor-type PATTERN=TYPE`` builds them.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from edgepeft.errors import ConfigError, EdgepeftError


@dataclass(frozen=True)
class Quant:
    name: str  # the --quant spelling
    llama_ftype: str  # attribute of llama_cpp: LLAMA_FTYPE_*
    gguf_ftype: str  # member of gguf.LlamaFileType (what general.file_type records)
    written_directly: bool  # float types are written by gguf-py; block types go through llama_model_quantize
    imatrix: str = "uses"  # none: the quantizer ignores a matrix; uses: weighs its rounding by one;
    #                        requires: llama.cpp refuses the type without one (llama-quant.cpp tensor_requires_imatrix)


QUANTS: dict[str, Quant] = {q.name: q for q in (
    Quant("f32", "LLAMA_FTYPE_ALL_F32", "ALL_F32", True, "none"),
    Quant("f16", "LLAMA_FTYPE_MOSTLY_F16", "MOSTLY_F16", True, "none"),
    Quant("bf16", "LLAMA_FTYPE_MOSTLY_BF16", "MOSTLY_BF16", True, "none"),
    Quant("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", "MOSTLY_Q8_0", False, "none"),
    Quant("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", "MOSTLY_Q4_0", False),
    # a float minimum per 32 weights: lands exactly on a Q4_1 source's grid (benchmarks/bench_onnx_grid.py)
    Quant("q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1", "MOSTLY_Q4_1", False),
    Quant("q4_k_m", "LLAMA_FTYPE_MOSTLY_Q4_K_M", "MOSTLY_Q4_K_M", False),
    Quant("q5_k_m", "LLAMA_FTYPE_MOSTLY_Q5_K_M", "MOSTLY_Q5_K_M", False),
    Quant("q6_k", "LLAMA_FTYPE_MOSTLY_Q6_K", "MOSTLY_Q6_K", False),
    Quant("iq4_xs", "LLAMA_FTYPE_MOSTLY_IQ4_XS", "MOSTLY_IQ4_XS", False),
    Quant("q3_k_m", "LLAMA_FTYPE_MOSTLY_Q3_K_M", "MOSTLY_Q3_K_M", False),
    Quant("q2_k", "LLAMA_FTYPE_MOSTLY_Q2_K", "MOSTLY_Q2_K", False),
    Quant("iq3_xxs", "LLAMA_FTYPE_MOSTLY_IQ3_XXS", "MOSTLY_IQ3_XXS", False, "requires"),
)}


def relands_source_grid(source: str | None, quant: str) -> bool:
    """Whether ``quant`` of a base dequantized from a ``source`` GGUF gives its weights back exactly (measured:
    Q4_1, whose float minimum per block lands on the old grid; benchmarks/bench_onnx_grid.py)."""
    return quant == source == "q4_1"


# merged ONNX int4 calibrated on the task (benchmarks/results/onnx_gptq.json, demo and chat adapters, held-out text)
GPTQ_HOLDS = {"gptq_mixed": "+4-6 %", "gptq_last": "+11-15 %"}


def regrid_note(source: str | None, fmt: str, quant: str, mode: str, algo: str | None = None) -> str | None:
    """One status line when a base dequantized from a 4-bit GGUF is about to be quantized onto a grid, naming
    what keeps the weights. smollm2-135m's source is a Q4_1 GGUF (benchmarks/bench_onnx_grid.py: every block
    on its grid), with the trained demo adapter (PyTorch 98/100; benchmarks/results/imatrix_q4_1.json):
    - separate (the base unchanged): GGUF q4_1 99/100, ppl x1.000 (its blocks come back exactly); q4_k_m
      96/100, x1.039 (98, x1.022 with the importance matrix);
    - merged into that base, q4_1: 0/100. The adapter moves each weight by less than half a Q4_1 step, so
      quantizing onto the base's own grid rounds it back to the base;
    - ONNX int4 requantizes any such base (MatMulNBits' zero points are integers at int4 speed): verifier
      top-1 0.68, ppl x1.30 for the base alone; int8 0.975, x0.995."""
    if not source or not source.startswith(("q4", "iq4")):
        return None
    if fmt == "gguf" and relands_source_grid(source, "q4_1"):
        if mode == "separate" and quant != "q4_1" and quant.startswith(("q4", "iq4", "q3", "q2", "iq3")):
            return ("the base was dequantized from a Q4_1 GGUF: --quant q4_1 keeps its weights exactly "
                    "(smollm2-135m + demo adapter, separate: 99 % vs 96 % for q4_k_m)")
        if mode == "merged" and relands_source_grid(source, quant):
            return ("the base was dequantized from a Q4_1 GGUF: merged at q4_1, the adapter's change rounds back "
                    "onto the base's own grid (smollm2-135m + demo adapter: 0 % of 98 %); "
                    "use --mode separate, or --quant q4_k_m")
    if fmt == "onnx" and quant == "int4" and algo != "source_grid":
        keep = ("--quant-algo source_grid keeps it exactly (top-1 0.91, ppl x1.01, demo 98 % vs 72 %; decode 0.83x)"
                if mode == "separate" else "--quant int8 keeps it (0.98, x1.00), or --mode separate "
                "--quant-algo source_grid")
        if mode == "merged" and algo in GPTQ_HOLDS:  # calibrated on the task: say what it measured to keep
            return (f"the base was dequantized from a {source.upper()} GGUF: ONNX int4 (integer zero points) "
                    f"quantizes it again; {algo} on the task's data held smollm2-135m's two test adapters within "
                    f"1 point, perplexity {GPTQ_HOLDS[algo]}; {keep}")
        return (f"the base was dequantized from a {source.upper()} GGUF: ONNX int4 (integer zero points) "
                f"quantizes it again (smollm2-135m: top-1 0.68, ppl x1.30); {keep}")
    return None


def get_quant(name: str) -> Quant:
    q = QUANTS.get(str(name).lower())
    if q is None:
        raise ConfigError("--quant", name, ", ".join(QUANTS))
    return q


_TENSOR_LINE = re.compile(r"\s*\[\s*(\d+)/\s*(\d+)\]")


def quantize(src: Path, dst: Path, quant: str, nthread: int | None = None, imatrix: Path | None = None,
             overrides: dict[str, str] | None = None) -> None:
    """Quantize GGUF ``src`` (F32/F16 intermediate) into ``dst`` with llama.cpp's quantizer.

    ``imatrix``: an imatrix GGUF (edgepeft.imatrix.write); ``overrides``: regex -> ggml type name
    (``{"^blk\\.3\\.ffn_down\\.weight$": "q6_k"}``), llama.cpp's tensor-type overrides.

    Runs in a child process: the quantizer maps the whole intermediate, and doing that in the
    exporting process (which already holds torch and the tokenizer) would add the two peaks
    instead of taking the larger one.
    """
    import json
    import subprocess

    from edgepeft.ui import STATE, stage

    get_quant(quant)
    opts = json.dumps({"imatrix": str(imatrix) if imatrix else None, "overrides": overrides or {}})
    cmd = [sys.executable, "-m", "edgepeft.export.quantize", str(src), str(dst), quant, str(nthread or 0), opts]
    lines: list[str] = []
    what = " + importance matrix" if imatrix else ""
    with stage(f"quantize {quant} (llama.cpp{what})", unit="tensors") as st:
        # llama.cpp logs "[  12/ 273] blk.0..." per tensor: that is the progress bar
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None if STATE.debug else subprocess.STDOUT)
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            m = _TENSOR_LINE.match(line)
            if m:
                st.update(completed=int(m.group(1)), total=int(m.group(2)))
        rc = proc.wait()
    if rc != 0:
        last = next((ln for ln in reversed(lines) if ln.strip()), f"exit status {rc}")
        raise EdgepeftError(f"llama.cpp's quantizer failed turning {Path(src).name} into {quant}: {last.strip()}",
                            "Check free disk space in --out; rerun with --debug for llama.cpp's full log")


def ggml_type_id(name: str) -> int:
    """The ggml type number of ``q6_k`` / ``Q8_0`` / ... (gguf-py's table is llama.cpp's enum)."""
    import gguf

    try:
        return int(gguf.GGMLQuantizationType[name.upper()])
    except KeyError:
        raise ConfigError("tensor type", name, ", ".join(t.name.lower() for t in gguf.GGMLQuantizationType)) from None


def quantize_params(quant: str, nthread: int | None, means: dict | None = None, overrides: dict | None = None):
    """``llama_model_quantize_params`` with the matrix and overrides as NULL-terminated C arrays.

    Returns (params, keep): ``keep`` holds the ctypes buffers the params point into; it must outlive the call.
    """
    import ctypes

    import llama_cpp
    import numpy as np

    q = get_quant(quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, q.llama_ftype)
    params.nthread = nthread or os.cpu_count() or 1
    keep: list = []
    if means:
        entries = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()  # zeroed: the last is the terminator
        for i, (name, values) in enumerate(sorted(means.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        keep.append(entries)
        params.imatrix = entries
    if overrides:
        tt = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()  # zeroed: a NULL pattern ends it
        for i, (pattern, type_name) in enumerate(overrides.items()):
            tt[i].pattern = pattern.encode()
            tt[i].type = ggml_type_id(type_name)
        keep.append(tt)
        params.tt_overrides = tt
    return params, keep


def quantize_in_process(src: Path, dst: Path, quant: str, nthread: int | None = None, imatrix: str | None = None,
                        overrides: dict | None = None) -> None:
    import llama_cpp

    means = None
    if imatrix:
        from edgepeft.imatrix import read

        means = read(Path(imatrix)).means()
    params, keep = quantize_params(quant, nthread, means, overrides)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    del keep
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")


if __name__ == "__main__":  # the child process quantize() starts
    import json

    _opts = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    quantize_in_process(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]) or None,
                        _opts.get("imatrix"), _opts.get("overrides"))
