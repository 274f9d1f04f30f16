"""The one tolerance table: what "this artifact matches its PyTorch fp32 reference" means, per format and quant.

Metrics (see :mod:`edgepeft.export.verify`): ``tokenizer_agreement`` (the runtime's own
tokenizer gives the Hugging Face ids on every fixed prompt), ``top1_agreement`` (fixed prompts
+ held-out text), ``max_abs_logit_diff`` (fixed prompts; float types only: a lossy quant's
worst position says little) and ``ppl_ratio`` (held-out text; every type).

Each bound is derived from measurement (benchmarks/verify_bounds.py, results in
benchmarks/results/verify_bounds_*.json): the worst value that a legitimate export reached,
on the real smollm2-135m and on the tiny test models (tests/conftest.py), and what llama.cpp's
own pipeline (convert_hf_to_gguf.py + llama_model_quantize, from the vendored sdist) reaches on
the same smollm2-135m folder, with a margin; broken writers (tests/test_verify.py: wrong Q/K
permutation, LoRA scale, tokenizer, dropped bias) land far outside. The measured values are in
the comment beside each row. Issue 18 (task-aware quantization) raises the 4-bit bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgepeft.errors import EdgepeftError


@dataclass(frozen=True)
class Bounds:
    top1: float  # top1_agreement >= this
    ppl_ratio: float  # ppl_ratio <= this
    max_abs_logit: float | None = None  # max_abs_logit_diff <= this (float types)
    tokenizer: float = 1.0  # tokenizer_agreement >= this: every prompt tokenizes exactly as in transformers
    task_kept: float | None = None  # task_kept >= this, where the export has task data (verify._task_metrics)
    adapter_kept: float | None = 0.35  # adapter_kept >= this, where an adapter moves enough top-1 tokens (verify)

    def items(self):
        """(metric, op, bound) in report order."""
        yield "tokenizer_agreement", ">=", self.tokenizer
        yield "top1_agreement", ">=", self.top1
        if self.task_kept is not None:
            yield "task_kept", ">=", self.task_kept
        if self.adapter_kept is not None:
            yield "adapter_kept", ">=", self.adapter_kept
        if self.max_abs_logit is not None:
            yield "max_abs_logit_diff", "<=", self.max_abs_logit
        yield "ppl_ratio", "<=", self.ppl_ratio


# (format, quant) -> Bounds. format: gguf (llama.cpp), onnx (onnxruntime-genai / onnxruntime), qnn (QNN HTP)
# Measured by benchmarks/verify_bounds.py: "smol" = smollm2-135m (the fp32 base dequantized from its Q4_1 GGUF) alone;
# "tiny" = worst of the tiny llama test model alone, with a rsLoRA r=4 adapter (B ~ N(0, 0.3)) merged, and
# separate (the tiny qwen2 run of the script did not finish this session; its exports pass these bounds in the
# tests); "peer" = llama.cpp's own convert_hf_to_gguf.py (f32/f16/bf16/q8_0) + llama_model_quantize (from f32) on
# the same folder, which gave exactly our file's numbers at every type on both models. Values: top-1, max |Δlogit|,
# ppl ratio. Top-1 on the tiny models is the floor of the lossy rows: random 64-wide weights have near-tied logits,
# and their perplexity barely moves, so on them a lossy type is judged loosely and the writer defects are tested at
# f32/fp32 (tests/test_verify.py: wrong Q/K permutation top-1 0.51, max |Δlogit| 1.50 at f32 where 0.03 is normal).
# adapter_kept (verify._adapter_metrics; smol + the trained demo adapter, merged into the original base unless
# "separate", benchmarks session 10): f16 1.000, bf16 separate 1.000, q8_0 separate 0.982, onnx int8 0.965, q6_k
# 0.875; q4_k_m 0.796, separate 0.891; q3_k_m 0.755;
# q2_k 0.725; q4_0 0.619; onnx int4 0.658, separate 0.806; tiny llama + rsLoRA r=4 adapter q4_k_m and f32 1.0.
# An adapter the artifact lost: merged by a writer that drops it (tests/broken_writer.py adapter_lost) 0.093 at
# q4_k_m, where top-1 (0.87 bound 0.5) and ppl still passed; merged onto its base's own Q4_1 grid at q4_1 0.473
# (its task: 0 of 98 %; task_kept fails it). 40-60 positions decide (about +-0.05 to +-0.07), so each bound sits
# about 3 of those below the type's measured value: float 0.8, 8-bit 0.75, q6_k 0.65, lossier types 0.35.
TOLERANCES: dict[tuple[str, str], Bounds] = {
    # --- GGUF in llama.cpp (its f16 KV cache is why f32 is not exact)
    ("gguf", "f32"): Bounds(top1=0.98, ppl_ratio=1.005, max_abs_logit=0.25, task_kept=0.9, adapter_kept=0.8),  # smol 1.0/0.046/1.0001 = peer; tiny 0.992/0.026/1.0
    ("gguf", "f16"): Bounds(top1=0.97, ppl_ratio=1.01, max_abs_logit=0.5, task_kept=0.9, adapter_kept=0.8),  # smol 1.0/0.065/1.0005 = peer; tiny 0.992/0.050/1.0
    ("gguf", "bf16"): Bounds(top1=0.93, ppl_ratio=1.03, max_abs_logit=2.0, task_kept=0.9, adapter_kept=0.8),  # smol 0.996/0.41/0.999 = peer; tiny 0.971/0.17/1.003
    ("gguf", "q8_0"): Bounds(top1=0.85, ppl_ratio=1.05, task_kept=0.75, adapter_kept=0.75),  # smol 0.975/2.7/0.997 = peer; tiny 0.903/0.58/1.003
    ("gguf", "q6_k"): Bounds(top1=0.85, ppl_ratio=1.08, task_kept=0.75, adapter_kept=0.65),  # smol 0.958/5.0/1.000 = peer; tiny 0.903/0.58/1.003 (q8_0 fallback)
    # q5_k_m on this base is the known outlier (docs: Q5_1 fallback on 576-wide rows re-gridding the Q4_1 source)
    ("gguf", "q5_k_m"): Bounds(top1=0.55, ppl_ratio=1.35, task_kept=0.55),  # smol 0.840/9.1/1.190 = peer; tiny 0.618/3.2/1.008
    # q4_k_m ppl_ratio 1.30 -> 1.15 with issue 18's numbers: smol + trained demo adapter, merged, with the task's
    # importance matrix 0.891 top-1 / ppl 0.925, without 0.845 / 0.993 (benchmarks/results/imatrix.json); tiny
    # llama + adapter with/without the matrix 0.748 / 1.0025 and 0.727 / 1.0035; top-1 stays at the tiny floor
    ("gguf", "q4_k_m"): Bounds(top1=0.50, ppl_ratio=1.15, task_kept=0.55),  # smol 0.903/9.4/1.055 = peer; tiny 0.571/5.5/1.002
    ("gguf", "q4_0"): Bounds(top1=0.25, ppl_ratio=1.50, task_kept=0.55),  # smol 0.677/30/1.295 = peer; tiny 0.324/4.5/1.001
    # q4_1 re-lands a Q4_1 source's grid exactly (the default base's): smol 0.966/-/1.002, smol + r8 merged
    # 0.920/1.000 (with the bundled matrix 0.945/0.977); tiny llama 0.559/0.983, tiny qwen2 0.606/1.007
    ("gguf", "q4_1"): Bounds(top1=0.40, ppl_ratio=1.15, task_kept=0.55),
    # issue 18's types (importance matrix from the task's data; provisional until bench_imatrix measures smol)
    ("gguf", "iq4_xs"): Bounds(top1=0.25, ppl_ratio=1.50, task_kept=0.55),  # as q4_0 (its 576-wide rows fall back to IQ4_NL)
    ("gguf", "q3_k_m"): Bounds(top1=0.20, ppl_ratio=2.00, task_kept=0.25),
    ("gguf", "q2_k"): Bounds(top1=0.10, ppl_ratio=4.00, task_kept=0.25),
    ("gguf", "iq3_xxs"): Bounds(top1=0.10, ppl_ratio=4.00, task_kept=0.25),
    # --- ONNX (onnxruntime-genai builder, default k_quant_last) in onnxruntime-genai
    ("onnx", "fp32"): Bounds(top1=0.99, ppl_ratio=1.001, max_abs_logit=0.01, task_kept=0.9, adapter_kept=0.8),  # smol 1.0/0.0001/1.0; tiny 1.0/<1e-4/1.0
    ("onnx", "fp16"): Bounds(top1=0.97, ppl_ratio=1.01, max_abs_logit=0.5, task_kept=0.9, adapter_kept=0.8),  # cuda only: not measured here (as gguf f16)
    ("onnx", "int8"): Bounds(top1=0.85, ppl_ratio=1.05, task_kept=0.75, adapter_kept=0.75),  # smol 0.975/1.5/0.995; tiny 0.950/0.14/1.002
    # ppl 1.60 -> 1.85: merged with the quickstart's demo adapter (k_quant_last, --merge-into auto) the artifact
    # reaches 1.558 (EPYC, session 10) and 1.570 (Xeon, session 12), demo 90-96 % on 50 examples; 1.60 sat 2 % above
    ("onnx", "int4"): Bounds(top1=0.45, ppl_ratio=1.85, task_kept=0.55),  # smol 0.660/26.7/1.332; tiny 0.555/2.2/1.005
    # --- QNN HTP static graphs (uint8 weights, uint16 activations) in the HTP simulator
    ("qnn", "int8"): Bounds(top1=0.65, ppl_ratio=1.25),  # smol 0.786/-/1.084; tiny llama + r=4 adapter 0.903/-/0.997
}


# task_kept (the task check; benchmarks/bench_task_check.py, results/task_check.json): smollm2-135m with the trained
# demo and chat adapters, 8 of each run's own examples (verify.TASK_EXAMPLES), PyTorch right on all 8. Float and 8-bit
# types: 1.0 on every row. 4-bit: GGUF Q4_K_M separate 0.88-1.0, merged 0.88-1.0, IQ4_XS merged 0.62-0.88; ONNX int4
# k_quant_last 0.75-1.0. The one 4-bit export that lost the fine-tune, ONNX k_quant_mixed merged on the demo adapter
# (demo exact match 91 -> 53 % on 100 examples, every other check passed), gives 0.50 (0.50 on 16 examples too):
# the 4-bit bound 0.55 sits between. 3-bit: Q3_K_M merged 0.38-0.88 (chat 43-50 % on 100 examples); its bound only
# catches a task gone altogether. One example is 1/8: the bounds are coarse, on purpose. gemma3_text's rows have
# none yet (not measured).

# (format, quant, model_type) -> Bounds, where one architecture measured outside its row. The held-out ppl of a
# model fine-tuned hard on one task is far from its base's, and 4-bit noise moves it either way:
# gemma3_text, Gemma 3 270M + the quickstart's 48-step demo adapter (task loss 0.0003 after Q4_K_M), merged:
#   into the NF4-dequantized base: llama.cpp's own convert_hf_to_gguf.py + llama_model_quantize 0.734 top-1 /
#   ppl 1.648; ours with the task's importance matrix 0.817 / 1.278 (demo 100 % in PyTorch);
#   into the original base: peer = ours without the matrix 0.705 / 0.387; ours with it 0.805 / 0.554.
# ONNX int4 (the builder's own k_quant_last, which is our artifact) on the same adapter: merged into the dequantized
#   base ppl 2.128 (seeded training: the same in two runs); separate 0.701 / 1.459; g8's earlier adapter merged
#   0.639 / 0.50. Held-out ppl swings 0.39-2.13 across equally valid pipelines here, so on this model top-1 is the
#   check that discriminates and the ppl bound only catches gross breakage (broken writers land in the thousands).
# Float types on the same model: one position of one fixed prompt (the logits after "The capital of France is Paris") moves
# far more than the rest in llama.cpp, and a small adapter moves it more. Base alone / + the suite's 2-step q,v r8
# adapter (tests/test_gemma.py; top-1 1.000, ppl 0.999 both): f32 0.18 / 0.29, f16 0.21 / 0.68 (Xeon AMX, session 12),
# and llama.cpp's own convert_lora_to_gguf.py writes an adapter that gives exactly 0.678 on the f16 base: the file
# is the peer's, the arithmetic is llama.cpp's (f16 activations into F16 matmuls, the f16 KV cache). Elsewhere in
# the prompt 0.02-0.06. A wrong LoRA scale moves that position by several logits (the adapter alone moves it 2.2).
ARCH_TOLERANCES: dict[tuple[str, str, str], Bounds] = {
    ("gguf", "f32", "gemma3_text"): replace(TOLERANCES[("gguf", "f32")], max_abs_logit=0.6),
    ("gguf", "f16", "gemma3_text"): replace(TOLERANCES[("gguf", "f16")], max_abs_logit=1.5),
    ("gguf", "q4_k_m", "gemma3_text"): Bounds(top1=0.50, ppl_ratio=1.80),
    ("onnx", "int4", "gemma3_text"): Bounds(top1=0.45, ppl_ratio=2.50),
}


def bounds_for(fmt: str, quant: str | None, model_type: str | None = None) -> Bounds:
    """The row for ``fmt``/``quant``, or the architecture's own row where one was measured apart."""
    q = (quant or "").lower()
    b = ARCH_TOLERANCES.get((fmt, q, model_type or "")) or TOLERANCES.get((fmt, q))
    if b is None:
        known = ", ".join(f"{f}:{q}" for f, q in TOLERANCES)
        raise EdgepeftError(f"no tolerance is measured for {fmt} {quant or '(unknown quant)'}",
                            f"Verified types: {known}")
    return b
