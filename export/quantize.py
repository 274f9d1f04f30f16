"""llama.cpp's own quantizer, called through llama-cpp-python's bindings.

K-quants and the legacy block types are produced by ``llama_model_quantize`` itself (the
code behind ``llama-quantize``), never by a port, so the mix of types per tensor (Q4_K_M
keeps some tensors at Q6_K, etc.) is exactly what llama.cpp would choose.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
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


def quantize(src: Path, dst: Path, quant: str, nthread: int | None = None) -> None:
    """Quantize GGUF ``src`` (F32/F16 intermediate) into ``dst`` with llama.cpp's quantizer."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    from edgepeft.ui import STATE

    set_verbose(STATE.debug)  # llama.cpp logs every tensor it quantizes; keep stderr to our one-liners
    q = get_quant(quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, q.llama_ftype)
    params.nthread = nthread or os.cpu_count() or 1
    with _captured_stderr(passthrough=STATE.debug) as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        last = next((ln for ln in reversed(log()) if ln.strip()), "no message")
        raise EdgepeftError(f"llama.cpp's quantizer failed turning {Path(src).name} into {quant}: {last.strip()}",
                            "Check free disk space in --out; rerun with --debug for llama.cpp's full log")


@contextlib.contextmanager
def _captured_stderr(passthrough: bool):
    """Send C-level stderr (llama.cpp prints per-tensor fallback warnings there) to a temp file."""
    if passthrough:
        yield list
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        lines: list[str] = []
        try:
            yield lambda: lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())
