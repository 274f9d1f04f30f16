"""Tiny exported artifacts for the runtime/bench/remote tests, made by the real `edgepeft export`.

Session-scoped and cached per pytest run: one tiny Llama, two PEFT adapters with non-zero B,
a separate-mode GGUF (base + 2 adapter GGUFs) and a separate-mode ONNX folder (genai +
2 .onnx_adapter files).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lora_factory import make_lora


def make_peft(base_dir: Path, out: Path, seed: int, r: int = 4) -> Path:
    return make_lora(base_dir, out, seed=seed, r=r, targets=["q_proj", "v_proj", "down_proj"], b_std=0.5)


def export(fmt: str, base: Path, adapters: dict, out: Path, **kw) -> dict:
    from edgepeft.export import export as run
    from edgepeft.export.request import ExportRequest

    req = ExportRequest(format=fmt, base=str(base), adapters=[str(p) for p in adapters.values()],
                        names=list(adapters), out=out, verify=False, **kw)
    return run(req)


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory, tiny_llama) -> dict:
    root = tmp_path_factory.mktemp("bench-peft")
    return {"sql": make_peft(tiny_llama, root / "sql", 1), "chat": make_peft(tiny_llama, root / "chat", 2)}


@pytest.fixture(scope="session")
def gguf_sep(tmp_path_factory, tiny_llama, peft_adapters) -> Path:
    out = tmp_path_factory.mktemp("bench-gguf") / "sep"
    export("gguf", tiny_llama, peft_adapters, out, mode="separate", quant="f32", merge_into="original")
    return out


@pytest.fixture(scope="session")
def onnx_sep(tmp_path_factory, tiny_llama, peft_adapters) -> Path:
    out = tmp_path_factory.mktemp("bench-onnx") / "sep"
    export("onnx", tiny_llama, peft_adapters, out, mode="separate", quant="fp32")
    return out
