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
with a LoRA GGUF that does not exist yet. The export already reads the fp32 weights and applies the
adapters exactly as the PyTorch reference does, so a forward pre-hook on each ``nn.Linear`` gives the
fp32 input directly, with no extra file and no second runtime. It matches llama-imatrix's defaults:
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
from collections.abc import Callable, Sequence
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


@dataclass
class ImportanceMatrix:
    """Raw sums of x_j² and token counts per GGUF weight name (llama.cpp's in-file form)."""

    sums: dict[str, np.ndarray]  # name -> (n_in,) float64
    counts: dict[str, int]
    datasets: list[str] = field(default_factory=list)
    chunk_size: int = MAX_TOKENS
    chunk_count: int = 0
    meta: dict = field(default_factory=dict)  # edgepeft.* keys the file carries (calibration source, hash)

    def means(self) -> dict[str, np.ndarray]:
        """name -> float32 mean of x_j² per column: what ``llama_model_quantize`` takes (as llama-quantize's
        load_imatrix: sums / count, and 1 for every column of an entry that counted no token)."""
        import numpy as np

        return {k: (v / self.counts[k] if self.counts[k] > 0 else np.ones_like(v)).astype(np.float32)
                for k, v in self.sums.items()}

    def add(self, other: ImportanceMatrix) -> None:
        for k, v in other.sums.items():
            if k in self.sums:
                self.sums[k] = self.sums[k] + v
                self.counts[k] += other.counts[k]
            else:
                self.sums[k], self.counts[k] = v.copy(), other.counts[k]
        self.datasets += [d for d in other.datasets if d not in self.datasets]
        self.chunk_count += other.chunk_count


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


def collect(model, names: dict[str, str], token_lists: Sequence[Sequence[int]], budget: int = BATCH_POSITIONS,
            threads: Callable[[], int] | None = None) -> ImportanceMatrix:
    """Run ``token_lists`` through ``model`` (a transformers causal LM) and sum x_j² at each named linear.

    Texts run in right-padded batches (``export.reference.pad_batches``) with an attention mask: under the
    causal mask a real position never sees the padding after it, and rotary positions start at 0 as alone, so
    every real position's input is the unbatched one; padded positions are dropped before the sum and
    the count. Sums are float32 within a batch (at most ``budget`` rows) and float64 across batches.
    ``threads()``, when given, is the torch thread count for the next batch (the export passes the idle
    cores: on a saturated machine a second thread made each forward several times slower).
    """
    import numpy as np
    import torch

    from edgepeft.export.reference import pad_batches

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise EdgepeftError(f"the model has no module {missing[0]} for the importance matrix",
                            "This checkpoint layout is not supported for --imatrix; pass --imatrix none")
    real: list = [None]  # the current batch's flat indices of real (unpadded) positions; None: all real

    def hook(gname: str):
        def pre(_mod, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if real[0] is not None:
                x = x.index_select(0, real[0])
            s = torch.square(x.float()).sum(0).double()
            sums[gname] = sums[gname] + s if gname in sums else s
            counts[gname] = counts.get(gname, 0) + x.shape[0]
        return pre

    seqs = [list(ids)[:MAX_TOKENS] for ids in token_lists]
    seqs = [s for s in seqs if s]
    handles = [modules[h].register_forward_pre_hook(hook(g)) for h, g in names.items()]
    try:
        with torch.no_grad():
            for group in pad_batches([len(s) for s in seqs], budget):
                if threads is not None:
                    torch.set_num_threads(max(1, threads()))
                width = len(seqs[group[0]])
                ids = torch.zeros((len(group), width), dtype=torch.long)
                mask = torch.zeros((len(group), width), dtype=torch.long)
                for row, i in enumerate(group):
                    ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
                    mask[row, :len(seqs[i])] = 1
                flat = mask.reshape(-1).bool()
                real[0] = None if bool(flat.all()) else flat.nonzero().reshape(-1)
                # no hooked weight is the lm_head: its logits for one position, not all (Gemma 3's
                # 262k vocab makes it 60% of a 64-token fp32 forward, benchmarks/bench_gemma_vocab.py)
                model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    matrix = ImportanceMatrix({k: v.numpy() for k, v in sums.items()}, counts, chunk_count=len(token_lists))
    bad = next((k for k, v in matrix.sums.items() if not np.isfinite(v).all()), None)
    if bad is not None:
        raise EdgepeftError(f"the importance matrix of {bad} is not finite (the model overflows on the calibration "
                            "data)", "Pass other --calib data, or --imatrix none")
    return matrix


def calibration_tokens(tokenizer, pairs) -> list[list[int]]:
    """Token ids of each (rendered prompt, completion), as the runtimes tokenize rendered text."""
    return [list(tokenizer(p + c, add_special_tokens=False)["input_ids"])[:MAX_TOKENS] for p, c in pairs]


def collect_for_export(base, variants: Sequence[tuple[Sequence, object, str]], dataset: str,
                       tokenizer=None) -> ImportanceMatrix:
    """The matrix of the model that will be quantized.

    ``base`` is the folder whose weights get quantized (a ResolvedBase); ``variants`` is one
    (plans, calibration, merge_target) per forward pass: the plans' ΔW are added to the weights
    (merge_target ``dequantized`` first rounds NF4-trained weights as training saw them) and the
    calibration's texts run through. Merged mode passes one variant with every plan; separate mode
    one variant per adapter. ``tokenizer``: the one the calibration was rendered with, when already loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from edgepeft.export.merge import merged_in_place
    from edgepeft.export.verify import free_cores
    from edgepeft.ui import stage

    names = linear_names(base)
    tok = tokenizer if tokenizer is not None else base.load_tokenizer()
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # stderr carries edgepeft's own lines only
    try:
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
    finally:
        if was:
            hf_logging.enable_progress_bar()
    full = torch.get_num_threads()
    total = ImportanceMatrix({}, {}, datasets=[dataset])
    n_texts = sum(len(c.pairs) for _, c, _ in variants)
    with stage(f"importance matrix in PyTorch ({n_texts} calibration texts)"):
        for plans, calibration, target in variants:
            with merged_in_place(model, plans, target):
                try:
                    total.add(collect(model, names, calibration_tokens(tok, calibration.pairs),
                                      threads=lambda: min(full, free_cores())))
                finally:
                    torch.set_num_threads(full)
    del model
    return total


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
