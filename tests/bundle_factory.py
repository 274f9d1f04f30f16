"""Tiny synthetic GGUF bases and adapters (gguf-py GGUFWriter) for bundle tests.

They carry the ``edgepeft.*`` keys export/gguf.py writes (EdgepeftKeys: base_fingerprint,
mode, quant, adapter.name, adapter.sha256, prune), and the
LoRA tensor layout llama.cpp expects (lora_a ne=(in, r), lora_b ne=(r, out)), so pack and
verify see exactly what they see on real exports, in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgepeft.keys import EdgepeftKeys as K

FP_A = "a" * 64
FP_B = "b" * 64
HIDDEN, KV = 64, 32
# tensor -> numpy shape (out, in)
BASE_TENSORS = {"token_embd.weight": (32, HIDDEN), "output_norm.weight": (HIDDEN,)}
for _i in range(2):
    BASE_TENSORS[f"blk.{_i}.attn_q.weight"] = (HIDDEN, HIDDEN)
    BASE_TENSORS[f"blk.{_i}.attn_v.weight"] = (KV, HIDDEN)
# shapes of projections the base does NOT have (for "target not in base" cases)
OTHER_TENSORS = {f"blk.{i}.attn_k.weight": (KV, HIDDEN) for i in range(2)}


def write_base(path: Path, fingerprint: str = FP_A, arch: str = "llama", seed: int = 0, mode: str = "base") -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name("tiny-test")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_block_count(2)
    w.add_string(K.BASE_FINGERPRINT, fingerprint)
    w.add_string(K.MODE, mode)
    w.add_string(K.QUANT, "f32")
    for name, shape in BASE_TENSORS.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    _finish(w)
    return path


def write_adapter(path: Path, fingerprint: str = FP_A, rank: int = 4, name: str | None = None,
                  arch: str = "llama", b_rank: int | None = None, out_dim: int | None = None,
                  targets=("attn_q", "attn_v"), seed: int = 1, extra: dict | None = None) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    w.add_string(K.BASE_FINGERPRINT, fingerprint)
    w.add_string(K.MODE, "adapter")
    w.add_string(K.QUANT, "f32")
    w.add_string(K.ADAPTER_NAME, name or Path(path).stem)
    w.add_string(K.ADAPTER_SHA256, "c" * 64)
    w.add_string(K.PRUNE, json.dumps({"energy": 0.99}))
    w.add_string(K.TRAIN, json.dumps({"task": "demo-sort", "data_sha256": "d" * 64}))
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    for i in range(2):
        for t in targets:
            out, inp = {**BASE_TENSORS, **OTHER_TENSORS}[f"blk.{i}.{t}.weight"]
            w.add_tensor(f"blk.{i}.{t}.weight.lora_a", rng.standard_normal((rank, inp)).astype(np.float32))
            w.add_tensor(f"blk.{i}.{t}.weight.lora_b",
                         rng.standard_normal((out_dim or out, b_rank or rank)).astype(np.float32))
    _finish(w)
    return path


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_set(d: Path) -> dict[str, Path]:
    """A base and two adapters (ranks 4 and 8) that fit it."""
    d.mkdir(parents=True, exist_ok=True)
    return {"base": write_base(d / "base.gguf"),
            "a": write_adapter(d / "alpha.gguf", rank=4, name="alpha"),
            "b": write_adapter(d / "beta.gguf", rank=8, name="beta", seed=2)}
