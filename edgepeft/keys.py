"""Every name edgepeft writes into an artifact and reads back: GGUF metadata keys, record and sidecar files.

Writers and readers both import these (gguf-py's ``Keys`` style), so a reader can never look
for a key that no writer writes. Torch-free and import-free: bench, verify and runtimes on a
device read it.
"""

from __future__ import annotations

PREFIX = "edgepeft."


class EdgepeftKeys:
    """Our GGUF metadata keys, all under the ``edgepeft.`` prefix (written by export/gguf.py)."""

    VERSION = "edgepeft.version"
    MODE = "edgepeft.mode"  # base | merged | adapter
    BASE_FINGERPRINT = "edgepeft.base_fingerprint"  # sha256 over the ORIGINAL base weights
    BASE_SPEC = "edgepeft.base"
    QUANT = "edgepeft.quant"
    ADAPTER_NAME = "edgepeft.adapter.name"
    ADAPTER_SHA256 = "edgepeft.adapter.sha256"
    ADAPTER_SCALE_FOLDED = "edgepeft.adapter.scale_folded"  # true when per-module scales were folded into B
    ADAPTERS = "edgepeft.adapters"  # JSON list (merged files): name, sha256, ranks
    MERGE = "edgepeft.merge"  # JSON: target, auto choice and losses
    PRUNE = "edgepeft.prune"  # JSON: settings and report summary
    TRAIN = "edgepeft.train"  # JSON: task, data sha256, steps, final loss (from the training manifest)
    IMATRIX_SHA256 = "edgepeft.imatrix.sha256"  # sha256 of the importance-matrix file the quantizer was given
    IMATRIX_DATA_SHA256 = "edgepeft.imatrix.data_sha256"  # sha256 of its calibration data (comma-joined: several)
    IMATRIX_SOURCE = "edgepeft.imatrix.source"  # which data: "training run data (task:demo): ...", "--calib F", ...


def local(key: str) -> str:
    """``edgepeft.adapter.name`` -> ``adapter.name``: how readers that strip the prefix index their dict."""
    return key.removeprefix(PREFIX)


# --- files next to artifacts ----------------------------------------------------------------------
GGUF_RECORD = "gguf-export.json"  # export --format gguf: the result record, beside the .gguf files
ONNX_SIDECAR = "edgepeft-onnx.json"  # export --format onnx (and --target qnn-htp): inside the folder
MERGE_RECORD = "edgepeft-merge.json"  # a merged HF folder: target, auto choice, losses
SOURCE_RECORD = "edgepeft-source.json"  # an HF folder materialised from a .gguf base: where it came from
FINGERPRINT_MEMO = ".edgepeft-fingerprint.json"  # cached base fingerprint, keyed by file stamps
BUNDLE_MANIFEST = "manifest.json"  # a bundle's root: every file hashed; the only file trusted first
TRAIN_MANIFEST = "manifest.json"  # a training run dir: base fingerprint, data hash, summary
RUN_ADAPTER = "adapter"  # a training run dir's PEFT adapter folder (RUN_DIR/adapter)
TRAIN_RUN_STATE = "run.json"  # a training run dir: what a --resume must agree with
ADAPTER_SUFFIX_GGUF = ".lora.gguf"  # a separate-mode adapter GGUF
ADAPTER_SUFFIX_ONNX = ".onnx_adapter"  # an ONNX Runtime LoRA adapter
IMATRIX_SUFFIX = ".imatrix.gguf"  # export --format gguf: the importance matrix (llama.cpp's imatrix GGUF), beside the model

# --- the QNN HTP static-graph contract (export/qnn.py writes it, runtimes/ort.py drives it) ----------
QNN_PREFILL_GRAPH = "prefill_ctx.onnx"  # EPContext graph: QNN_PREFILL_LEN right-padded tokens in
QNN_DECODE_GRAPH = "decode_ctx.onnx"  # EPContext graph: one token, its position, a mask over the cache
QNN_PREFILL_LEN = 64
QNN_CACHE_LEN = 128
QNN_MASK_NEG = -100.0  # additive mask: exp(-100) is 0 in fp32, and it keeps the uint16 range of the scores usable
