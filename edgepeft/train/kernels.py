"""Which bitsandbytes kernel computes the NF4 4-bit base on a CPU: one deliberate choice.

bitsandbytes 0.50 has two CPU paths for a ``Linear4bit`` forward:

- ``dequantize-fp32``: its ``dequantize_4bit`` kernel turns the NF4 blocks back into fp32 weights,
  then torch multiplies in fp32 (``MatMul4Bit`` while training, the default ``gemm_4bit`` otherwise).
  This is the only path bitsandbytes uses for training, on every CPU.
- ``fused-bf16``: on CPUs whose native library reports AVX-512 BF16 (``has_avx512bf16``), every
  *inference* forward (``eval()`` and no grad) first repacks the weight in place for its fused
  ``gemv_4bit`` kernel (absmax rounded to bf16, double quantization dropped), then computes in bf16
  "whatever the compute dtype" (its own comment: "cpu fused op only support bf16 for now").

edgepeft pins ``dequantize-fp32`` on every CPU (:func:`pin_cpu_4bit_path`). The reasons, measured in
``benchmarks/bench_cpu_4bit.py`` (``benchmarks/results/cpu_4bit.json``):

1. Training never runs the fused path, so ``dequantize-fp32`` is *the* weights the adapter was trained
   against (the loss curves with and without the pin are identical). With it, a QLoRA model in eval
   mode and the ``--merge-into dequantized`` merge (``export/merge.nf4_round_trip``) agree to 1.1e-4
   in logits on smollm2-135m with the trained demo adapter (2.4e-6 on the tiny test model). With the
   fused path they differ by up to 0.66 (mean 0.072, top-1 97.6 %), and only on some CPUs.
2. bf16 compute is what made CPU QLoRA diverge once (loss 2.8 -> 4.7), with the fused path in play; on the
   pinned path it converges (12 steps within 0.012 of fp32, 95/100 demo after 48 steps:
   ``benchmarks/results/train_profile.json``), but fp32 compute stays the CPU default (trainer.pick_recipe).
3. The in-place repack is lossy (bf16 absmax): after one eval forward the module no longer holds
   the weights it was trained with.

The fused kernel made one prefill forward 1.5x faster but batched greedy generation 3.9x slower
(31.4 s vs 8.0 s for 10 demo examples), and edgepeft never decodes with the 4-bit PyTorch model
anyway: ``eval`` and every reference use the fp32 base plus the adapter, and deployment is
GGUF/ONNX. So nothing is given up. On CUDA, bitsandbytes' kernels honour the compute dtype and
nothing here applies.
"""

from __future__ import annotations

from pathlib import Path

CPU_4BIT_PATH = "dequantize-fp32"
FUSED_PATH = "fused-bf16"
# /proc/cpuinfo flags that change which CPU kernels torch and bitsandbytes pick.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, bool]:
    """The kernel-relevant CPU flags of this machine (all False where /proc/cpuinfo is absent)."""
    flags: set[str] = set()
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    break
    except OSError:
        pass
    return {name: name in flags for name in CPU_FLAGS}


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """This machine's CPU model name (``lscpu``'s "Model name"), for benchmark records; the platform's
    processor string where /proc/cpuinfo is absent."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def bnb_default_cpu_path() -> str:
    """The path bitsandbytes itself would take for CPU inference here (before edgepeft pins it)."""
    from bitsandbytes.functional import has_avx512bf16

    return FUSED_PATH if has_avx512bf16() else CPU_4BIT_PATH


def pin_cpu_4bit_path(model) -> int:
    """Make every bitsandbytes ``Linear4bit`` in ``model`` use ``dequantize-fp32`` on the CPU.

    Returns the number of 4-bit modules pinned. ``support_avx512bf16_for_cpu`` is the attribute
    ``Linear4bit.forward`` reads before repacking for the fused kernel; with it False the forward
    goes through ``matmul_4bit``'s dequantize path in training and in inference alike.
    """
    from bitsandbytes.nn import Linear4bit

    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def kernel_record(device: str, bits: int) -> dict:
    """What the run manifest records about the kernels that trained the adapter."""
    rec: dict = {"cpu_flags": cpu_flags()}
    if bits == 4 and device == "cpu":
        rec["cpu_4bit_path"] = CPU_4BIT_PATH
        rec["bitsandbytes_cpu_default"] = bnb_default_cpu_path()
    return rec


def repacked_for_fused_kernel(model) -> bool:
    """Did any 4-bit module take the fused path (bitsandbytes repacks the weight in place before it)?"""
    from bitsandbytes.nn import Linear4bit

    return any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in model.modules() if isinstance(m, Linear4bit) and m.weight.quant_state is not None)
