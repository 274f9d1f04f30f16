"""Every GGUF export checks itself: llama.cpp vs PyTorch on fixed prompts.

The artifact is run in llama.cpp (llama-cpp-python, ``logits_all``) on token ids produced by
the Hugging Face tokenizer, and compared position by position with the fp32 PyTorch model
it came from: top-1 agreement and max-abs logit difference. Tokenization itself is checked
too (llama.cpp's tokenizer on the same text must give the same ids), since feeding ids
directly would otherwise hide a wrong embedded pre-tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepeft.keys import MERGE_RECORD

PROMPTS = (
    "The capital of France is Paris. The capital of Italy is Rome, and the capital of Spain is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Parse this order: Ana wants 3 small red lamps shipped to Oslo by Friday, order 12345.",
    "In 1969, Apollo 11 landed on the Moon; 600 million people watched the broadcast live on TV.",
)
# top-1 agreement a float export must reach to count as verified. bf16 keeps 8 mantissa bits:
# on near-tied logits (tiny random test models) it flips a few percent of top-1 picks.
FLOAT_MIN_TOP1 = {"f32": 0.99, "f16": 0.99, "bf16": 0.95}


def prompt_ids(tokenizer, prompts=PROMPTS) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def open_llama(path: Path, n_ctx: int = 256, lora_path: Path | None = None):
    import llama_cpp
    from llama_cpp import Llama

    from edgepeft.runtimes.llamacpp import quiet_logs

    quiet_logs(llama_cpp)  # llama.cpp logs a line per tensor for adapters; keep stderr to our one-liners
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                 n_threads=2, lora_path=str(lora_path) if lora_path else None)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    agree = total = 0
    max_abs = 0.0
    for r, g in zip(ref, got):
        assert r.shape == g.shape, (r.shape, g.shape)
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        total += r.shape[0]
        max_abs = max(max_abs, float(np.abs(r - g).max()))
    return {"positions": total, "top1_agreement": round(agree / total, 4), "max_abs_logit_diff": round(max_abs, 4)}


def reference_model(folder: Path, plans=(), target: str = "original"):
    """fp32 PyTorch model of ``folder`` with ``plans`` merged into ``target`` (the surgery's merge)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgepeft.export.merge import merged_state_dict
    from edgepeft.models import resolve_base

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if plans:
        sd = {k: v.float() for k, v in merged_state_dict(resolve_base(str(folder)), plans, target).items()}
        model.load_state_dict(sd, strict=False)
    return model.eval()


def tokenizer_check(llm, tokenizer, prompts=PROMPTS) -> float:
    same = 0
    for p in prompts:
        ours = llm.tokenize(p.encode(), add_bos=False, special=True)
        same += int(list(ours) == tokenizer(p, add_special_tokens=False)["input_ids"])
    return same / len(prompts)


def _verdict(stats: dict, quant: str) -> dict:
    stats["quant"] = quant
    if quant in FLOAT_MIN_TOP1:
        # logits only: tokenizer_agreement is reported beside it (see docs/gguf.md on pre-tokenizers)
        stats["passed"] = stats["top1_agreement"] >= FLOAT_MIN_TOP1[quant]
    return stats


def verify_merged(path: Path, folder: Path, plans, target: str, quant: str) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = prompt_ids(tok)
    plans = [] if (Path(folder) / MERGE_RECORD).is_file() else plans  # a merged folder already has them
    model = reference_model(Path(folder), plans, target)
    ref = [torch_logits(model, i) for i in ids]
    del model
    llm = open_llama(path)
    stats = compare(ref, [llama_logits(llm, i) for i in ids])
    stats["tokenizer_agreement"] = tokenizer_check(llm, tok)
    del llm
    return _verdict(stats, quant)


def verify_separate(base_path: Path, adapter_paths: list[Path], folder: Path, plans, quant: str) -> dict:
    """Base alone, then each adapter hot-swapped onto one loaded base, each vs its PyTorch reference."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = prompt_ids(tok)
    base_model = reference_model(Path(folder))
    refs = {"base": [torch_logits(base_model, i) for i in ids]}
    del base_model
    for plan in plans:
        m = reference_model(Path(folder), [plan])
        refs[plan.name] = [torch_logits(m, i) for i in ids]
        del m
    out = {}
    with LoraSwitcher(base_path, adapter_paths) as sw:
        sw.set(None)
        out["base"] = compare(refs["base"], [llama_logits(sw.llm, i) for i in ids])
        out["base"]["tokenizer_agreement"] = tokenizer_check(sw.llm, tok)
        _verdict(out["base"], quant)
        for plan, ap in zip(plans, adapter_paths):
            sw.set(ap)
            out[plan.name] = _verdict(compare(refs[plan.name], [llama_logits(sw.llm, i) for i in ids]), quant)
    return out


class LoraSwitcher:
    """One llama.cpp model + context; adapters loaded once and switched with llama_set_adapters_lora."""

    def __init__(self, base_path: Path, adapter_paths, n_ctx: int = 256):
        self.base_path, self.adapter_paths, self.n_ctx = Path(base_path), [Path(p) for p in adapter_paths], n_ctx

    def __enter__(self):
        import llama_cpp

        self.llm = open_llama(self.base_path, self.n_ctx)
        self.adapters = {}
        for p in self.adapter_paths:
            handle = llama_cpp.llama_adapter_lora_init(self.llm.model, str(p).encode())
            if not handle:
                from edgepeft.errors import IntegrityError
                from edgepeft.runtimes.llamacpp import last_error

                raise IntegrityError(f"llama.cpp refused adapter {p} ({last_error()})", "Re-export it against this base")
            self.adapters[p] = handle
        return self

    def set(self, adapter_path: Path | None, scale: float = 1.0) -> None:
        import ctypes

        import llama_cpp

        ctx = self.llm.ctx
        if adapter_path is None:
            rc = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapters[Path(adapter_path)])
            scales = (ctypes.c_float * 1)(scale)
            rc = llama_cpp.llama_set_adapters_lora(ctx, arr, 1, scales)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed ({rc})")

    def __exit__(self, *exc):
        import llama_cpp

        for h in self.adapters.values():
            llama_cpp.llama_adapter_lora_free(h)
        self.adapters.clear()
        self.llm.close()
        return False


def gguf_completion_loss(path: Path, tokenizer, pairs, max_len: int = 256) -> float:
    """Mean NLL per completion token in llama.cpp (edgepeft.calib.completion_nll)."""
    from edgepeft.calib import completion_nll

    llm = open_llama(path, n_ctx=max_len)
    try:
        return completion_nll(lambda ids: llama_logits(llm, ids), tokenizer, pairs, max_len)
    finally:
        llm.close()
