"""llama.cpp's own quantizer, called through llama-cpp-python's bindings.

K-quants and the legacy block types are produced by ``llama_model_quantize`` itself (the
code behind ``llama-quantize``), never by a port, so the mix of types per tensor (Q4_K_M
keeps some tensors at Q6_K, etc.) is exactly what llama.cpp would choose.
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


QUANTS: dict[str, Quant] = {q.name: q for q in (
    Quant("f32", "LLAMA_FTYPE_ALL_F32", "ALL_F32", True),
    Quant("f16", "LLAMA_FTYPE_MOSTLY_F16", "MOSTLY_F16", True),
    Quant("bf16", "LLAMA_FTYPE_MOSTLY_BF16", "MOSTLY_BF16", True),
    Quant("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", "MOSTLY_Q8_0", False),
    Quant("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", "MOSTLY_Q4_0", False),
    Quant("q4_k_m", "LLAMA_FTYPE_MOSTLY_Q4_K_M", "MOSTLY_Q4_K_M", False),
    Quant("q5_k_m", "LLAMA_FTYPE_MOSTLY_Q5_K_M", "MOSTLY_Q5_K_M", False),
    Quant("q6_k", "LLAMA_FTYPE_MOSTLY_Q6_K", "MOSTLY_Q6_K", False),
)}


def get_quant(name: str) -> Quant:
    q = QUANTS.get(str(name).lower())
    if q is None:
        raise ConfigError("--quant", name, ", ".join(QUANTS))
    return q


_TENSOR_LINE = re.compile(r"\s*\[\s*(\d+)/\s*(\d+)\]")


def quantize(src: Path, dst: Path, quant: str, nthread: int | None = None) -> None:
    """Quantize GGUF ``src`` (F32/F16 intermediate) into ``dst`` with llama.cpp's quantizer.

    Runs in a child process: the quantizer maps the whole intermediate, and doing that in the
    exporting process (which already holds torch and the tokenizer) would add the two peaks
    instead of taking the larger one.
    """
    import subprocess

    from edgepeft.ui import STATE, stage

    get_quant(quant)
    cmd = [sys.executable, "-m", "edgepeft.export.quantize", str(src), str(dst), quant, str(nthread or 0)]
    lines: list[str] = []
    with stage(f"quantize {quant} (llama.cpp)", unit="tensors") as st:
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


def quantize_in_process(src: Path, dst: Path, quant: str, nthread: int | None = None) -> None:
    import llama_cpp

    q = get_quant(quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, q.llama_ftype)
    params.nthread = nthread or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")


if __name__ == "__main__":  # the child process quantize() starts
    quantize_in_process(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]) or None)
