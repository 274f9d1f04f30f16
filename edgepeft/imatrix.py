"""Importance matrix from the task's own data: collect (PyTorch), write and read (llama.cpp's imatrix GGUF).

For every linear weight inside the transformer blocks, the matrix holds the mean of x_j² per input
column j over every calibration token, where x is that linear's input in the model that will be
quantized: the merged model for ``--mode merged``; the base with each adapter active for ``--mode
separate`` (ΔW = s·B·A added to the weights, so the base is weighted where the adapter uses it; with
several adapters the sums and token counts of each pass add up). llama.cpp's quantizer takes these
means as per-column weights of its rounding error (``llama_model_quantize_params.imatrix``).

Why collected in PyTorch and not in llama.cpp: llama.cpp's collector is the ``llama-imatrix`` binary
(not in the llama-cpp-python wheel) or an eval callback that would copy every matmul input of every
micro-batch from C into Python through ctypes; and for separate mode it would have to run the base
with a LoRA GGUF that does not exist yet. The verifier's reference (export/reference.py) already reads
the fp32 weights layer by layer and applies the adapters exactly, so its streamed forward, in a child
process, with a forward pre-hook on each ``nn.Linear``, gives the input directly, with no extra file, no
second runtime and no whole fp32 model in memory. It matches llama-imatrix's defaults:
``blk.*`` matmuls only (``output.weight`` is skipped unless asked, as without ``--process-output``).

The file is llama.cpp's imatrix GGUF (tools/imatrix, read by common/imatrix-loader): ``general.type =
imatrix``, ``imatrix.datasets`` / ``imatrix.chunk_count`` / ``imatrix.chunk_size``, and per weight
``<gguf name>.in_sum2`` (F32, the raw sums, ne = (n_in, 1)) and ``<gguf name>.counts`` (F32, tokens,
ne = (1, 1)), names sorted, so ``llama-quantize --imatrix FILE`` reuses it unchanged. Names are the
GGUF tensor names of the artifact (``blk.0.attn_q.weight``); Q/K row permutations do not touch input
columns, so the HF order of x is the GGUF order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgepeft.errors import EdgepeftError, IntegrityError

if TYPE_CHECKING:
    import numpy as np

SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"
MAX_TOKENS = 256  # per calibration text: the chunk size the file records
BATCH_POSITIONS = 2048  # padded positions per collection forward (activations: 2048 x the widest linear, fp32)
# calibration texts per matrix (per adapter in separate mode). The cost is one fp32 forward per token;
# on smollm2-135m + the demo adapter, Q4_K_M merged, the verifier's top-1 / ppl ratio from 8, 16, 32 and
# 64 texts were 0.887/0.925, 0.861/0.937, 0.870/0.922, 0.870/0.926 (none: 0.845/0.993), so 32
# (benchmarks/bench_imatrix_cost.py, results/imatrix_cost.json)
TEXTS = 32
# calibration positions per pass: the texts in sampled order until this many (one collection batch). The cost
# is the forward; wikitext's 32 x 256-token texts made the matrix 15 s of a 9 s export on smollm2-135m (fp32,
# idle), where 8 demo texts (~600 tokens) already gave the best verifier values of the sweep above
TOKENS = BATCH_POSITIONS


@dataclass
class ImportanceMatrix:
    """Raw sums of x_j² and token counts per GGUF weight name (llama.cpp's in-file form)."""

    sums: dict[str, np.ndarray]  # name -> (n_in,) float64
    counts: dict[str, int]
    datasets: list[str] = field(default_factory=list)
    chunk_size: int = MAX_TOKENS
    chunk_count: int = 0
    meta: dict = field(default_factory=dict)  # edgepeft.* keys the file carries (calibration source, hash)
    compute: str | None = None  # how the collection forward multiplied (``fp32`` / ``bf16 autocast``), when collected

    def means(self) -> dict[str, np.ndarray]:
        """name -> float32 mean of x_j² per column: what ``llama_model_quantize`` takes (as llama-quantize's
        load_imatrix: sums / count, and 1 for every column of an entry that counted no token)."""
        import numpy as np

        return {k: (v / self.counts[k] if self.counts[k] > 0 else np.ones_like(v)).astype(np.float32)
                for k, v in self.sums.items()}


# ------------------------------------------------------------------ collect

def _linears(base) -> list:
    """The TensorOut of every 2-D ``blk.*`` weight of ``base`` (a ResolvedBase), from the safetensors headers."""
    import gguf

    from edgepeft.export import gguf_tensors as gt

    outs = gt.base_tensor_plan(base, base.arch, gguf.GGMLQuantizationType.F32)
    return [o for o in outs
            if o.gguf_name.startswith("blk.") and len(o.shape) == 2 and o.hf_name.endswith(".weight")]


def linear_names(base) -> dict[str, str]:
    """HF module path -> GGUF weight name, for every 2-D ``blk.*`` weight of ``base`` (a ResolvedBase)."""
    return {o.hf_name.removesuffix(".weight"): o.gguf_name for o in _linears(base)}


def check_matches(matrix: ImportanceMatrix, base, path: Path, required: bool = False) -> ImportanceMatrix:
    """``matrix`` (read from ``path``) if it is one of ``base``'s weights: every entry names a ``blk.*`` weight
    with that many input columns (``required``: and every such weight has one). Else one line: a matrix of
    another model would reach llama.cpp's quantizer as a size error or, for a missing name, silently none."""
    columns = {o.gguf_name: int(o.shape[-1]) for o in _linears(base)}
    fix = "Pass the imatrix .gguf written for this base (beside its GGUF export), or --imatrix auto"
    for name in sorted(matrix.sums):
        if name not in columns:
            raise IntegrityError(f"--imatrix {path} has an entry {name}, which {base.path.name} has no weight of "
                                 "(a matrix of another model)", fix)
        if matrix.sums[name].shape[0] != columns[name]:
            raise IntegrityError(f"--imatrix {path} has {matrix.sums[name].shape[0]} columns for {name}, but "
                                 f"{base.path.name}'s weight has {columns[name]} (a matrix of another model)", fix)
    missing = sorted(set(columns) - set(matrix.sums))
    if required and missing:
        raise IntegrityError(f"--imatrix {path} has no entry for {missing[0]} ({len(missing)} of {len(columns)} "
                             "weights missing), and this quant type needs one for every weight", fix)
    return matrix


def within_budget(token_lists: Sequence[Sequence[int]], budget: int = TOKENS) -> list[list[int]]:
    """The first texts whose tokens fit ``budget`` (always at least one, cut to it)."""
    out, used = [], 0
    for ids in token_lists:
        if out and used + len(ids) > budget:
            break
        out.append(list(ids)[:budget])
        used += len(out[-1])
    return out


def use_bf16() -> bool:
    """bf16 autocast for the collection forward where the CPU multiplies bf16 natively (AVX-512 BF16 or
    AMX). Measured on a 2-core EPYC with avx512_bf16, smollm2-135m, 6481 tokens: 8.9 s vs 15.7 s fp32, and
    the sums within 0.2 % (median 0.18 %) of fp32's, far inside what changes a quantizer's rounding. Without
    those instructions bf16 is emulated and slower, so fp32. ``EDGEPEFT_IMATRIX_FP32=1`` forces fp32."""
    import os

    from edgepeft.train.kernels import cpu_flags

    if os.environ.get("EDGEPEFT_IMATRIX_FP32") == "1":
        return False
    flags = cpu_flags()
    return flags["avx512_bf16"] or flags["amx_bf16"]


def calibration_tokens(tokenizer, pairs) -> list[list[int]]:
    """Token ids of each (rendered prompt, completion), as the runtimes tokenize rendered text."""
    return [list(tokenizer(p + c, add_special_tokens=False)["input_ids"])[:MAX_TOKENS] for p, c in pairs]


def matrix_request(base, variants: Sequence[tuple[Sequence, object, str]], tokenizer) -> dict:
    """What the collection child needs for the matrix of the model that will be quantized.

    ``base`` is the folder whose weights get quantized (a ResolvedBase); ``variants`` is one
    (plans, calibration, merge_target) per forward pass: the plans' ΔW are added to the weights
    (merge_target ``dequantized`` first rounds NF4-trained weights as training saw them) and the
    calibration's texts run through. Merged mode passes one variant with every plan; separate mode
    one variant per adapter. ``tokenizer``: the one the calibration was rendered with."""
    passes = [(list(plans), within_budget(calibration_tokens(tokenizer, calibration.pairs)), target)
              for plans, calibration, target in variants]
    return {"base": base, "passes": passes, "names": linear_names(base), "budget": BATCH_POSITIONS,
            "bf16": use_bf16()}


def collect_for_export(request: dict, dataset: str, job=None) -> ImportanceMatrix:
    """The matrix of :func:`matrix_request`, from ``job`` (the verifier's reference child, started with it:
    ``Reference.prefetch(imatrix=...)``) or from a child of its own.

    The forward is the verifier's reference (``export.reference.importance_sums``): one fp32 decoder layer
    resident, not the whole model (smollm2-135m: peak 1.7 GB in-process before).
    """
    import numpy as np

    from edgepeft.export.verify import _Job
    from edgepeft.ui import stage

    n_texts = sum(len(t) for _, t, _ in request["passes"])
    n_tokens = sum(len(x) for _, t, _ in request["passes"] for x in t)
    with stage(f"importance matrix in PyTorch ({n_texts} calibration texts, {n_tokens} tokens"
               f"{', bf16 matmuls' if request['bf16'] else ''})"):
        sums, counts = (job or _Job(None, [], False, imatrix=request)).matrix()
    matrix = ImportanceMatrix(sums, counts, datasets=[dataset], chunk_count=n_texts,
                              compute="bf16 autocast" if request["bf16"] else "fp32")
    bad = next((k for k, v in matrix.sums.items() if not np.isfinite(v).all()), None)
    if bad is not None:
        raise EdgepeftError(f"the importance matrix of {bad} is not finite (the model overflows on the calibration "
                            "data)", "Pass other --calib data, or --imatrix none")
    return matrix


# ------------------------------------------------------------------ write / read

def write(matrix: ImportanceMatrix, path: Path) -> Path:
    """llama.cpp's imatrix GGUF at ``path`` (atomically), plus ``edgepeft.*`` keys from ``matrix.meta``."""
    import gguf
    import numpy as np

    from edgepeft import atomic

    with atomic.atomic_path(Path(path)) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="llama", use_temp_file=False)  # arch: the writer's required key
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(KV_DATASETS, list(matrix.datasets) or ["edgepeft"])
        w.add_uint32(KV_CHUNK_COUNT, int(matrix.chunk_count))
        w.add_uint32(KV_CHUNK_SIZE, int(matrix.chunk_size))
        for k, v in matrix.meta.items():
            w.add_string(k, v if isinstance(v, str) else json.dumps(v))
        for name in sorted(matrix.sums):
            w.add_tensor(name + SUM_SUFFIX, np.asarray(matrix.sums[name], dtype=np.float32).reshape(1, -1))
            w.add_tensor(name + COUNT_SUFFIX, np.array([[float(matrix.counts[name])]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(path)


def read(path: Path) -> ImportanceMatrix:
    """An imatrix GGUF (ours or llama-imatrix's). Refuses anything else with one line."""
    import gguf
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise EdgepeftError(f"--imatrix {path} does not exist", "Pass an imatrix .gguf file, auto, or none")
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError/struct errors on a bad file
        raise IntegrityError(f"--imatrix {path} is not a GGUF file ({type(e).__name__})",
                             "Pass an imatrix .gguf written by edgepeft or llama-imatrix") from e

    def field_value(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    if field_value("general.type") != gguf.GGUFType.IMATRIX:
        raise IntegrityError(f"--imatrix {path} has general.type {field_value('general.type')!r}, not 'imatrix'",
                             "Pass an imatrix .gguf written by edgepeft or llama-imatrix")
    sums, counts = {}, {}
    for t in r.tensors:
        if t.name.endswith(SUM_SUFFIX):
            sums[t.name.removesuffix(SUM_SUFFIX)] = np.asarray(t.data, dtype=np.float64).reshape(-1)
        elif t.name.endswith(COUNT_SUFFIX):
            counts[t.name.removesuffix(COUNT_SUFFIX)] = round(float(np.asarray(t.data).reshape(-1)[0]))
    if not sums or set(sums) != set(counts):
        raise IntegrityError(f"--imatrix {path} has {len(sums)} sums and {len(counts)} counts that do not pair up",
                             "Pass an imatrix .gguf written by edgepeft or llama-imatrix")
    meta = {k: field_value(k) for k in r.fields if k.startswith("edgepeft.")}
    return ImportanceMatrix(sums, counts, list(field_value(KV_DATASETS) or []), int(field_value(KV_CHUNK_SIZE) or 0),
                            int(field_value(KV_CHUNK_COUNT) or 0), meta)
