"""ExportRequest: the typed, self-validating config behind ``edgepeft export``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgepeft.errors import ConfigError
from edgepeft.export import WRITERS
from edgepeft.export.quantize import QUANTS

GGUF_QUANTS = tuple(QUANTS)  # llama.cpp file types, export/quantize.py
ONNX_QUANTS = ("int4", "int8", "fp16", "fp32")
FORMATS = tuple(WRITERS)
MODES = ("merged", "separate")
MERGE_INTO = ("auto", "dequantized", "original")
ONNX_TARGETS = ("cpu", "cuda", "qnn-htp")
# onnxruntime-genai builder's weight-only algorithms ("algo_config"); *_last keeps the output
# projection (lm_head) at int8. Measured on the trained demo adapter (PyTorch 100/100): RTN block 32
# 80/100, rtn_last 82/100, k_quant_last 100/100, so k-quant's scale search on the body is what
# keeps a fine-tune's answers at int4 (docs/onnx.md has the full table).
# gptq_last / gptq: GPTQ on calibration data (edgepeft.calib.select_calibration; export/onnx_calib.py, export/gptq.py),
# int4 only; gptq_mixed also keeps Q4_K_M's more-bits MatMuls (attn_v, ffn_down of some layers) at int8.
# auto (the default): export/onnx.py:resolve_quant_algo picks one of them per export.
ONNX_QUANT_ALGOS = ("auto", "k_quant_last", "rtn_last", "k_quant", "rtn", "k_quant_mixed", "default", "gptq_last",
                    "gptq", "gptq_mixed", "source_grid")


@dataclass
class ExportRequest:
    format: str
    base: str
    adapters: list[Path]
    out: Path
    mode: str = "merged"
    quant: str | None = None  # default per format: q4_k_m / int4
    adapter_type: str = "f16"  # GGUF adapter tensor type: f16 | q8_0
    prune: str | None = None  # e.g. "auto", "energy=0.99", "rank=8", "size=2MB", "drop=1e-4", "modules=q_proj+v_proj"
    merge_into: str = "auto"
    calib: Path | None = None
    imatrix: str = "auto"  # GGUF block types: auto (from the adapter's data, --calib or the bundled slice) | none | FILE
    keep_delta: str | None = None  # GGUF: byte budget ("4MB") to keep the most-changed adapter weights at q8_0
    names: list[str] = field(default_factory=list)  # --name per adapter
    force: bool = False  # override the fingerprint check only (never shapes)
    allow_pickle: bool = False
    verify: bool = True  # run the artifact against the PyTorch reference after writing
    # ONNX
    block_size: int = 32
    accuracy_level: int = 4
    quant_algo: str = "auto"
    target: str = "cpu"
    device: str | None = None
    static_shapes: bool = True

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError("--format", self.format, ", ".join(FORMATS))
        if self.mode not in MODES:
            raise ConfigError("--mode", self.mode, ", ".join(MODES))
        if self.merge_into not in MERGE_INTO:
            raise ConfigError("--merge-into", self.merge_into, ", ".join(MERGE_INTO))
        quants = GGUF_QUANTS if self.format == "gguf" else ONNX_QUANTS
        if self.quant is None:
            self.quant = "q4_k_m" if self.format == "gguf" else "int4"
        self.quant = self.quant.lower()
        if self.quant not in quants:
            raise ConfigError("--quant", self.quant, f"for --format {self.format}: {', '.join(quants)}")
        if self.adapter_type not in ("f16", "q8_0", "f32"):
            raise ConfigError("--adapter-type", self.adapter_type, "f16, q8_0, f32")
        if self.target not in ONNX_TARGETS:
            raise ConfigError("--target", self.target, ", ".join(ONNX_TARGETS))
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ConfigError("--block-size", self.block_size, "16, 32, 64, 128, 256")
        if self.quant_algo not in ONNX_QUANT_ALGOS:
            raise ConfigError("--quant-algo", self.quant_algo, ", ".join(ONNX_QUANT_ALGOS))
        if self.quant_algo.startswith("gptq") and self.format == "onnx" and self.quant != "int4":
            raise ConfigError("--quant-algo", self.quant_algo, "gptq* with --quant int4 only")
        if self.quant_algo == "source_grid" and self.format == "onnx" and (
                self.quant != "int4" or self.mode != "separate" or self.block_size != 32):
            raise ConfigError("--quant-algo", self.quant_algo,
                              "source_grid with --quant int4 --mode separate --block-size 32 (a merged model's "
                              "weights are off the source grid)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError("--accuracy-level", self.accuracy_level, "0-4")
        if self.imatrix not in ("auto", "none") and not str(self.imatrix).endswith(".gguf"):
            raise ConfigError("--imatrix", self.imatrix, "auto, none, or an imatrix .gguf file")
        if self.keep_delta is not None:
            from edgepeft.export.overrides import parse_budget

            parse_budget(self.keep_delta)  # refuses a bad size now, before any model loads
        if self.names and len(self.names) != len(self.adapters):
            raise ConfigError("--name", self.names, f"one --name per --adapter ({len(self.adapters)} given)")
        from edgepeft.readers import NAME_RULE, is_name

        for n in self.names:
            if not is_name(n):
                raise ConfigError("--name", n, NAME_RULE)
        if self.mode == "separate" and not self.adapters:
            raise ConfigError("--mode", self.mode, "separate needs at least one --adapter")
        if self.prune:  # a bad --prune stops here, before any model loads
            from edgepeft.export.prune import PruneSpec
            from edgepeft.export.prune_auto import AutoSpec, is_auto

            AutoSpec.parse(self.prune) if is_auto(self.prune) else PruneSpec.parse(self.prune)
        self.out = Path(self.out)
        self.adapters = [Path(a) for a in self.adapters]
