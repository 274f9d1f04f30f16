"""Seeded mutation fuzzing of every parser that reads files other people produce.

Each parser gets a fixed number of mutants of a valid file from a fixed seed (byte flips,
truncations, insertions, 8-byte fields set to extreme values). The only exception any of
them may raise is :class:`EdgepeftError` (what the CLI turns into one line and exit 2);
anything else (IndexError, struct.error, KeyError, RecursionError, MemoryError, ...) is a bug.
In-process on the parser functions, so the whole file runs in seconds. Plus two I/O cases a
mutant cannot express: a file that shrinks while it is read, and a bundle file swapped after
its hash was checked.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_set, write_adapter, write_base

from edgepeft import bundle as B
from edgepeft.errors import EdgepeftError

SEED = 1616
EXTREMES = [0, 1, 0xFF, 0xFFFF_FFFF, 1 << 31, 1 << 63, (1 << 64) - 1, 1 << 40]


def mutants(data: bytes, n: int, seed: int = SEED):
    rng = random.Random(seed)
    for _ in range(n):
        d = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.45 and d:
                i = rng.randrange(len(d))
                d[i] = rng.randrange(256)
            elif op < 0.6:
                del d[rng.randrange(len(d) + 1):]
            elif op < 0.75 and len(d) > 8:
                i = rng.randrange(len(d) - 8)
                d[i:i + 8] = struct.pack("<Q", rng.choice(EXTREMES))
            elif op < 0.9:
                i = rng.randrange(len(d) + 1)
                d[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            elif len(d) > 2:
                i, j = sorted(rng.sample(range(len(d)), 2))
                d[i:j] = d[i:j][::-1]
        yield bytes(d)


def fuzz(tmp: Path, name: str, data: bytes, n: int, parse) -> int:
    """Run ``parse(path)`` on every mutant; return how many were refused (the rest parsed)."""
    refused = 0
    path = tmp / name
    for i, m in enumerate(mutants(data, n)):
        path.write_bytes(m)
        try:
            parse(path)
        except EdgepeftError:
            refused += 1
        except Exception as e:
            raise AssertionError(f"mutant {i} of {name}: {type(e).__name__}: {e}") from e
    return refused


def test_fuzz_gguf_header(tmp_path):
    from edgepeft.fit import read_gguf

    for src in (write_base(tmp_path / "b.gguf"), write_adapter(tmp_path / "a.gguf")):
        refused = fuzz(tmp_path, "m.gguf", src.read_bytes(), 400, read_gguf)
        assert refused > 100  # the mutants do reach the checks


def test_fuzz_onnx_adapter(tmp_path):
    import onnxruntime as ort

    from edgepeft.security import check_onnx_adapter

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({"m.lora_A.weight": ort.OrtValue.ortvalue_from_numpy(np.ones((4, 16), np.float32)),
                        "m.lora_B.weight": ort.OrtValue.ortvalue_from_numpy(np.ones((16, 4), np.float16))})
    fmt.export_adapter(str(tmp_path / "a.onnx_adapter"))
    assert fuzz(tmp_path, "m.onnx_adapter", (tmp_path / "a.onnx_adapter").read_bytes(), 400, check_onnx_adapter) > 100


def test_fuzz_safetensors_header(tmp_path):
    from safetensors.numpy import save_file

    from edgepeft.fingerprint import read_safetensors_header, tensor_entries

    save_file({"a": np.ones((4, 8), np.float32), "b": np.zeros(3, np.float16)}, str(tmp_path / "w.safetensors"),
              metadata={"format": "pt"})
    assert fuzz(tmp_path, "m.safetensors", (tmp_path / "w.safetensors").read_bytes(), 400,
                lambda p: (read_safetensors_header(p), tensor_entries([p]))) > 100


def test_fuzz_manifest_json(tmp_path):
    """Mutants of a sealed manifest, parsed raw and also resealed (so the checks behind the seal run too)."""
    src = make_set(tmp_path / "src")
    B.pack(B.PackInput(base=src["base"], adapters=[src["a"]]), tmp_path / "bundle")
    raw = (tmp_path / "bundle" / B.MANIFEST).read_bytes()

    def parse(p):
        data = p.read_bytes()
        B.parse_manifest(data, p)

    fuzz(tmp_path, "raw.json", raw, 300, parse)

    def resealed(p):
        from edgepeft.readers import loads_json

        m = loads_json(p.read_bytes(), str(p))
        if isinstance(m, dict):
            B.parse_manifest(B.seal_manifest(m), p)
        raise EdgepeftError("parsed")

    body = json.dumps(json.loads(raw), indent=1).encode()
    fuzz(tmp_path, "sealed.json", body, 300, resealed)


def test_fuzz_bundle_tar(tmp_path):
    from edgepeft.bundle_tar import extract_tar, write_tar

    src = make_set(tmp_path / "src")
    B.pack(B.PackInput(base=src["base"], adapters=[src["a"]]), tmp_path / "bundle")
    write_tar(tmp_path / "bundle", tmp_path / "b.tar")
    counter = iter(range(10**6))

    def parse(p):
        dest = tmp_path / f"x{next(counter)}"
        extract_tar(p, dest)
        B.verify(dest)

    assert fuzz(tmp_path, "m.tar", (tmp_path / "b.tar").read_bytes(), 200, parse) > 50
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(tmp_path / "bundle" / B.MANIFEST, arcname=B.MANIFEST)
    fuzz(tmp_path, "m.tar.gz", buf.getvalue(), 150, parse)


def test_fuzz_yaml_profile(tmp_path):
    from edgepeft.profiles import load_profile_file

    text = (Path(__file__).parents[1] / "devices" / "jetson-orin-nano-8gb.yaml").read_bytes()
    assert fuzz(tmp_path, "m.yaml", text, 400, load_profile_file) > 100


def test_fuzz_adapter_config(tmp_path):
    from edgepeft.export.adapter import _rank_alpha, _read_config

    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": False, "target_modules": ["q_proj", "v_proj"],
           "rank_pattern": {"layers\\.0\\..*q_proj": 4}, "alpha_pattern": {"v_proj": 8.5}}
    folder = tmp_path / "ad"
    folder.mkdir()

    def parse(p):
        (folder / "adapter_config.json").write_bytes(p.read_bytes())
        c = _read_config(folder)
        _rank_alpha(c, "model.layers.0.self_attn.q_proj")

    assert fuzz(tmp_path, "cfg.json", json.dumps(cfg).encode(), 400, parse) > 100


# ------------------------------------------------------------------ I/O the mutants cannot express
def test_a_file_that_shrinks_while_read_is_an_error_not_sigbus(tmp_path, monkeypatch):
    """The header walk uses plain read()s: a file shorter than it was when opened ends in IntegrityError.

    Simulated by making fstat report the size the file had before it shrank."""
    from edgepeft import security
    from edgepeft.errors import IntegrityError

    base = write_base(tmp_path / "b.gguf")
    real = base.stat().st_size
    raw = base.read_bytes()
    base.write_bytes(raw[:200])  # it shrank after edgepeft looked at its size
    orig = os.fstat

    def fstat(fd):
        st = orig(fd)
        return os.stat_result((*st[:6], real, *st[7:]))

    monkeypatch.setattr(security.os, "fstat", fstat)
    with pytest.raises(IntegrityError, match="shrank"):
        security.check_gguf_header(base)
    assert "mmap" not in Path(security.__file__).read_text().replace("never mmap", "")


def test_runtime_loads_exactly_the_bytes_verify_hashed(tmp_path):
    """A file swapped in by rename after the hash check is never what the runtime reads (Linux: the descriptor)."""
    src = make_set(tmp_path / "src")
    out = tmp_path / "bundle"
    B.pack(B.PackInput(base=src["base"], adapters=[src["a"]]), out)
    art = B.as_artifact(out)
    hashed = (out / "adapters" / "alpha.gguf").read_bytes()
    evil = write_adapter(tmp_path / "evil.gguf", rank=4, name="alpha", seed=99)
    os.replace(evil, out / "adapters" / "alpha.gguf")  # the swap, after verification
    assert (out / "adapters" / "alpha.gguf").read_bytes() != hashed
    assert art.adapters["alpha"].read_bytes() == hashed  # what llama.cpp is handed
    from edgepeft.fit import read_gguf

    assert read_gguf(art.model).fingerprint == read_gguf(src["base"]).fingerprint
    assert art.name_of(art.adapters["alpha"]) == "adapters/alpha.gguf"
