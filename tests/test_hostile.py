"""Hostile inputs against the real CLI: each is one clean error, cheap, and writes nothing final.

Every case builds a small hostile input in a fresh directory and runs ``python -m edgepeft``
from there with relative paths. Each asserts the house promise for bad input (exit 2, at
most one stderr line starting ``edgepeft: error:``, no traceback, no raw control character
in the output, nothing under a final name) plus bounded cost, measured on the subprocess
itself with ``os.wait4``: wall time under 10 s and peak RSS under 1 GB (generous promise
checks, not benchmarks). None of these commands imports torch before it refuses.

Cases are grouped by the class of issue 16 they prove (see the ``case`` tags).
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import FP_A, make_set, write_adapter, write_base

from edgepeft import bundle as B

WALL_S, RSS_KB = 10.0, 1 << 20  # 10 s, 1 GiB


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    wall: float
    maxrss_kb: int


# Linux carries a process's peak RSS across fork and exec, so a CLI forked straight from pytest (GBs
# after the suite's in-process model tests) would report pytest's peak. A small trampoline forks the
# CLI from its own ~10 MB image and reports wait4 on that child: the CLI's own peak, whatever ran before.
_TRAMPOLINE = """
import os, signal, sys, threading
report, timeout, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
pid = os.fork()
if pid == 0:
    os.execv(argv[0], argv)
killer = threading.Timer(timeout, os.kill, (pid, signal.SIGKILL))
killer.start()
_, status, ru = os.wait4(pid, 0)
killer.cancel()
with open(report, "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {ru.ru_maxrss}")
"""


def run_measured(argv, cwd: Path, timeout: float = 120) -> Result:
    """Run the CLI; its own wall time and peak RSS come from wait4 on that very child (via the trampoline)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rusage"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", _TRAMPOLINE, report, str(timeout), sys.executable, "-m", "edgepeft",
                        *map(str, argv)], cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                       check=True, timeout=timeout + 60)
        wall = time.perf_counter() - t0
        rc, maxrss = map(int, report.read_text().split())
        out.seek(0)
        err.seek(0)
        return Result(rc, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"),
                      wall, maxrss)


def assert_hostile_refused(r: Result, finals=(), needle: str | None = None) -> None:
    assert r.rc == 2, (r.rc, r.stdout[-500:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) <= 1, r.stderr
    assert "Traceback" not in r.stderr
    assert lines and lines[0].startswith("edgepeft: error: "), r.stderr
    for stream in (r.stdout, r.stderr):
        assert not any(c in stream for c in "\x1b\r\x00\u202e"), repr(stream)
    for f in finals:
        assert not Path(f).exists(), f"{f} was written"
    assert r.wall < WALL_S, f"took {r.wall:.1f} s"
    assert r.maxrss_kb < RSS_KB, f"peak RSS {r.maxrss_kb / 1024:.0f} MiB"
    if needle:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])


# ------------------------------------------------------------------ raw GGUF
def _s(x: str | bytes) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def kv_str(k, v):
    return _s(k) + struct.pack("<I", 8) + _s(v)


def kv_u32(k, v):
    return _s(k) + struct.pack("<I", 4) + struct.pack("<I", v)


def gguf(kvs: list[bytes], tensors=(), data: bytes = b"", n_tensors=None, n_kv=None, align=32) -> bytes:
    """A GGUF v3 file from raw KV entries and (name, ne, type, offset) tensor infos."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    parts = [head, *kvs]
    for name, ne, ttype, off in tensors:
        parts.append(_s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", ttype, off))
    body = b"".join(parts)
    pad = (-len(body)) % align
    return body + b"\0" * pad + data


MODEL_KV = [kv_str("general.architecture", "llama"), kv_str("general.type", "model")]


def _w(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def _packed(tmp: Path) -> Path:
    src = make_set(tmp / "src")
    B.pack(B.PackInput(base=src["base"], adapters=[src["a"], src["b"]]), tmp / "bundle")
    return tmp / "bundle"


def _reseal(root: Path, edit) -> Path:
    m = json.loads((root / B.MANIFEST).read_text())
    edit(m)
    (root / B.MANIFEST).write_bytes(B.seal_manifest(m))
    return root


def _raw_manifest(root: Path, raw: bytes) -> Path:
    (root / B.MANIFEST).write_bytes(raw)
    return root


CASES: dict[str, callable] = {}


def case(tag: str):
    def deco(fn):
        CASES[f"{tag}-{fn.__name__}"] = fn
        return fn
    return deco


# --- class 4 + 8: GGUF headers (inspect, pack, bench, verify share the one reader) ------------
@case("c4")
def gguf_huge_edgepeft_array_in_pack(tmp):
    """2 MB of one edgepeft.* array: decoded once, bounded; the base is then refused (no fingerprint string)."""
    arr = _s("edgepeft.base_fingerprint") + struct.pack("<IIQ", 9, 0, 2_000_000) + b"\1" * 2_000_000
    _w(tmp, "big.gguf", gguf([*MODEL_KV, arr]))
    return ["pack", "--base", "big.gguf", "--out", "out"], [tmp / "out"]


@case("c4")
def gguf_262k_tensors_in_inspect(tmp):
    """10 MB header of 262,144 tensor infos: one bounded walk, the last tensor is past the end."""
    t = [(f"t{i}", (32,), 0, 0) for i in range(262_143)] + [("last", (32,), 0, 1 << 30)]
    _w(tmp, "many.gguf", gguf(MODEL_KV, t, data=b"\0" * 128))
    return ["inspect", "many.gguf"], []


@case("c8")
def gguf_duplicate_key(tmp):
    _w(tmp, "dup.gguf", gguf([*MODEL_KV, kv_str("general.name", "a"), kv_str("general.name", "b")]))
    return ["inspect", "dup.gguf"], []


@case("c8")
def gguf_alignment_as_bool(tmp):
    _w(tmp, "al.gguf", gguf([*MODEL_KV, _s("general.alignment") + struct.pack("<I", 7) + b"\1"]))
    return ["inspect", "al.gguf"], []


@case("c8")
def gguf_alignment_not_power_of_two(tmp):
    _w(tmp, "al3.gguf", gguf([*MODEL_KV, kv_u32("general.alignment", 3)]))
    return ["inspect", "al3.gguf"], []


@case("c8")
def gguf_bool_byte_not_0_or_1(tmp):
    _w(tmp, "b.gguf", gguf([*MODEL_KV, _s("x.flag") + struct.pack("<I", 7) + b"\x07"]))
    return ["inspect", "b.gguf"], []


@case("c4")
def gguf_nested_array(tmp):
    _w(tmp, "n.gguf", gguf([*MODEL_KV, _s("x.a") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 0, 0)]))
    return ["inspect", "n.gguf"], []


@case("c4")
def gguf_string_longer_than_file(tmp):
    _w(tmp, "s.gguf", gguf([*MODEL_KV, _s("x.s") + struct.pack("<IQ", 8, 1 << 40)]))
    return ["inspect", "s.gguf"], []


@case("c4")
def gguf_array_count_past_end(tmp):
    _w(tmp, "a.gguf", gguf([*MODEL_KV, _s("x.a") + struct.pack("<IIQ", 9, 8, 1 << 50)]))
    return ["inspect", "a.gguf"], []


@case("c4")
def gguf_tensor_count_implausible(tmp):
    _w(tmp, "c.gguf", gguf(MODEL_KV, n_tensors=1 << 40))
    return ["inspect", "c.gguf"], []


@case("c4")
def gguf_unknown_value_type(tmp):
    _w(tmp, "u.gguf", gguf([*MODEL_KV, _s("x.u") + struct.pack("<I", 77)]))
    return ["inspect", "u.gguf"], []


@case("c4")
def gguf_truncated_in_bench(tmp):
    raw = write_base(tmp / "b.gguf").read_bytes()
    _w(tmp, "t.gguf", raw[: len(raw) // 2])
    return ["bench", "t.gguf", "--json", "out.json"], [tmp / "out.json"]


@case("c4")
def gguf_bad_magic_in_verify_pair(tmp):
    _w(tmp, "m.gguf", b"GGUX" + b"\0" * 64)
    return ["pack", "--base", "m.gguf", "--out", "out"], [tmp / "out"]


@case("c8")
def gguf_adapter_alpha_nan_in_pack(tmp):
    write_base(tmp / "base.gguf")
    raw = write_adapter(tmp / "a0.gguf").read_bytes()
    key = _s("adapter.lora.alpha") + struct.pack("<I", 6)
    i = raw.index(key) + len(key)
    _w(tmp, "a.gguf", raw[:i] + struct.pack("<f", math.nan) + raw[i + 4:])
    return ["pack", "--base", "base.gguf", "--adapter", "a.gguf", "--out", "out"], [tmp / "out"]


@case("c8")
def gguf_fingerprint_as_number_in_pack(tmp):
    _w(tmp, "f.gguf", gguf([*MODEL_KV, kv_u32("edgepeft.base_fingerprint", 7)]))
    return ["pack", "--base", "f.gguf", "--out", "out"], [tmp / "out"]


@case("c6")
def gguf_tensor_name_with_newline_and_ansi(tmp):
    _w(tmp, "x.gguf", gguf(MODEL_KV, [("w\n\x1b[32mOK bundle verified\x1b[0m", (32,), 0, 1 << 30)], data=b"\0" * 64))
    return ["inspect", "x.gguf"], []


@case("c6")
def gguf_adapter_name_with_newline_in_pack(tmp):
    write_base(tmp / "base.gguf")
    write_adapter(tmp / "a.gguf", name="alpha\nOK forged")
    return ["pack", "--base", "base.gguf", "--adapter", "a.gguf", "--out", "out"], [tmp / "out"]


@case("c6")
def pack_name_with_trailing_newline(tmp):
    s = make_set(tmp / "src")
    return ["pack", "--base", s["base"], "--adapter", s["a"], "--name", "alpha\n", "--out", "out"], [tmp / "out"]


@case("c6")
def pack_name_with_rich_markup(tmp):
    s = make_set(tmp / "src")
    return ["pack", "--base", s["base"], "--adapter", s["a"], "--name", "[/x]", "--out", "out"], [tmp / "out"]


# --- class 3: the manifest, every path in every section -----------------------------------
@case("c3")
def manifest_onnx_path_etc(tmp):
    b = _reseal(_packed(tmp), lambda m: m["onnx"].append({"name": "o", "path": "/etc", "adapters": [],
                                                             "base_fingerprint": FP_A}))
    return ["verify", b.name], []


@case("c3")
def manifest_onnx_path_dotdot(tmp):
    b = _reseal(_packed(tmp), lambda m: m["onnx"].append({"name": "o", "path": "../..", "adapters": [],
                                                             "base_fingerprint": FP_A}))
    return ["verify", b.name], []


@case("c3")
def manifest_unlisted_model_onnx_decides_fit(tmp):
    """A listed, hashed .onnx_adapter next to an UNLISTED model.onnx: the model is never read, verify refuses."""
    b = _packed(tmp)
    (b / "onnx/o/adapters").mkdir(parents=True)
    ad = _w(b, "onnx/o/adapters/a.onnx_adapter", b"\0" * 64)
    _w(b, "onnx/o/model.onnx", b"unlisted")

    def edit(m):
        m["files"]["onnx/o/adapters/a.onnx_adapter"] = {"sha256": B.sha256_file(ad), "size": 64}
        m["onnx"].append({"name": "o", "path": "onnx/o", "adapters": ["adapters/a.onnx_adapter"],
                          "base_fingerprint": FP_A})
    return ["verify", _reseal(b, edit).name], []


@case("c3")
def manifest_files_key_dotdot(tmp):
    b = _reseal(_packed(tmp), lambda m: m["files"].update({"../x": {"sha256": "0" * 64, "size": 1}}))
    return ["verify", b.name], []


@case("c3")
def manifest_adapter_path_absolute(tmp):
    b = _reseal(_packed(tmp), lambda m: m["adapters"][0].update(path="/etc/passwd"))
    return ["verify", b.name], []


@case("c3")
def manifest_base_path_unhashed(tmp):
    b = _reseal(_packed(tmp), lambda m: m["base"].update(path="base/other.gguf"))
    return ["verify", b.name], []


@case("c5")
def manifest_sha_not_hex(tmp):
    b = _reseal(_packed(tmp), lambda m: m["files"]["base/base.gguf"].update(sha256=["x"]))
    return ["verify", b.name], []


@case("c5")
def manifest_size_bool(tmp):
    b = _reseal(_packed(tmp), lambda m: m["files"]["base/base.gguf"].update(size=True))
    return ["verify", b.name], []


@case("c6")
def manifest_adapter_name_newline(tmp):
    b = _reseal(_packed(tmp), lambda m: m["adapters"][0].update(name="alpha\nOK all good"))
    return ["verify", b.name], []


@case("c6")
def manifest_adapter_name_markup(tmp):
    b = _reseal(_packed(tmp), lambda m: m["adapters"][0].update(name="[/x]"))
    return ["inspect", b.name], []


@case("c5")
def manifest_deeply_nested(tmp):
    return ["verify", _raw_manifest(_packed(tmp), b"[" * 100_000 + b"]" * 100_000).name], []


@case("c5")
def manifest_not_utf8(tmp):
    return ["verify", _raw_manifest(_packed(tmp), b'{"manifest_version": 1, "x": "\xff\xfe"}').name], []


@case("c8")
def manifest_nan(tmp):
    return ["verify", _raw_manifest(_packed(tmp), b'{"manifest_version": NaN}').name], []


@case("c5")
def manifest_duplicate_keys(tmp):
    return ["verify", _raw_manifest(_packed(tmp), b'{"manifest_version": 1, "manifest_version": 1}').name], []


@case("c5")
def manifest_is_a_list(tmp):
    return ["verify", _raw_manifest(_packed(tmp), b"[1, 2]").name], []


@case("c1")
def bundle_file_swapped(tmp):
    b = _packed(tmp)
    (b / "adapters/alpha.gguf").unlink()
    write_adapter(b / "adapters/alpha.gguf", rank=4, name="alpha", seed=9)
    return ["bench", b.name, "--json", "out.json"], [tmp / "out.json"]


# --- class 4 + 5: tars ----------------------------------------------------------------------
def _tar(tmp: Path, name: str, members: list[tuple[str, bytes]], mode="w") -> Path:
    path = tmp / name
    with tarfile.open(path, mode) as tf:
        for n, data in members:
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _bundle_members(tmp: Path) -> list[tuple[str, bytes]]:
    b = _packed(tmp)
    m = json.loads((b / B.MANIFEST).read_text())
    return [(B.MANIFEST, (b / B.MANIFEST).read_bytes())] + [(rel, (b / rel).read_bytes()) for rel in sorted(m["files"])]


@case("c4")
def tar_sparse_terabyte_member(tmp):
    """GNU tar --sparse: an 80 KB tar whose member is 1 TiB; refused from the manifest's sizes, nothing hashed."""
    b = _packed(tmp)
    big = b / "adapters" / "big.gguf"
    with open(big, "wb") as f:
        f.truncate(1 << 40)
    _reseal(b, lambda m: m["files"].update({"adapters/big.gguf": {"sha256": "0" * 64, "size": 1 << 40}}))
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(tmp / "b.tar"), "-C", str(b), B.MANIFEST,
                    "adapters/big.gguf"], check=True)
    big.unlink()
    return ["verify", "b.tar"], []


@case("c4")
def tar_member_larger_than_declared(tmp):
    mem = _bundle_members(tmp)
    mem[1] = (mem[1][0], mem[1][1] + b"\0" * 4096)
    _tar(tmp, "b.tar", mem)
    return ["verify", "b.tar"], []


@case("c4")
def tar_unlisted_member(tmp):
    _tar(tmp, "b.tar", [*_bundle_members(tmp), ("extra/evil.bin", b"x" * 10)])
    return ["verify", "b.tar"], []


@case("c4")
def tar_manifest_not_first(tmp):
    mem = _bundle_members(tmp)
    _tar(tmp, "b.tar", mem[1:] + mem[:1])
    return ["verify", "b.tar"], []


@case("c4")
def tar_symlink_member(tmp):
    path = tmp / "b.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("manifest.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    return ["inspect", "b.tar"], []


@case("c5")
def tar_gz_truncated(tmp):
    p = _tar(tmp, "b0.tar.gz", _bundle_members(tmp), "w:gz")
    _w(tmp, "b.tar.gz", p.read_bytes()[: p.stat().st_size // 2])
    return ["verify", "b.tar.gz"], []


@case("c5")
def tar_xz_corrupt(tmp):
    p = _tar(tmp, "b0.tar.xz", _bundle_members(tmp), "w:xz")
    raw = bytearray(p.read_bytes())
    for i in range(64, len(raw), 97):
        raw[i] ^= 0x5A
    _w(tmp, "b.tar.xz", bytes(raw))
    return ["verify", "b.tar.xz"], []


@case("c4")
def tar_declares_more_than_it_can_hold(tmp):
    b = _packed(tmp)
    _reseal(b, lambda m: m["files"].update({"adapters/zeros.gguf": {"sha256": "0" * 64, "size": 100 << 30}}))
    _tar(tmp, "b.tar.gz", [(B.MANIFEST, (b / B.MANIFEST).read_bytes())], "w:gz")
    return ["verify", "b.tar.gz"], []


# --- class 2 + 4 + 5: device profiles and remote targets --------------------------------------
PROFILE = (Path(__file__).parents[1] / "devices" / "x86-64-cpu.yaml").read_text()


def _profile(tmp: Path, text: str) -> Path:
    return _w(tmp, "dev.yaml", text.encode())


def _bench_profile(tmp: Path, text: str):
    write_base(tmp / "b.gguf")
    _profile(tmp, text)
    return ["bench", "b.gguf", "--device", "dev.yaml", "--json", "out.json"], [tmp / "out.json", tmp / "PWNED"]


@case("c4")
def yaml_alias_bomb(tmp):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]")
    return _bench_profile(tmp, "\n".join(lines) + "\n")


@case("c5")
def yaml_deeply_nested(tmp):
    return _bench_profile(tmp, "a: " + "[" * 5000 + "]" * 5000 + "\n")


@case("c5")
def profile_memory_inf(tmp):
    return _bench_profile(tmp, _edit("memory_gb: 16", "memory_gb: .inf"))


def _edit(old: str, new: str) -> str:
    assert old in PROFILE, old
    return PROFILE.replace(old, new, 1)


@case("c2")
def profile_option_shell_injection(tmp):
    return _bench_profile(tmp, _edit("n_threads: 0}", 'n_threads: "1; touch PWNED"}'))


@case("c2")
def profile_option_float(tmp):
    return _bench_profile(tmp, _edit("n_gpu_layers: 0,", "n_gpu_layers: 1.5,"))


@case("c2")
def profile_unknown_option(tmp):
    return _bench_profile(tmp, _edit("options: {", "options: {exec: 'touch PWNED', "))


@case("c2")
def profile_binary_is_an_option(tmp):
    return _bench_profile(tmp, _edit("llama_bench: llama-bench", "llama_bench: '-oProxyCommand=touch PWNED'"))


@case("c2")
def profile_python_with_spaces(tmp):
    return _bench_profile(tmp, _edit("  kind: local\n", "  kind: local\n  python: 'python3; touch PWNED'\n"))


@case("c2")
def profile_workdir_with_newline(tmp):
    return _bench_profile(tmp, _edit("  kind: local\n", '  kind: local\n  workdir: "/tmp/x\\n; touch PWNED"\n'))


@case("c2")
def profile_provider_option_nested(tmp):
    return _bench_profile(tmp, _edit("    providers: [CPUExecutionProvider]\n",
                                     "    providers: [CPUExecutionProvider]\n    provider_options: "
                                     "{CPUExecutionProvider: {x: [1, 2]}}\n"))


@case("c2")
def ssh_host_starting_with_dash(tmp):
    write_base(tmp / "b.gguf")
    return ["bench", "b.gguf", "--device", "ssh://-oProxyCommand=touch%20PWNED", "--timeout", "2"], [tmp / "PWNED"]


@case("c2")
def ssh_user_starting_with_dash(tmp):
    write_base(tmp / "b.gguf")
    return ["bench", "b.gguf", "--device", "ssh://-oProxyCommand=x@host", "--timeout", "2"], [tmp / "PWNED"]


@case("c2")
def adb_serial_starting_with_dash(tmp):
    write_base(tmp / "b.gguf")
    return ["bench", "b.gguf", "--device", "adb://-H", "--timeout", "2"], []


@case("c6")
def ssh_uri_with_trailing_newline(tmp):
    write_base(tmp / "b.gguf")
    return ["bench", "b.gguf", "--device", "ssh://host\n", "--timeout", "2"], []


@case("c5")
def timeout_nan(tmp):
    write_base(tmp / "b.gguf")
    return ["bench", "b.gguf", "--device", "ssh://127.0.0.1:9", "--timeout", "nan"], []


# --- class 5: bench records and export sidecars -------------------------------------------
def _doc(records) -> dict:
    return {"schema": "edgepeft.bench/1", "device": {"profile": "x"}, "records": records}


@case("c5")
def compare_records_without_fields(tmp):
    _w(tmp, "a.json", json.dumps(_doc([{}])).encode())
    _w(tmp, "b.json", json.dumps(_doc([{}])).encode())
    return ["bench", "--compare", "a.json", "b.json"], []


@case("c5")
def compare_metric_of_wrong_type(tmp):
    rec = {"artifact": "x", "runtime": "llama.cpp", "adapter": "none", "device": "local", "model_bytes": 1,
           "adapter_bytes": 0, "tg": {"mean": "fast"}}
    _w(tmp, "a.json", json.dumps(_doc([rec])).encode())
    return ["bench", "--compare", "a.json", "a.json"], []


@case("c5")
def compare_records_are_strings(tmp):
    _w(tmp, "a.json", json.dumps(_doc(["x"])).encode())
    return ["bench", "--compare", "a.json", "a.json"], []


@case("c5")
def gguf_record_of_wrong_shape(tmp):
    (tmp / "exp").mkdir()
    write_base(tmp / "exp" / "base.gguf")
    _w(tmp, "exp/gguf-export.json", b"[1, 2, 3]")
    return ["bench", "exp", "--json", "out.json"], [tmp / "out.json"]


@case("c3")
def gguf_record_adapter_path_escapes(tmp):
    (tmp / "exp").mkdir()
    write_base(tmp / "exp" / "base.gguf")
    _w(tmp, "exp/gguf-export.json", json.dumps({"adapter_files": [{"name": "a", "path": "../../etc/passwd"}]}).encode())
    return ["bench", "exp", "--json", "out.json"], [tmp / "out.json"]


@case("c5")
def onnx_sidecar_quant_of_wrong_type(tmp):
    _w(tmp, "o/genai_config.json", b"{}")
    _w(tmp, "o/edgepeft-onnx.json", json.dumps({"quant": 4}).encode())
    return ["bench", "o", "--json", "out.json"], [tmp / "out.json"]


@case("c5")
def onnx_sidecar_is_a_list_in_inspect(tmp):
    _w(tmp, "o/edgepeft-onnx.json", b"[]")
    return ["inspect", "o"], []


def _onnx_with_external(tmp: Path, offset: str) -> Path:
    from onnx import TensorProto, helper

    t = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "w.bin"), ("offset", offset), ("length", "8")):
        t.external_data.add(key=k, value=v)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [t])
    _w(tmp, "o/w.bin", b"\0" * 8)
    _w(tmp, "o/edgepeft-onnx.json", b"{}")
    return _w(tmp, "o/model.onnx", helper.make_model(graph).SerializeToString())


@case("c5")
def onnx_external_offset_not_a_number(tmp):
    _onnx_with_external(tmp, "eight")
    return ["bench", "o/model.onnx", "--json", "out.json"], [tmp / "out.json"]


@case("c5")
def onnx_external_offset_negative(tmp):
    _onnx_with_external(tmp, "-8")
    return ["bench", "o/model.onnx", "--json", "out.json"], [tmp / "out.json"]


@case("c5")
def onnx_model_not_protobuf(tmp):
    _w(tmp, "m.onnx", b"\xff" * 1000)
    return ["bench", "m.onnx", "--json", "out.json"], [tmp / "out.json"]


# --- class 4 + 5 + 8: PEFT adapters and base folders (export) ---------------------------------
H = 64


def _tiny_base(tmp: Path) -> Path:
    from safetensors.numpy import save_file

    d = tmp / "base"
    d.mkdir()
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": H, "intermediate_size": 128,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({"model.embed_tokens.weight": np.zeros((32, H), np.float32), "model.norm.weight": np.ones(H, np.float32),
               "model.layers.0.self_attn.q_proj.weight": np.zeros((H, H), np.float32)}, str(d / "model.safetensors"))
    (d / "tokenizer.json").write_text("{}")
    return d


GOOD_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": ["q_proj"]}


def _adapter(tmp: Path, config, weights: bytes | None = None) -> Path:
    from safetensors.numpy import save_file

    d = tmp / "ad"
    d.mkdir()
    raw = config if isinstance(config, bytes) else json.dumps(config).encode()
    (d / "adapter_config.json").write_bytes(raw)
    if weights is None:
        pre = "base_model.model.model.layers.0.self_attn.q_proj"
        save_file({f"{pre}.lora_A.weight": np.ones((4, H), np.float32),
                   f"{pre}.lora_B.weight": np.ones((H, 4), np.float32)}, str(d / "adapter_model.safetensors"))
    else:
        (d / "adapter_model.safetensors").write_bytes(weights)
    return d


def _export(tmp: Path, config, weights=None, extra=()):
    _tiny_base(tmp)
    _adapter(tmp, config, weights)
    return (["export", "--format", "gguf", "--base", "base", "--adapter", "ad", "--mode", "separate", "--quant", "f16",
             "--no-verify", "--out", "out", *extra], [tmp / "out"])


@case("c5")
def adapter_config_is_a_list(tmp):
    return _export(tmp, b"[1, 2]")


@case("c5")
def adapter_config_not_utf8(tmp):
    return _export(tmp, b'{"peft_type": "LORA", "r": 4, "x": "\xc3\x28"}')


@case("c5")
def adapter_config_r_is_a_string(tmp):
    return _export(tmp, {**GOOD_CONFIG, "r": "two"})


@case("c5")
def adapter_config_r_zero(tmp):
    return _export(tmp, {**GOOD_CONFIG, "r": 0})


@case("c8")
def adapter_config_alpha_nan(tmp):
    return _export(tmp, json.dumps({**GOOD_CONFIG, "lora_alpha": 1.0}).replace("1.0", "NaN").encode())


@case("c8")
def adapter_config_alpha_infinity(tmp):
    return _export(tmp, json.dumps({**GOOD_CONFIG, "lora_alpha": 1.0}).replace("1.0", "Infinity").encode())


@case("c4")
def adapter_config_catastrophic_rank_pattern(tmp):
    return _export(tmp, {**GOOD_CONFIG, "rank_pattern": {"(a+)+$": 8}})


@case("c4")
def adapter_config_ambiguous_alternation_pattern(tmp):
    return _export(tmp, {**GOOD_CONFIG, "alpha_pattern": {"(q|q_)*proj$": 8}})


@case("c5")
def adapter_config_deeply_nested(tmp):
    return _export(tmp, b'{"peft_type": "LORA", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")


@case("c5")
def safetensors_entry_wrong_types(tmp):
    hdr = json.dumps({"w": {"dtype": "F32", "shape": "big", "data_offsets": [0, 16]}}).encode()
    return _export(tmp, GOOD_CONFIG, struct.pack("<Q", len(hdr)) + hdr + b"\0" * 16)


@case("c5")
def safetensors_missing_offsets(tmp):
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [4]}}).encode()
    return _export(tmp, GOOD_CONFIG, struct.pack("<Q", len(hdr)) + hdr + b"\0" * 16)


@case("c5")
def safetensors_header_is_a_list(tmp):
    hdr = b"[1,2,3]"
    return _export(tmp, GOOD_CONFIG, struct.pack("<Q", len(hdr)) + hdr)


@case("c6")
def export_name_with_trailing_newline(tmp):
    return _export(tmp, GOOD_CONFIG, extra=("--name", "alpha\n"))


@case("c5")
def base_config_is_a_list(tmp):
    args, finals = _export(tmp, GOOD_CONFIG)
    (tmp / "base" / "config.json").write_text("[]")
    return args, finals


@case("c5")
def train_config_yaml_alias_bomb(tmp):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]")
    _w(tmp, "t.yaml", ("\n".join(lines) + "\n").encode())
    return ["train", "--config", "t.yaml", "--out", "run"], [tmp / "run"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_one_cheap_clean_error(name, tmp_path):
    argv, finals = CASES[name](tmp_path)
    assert_hostile_refused(run_measured(argv, tmp_path), finals)


def test_there_are_at_least_60_cases_across_every_class_and_command():
    tags = {n.split("-")[0] for n in CASES}
    assert len(CASES) >= 60 and tags >= {"c1", "c2", "c3", "c4", "c5", "c6", "c8"}
    import inspect

    src = "\n".join(inspect.getsource(fn) for fn in CASES.values()) + inspect.getsource(_export) + \
        inspect.getsource(_bench_profile)
    commands = {c for c in ("inspect", "verify", "pack", "bench", "export", "train") if f'["{c}"' in src or f'(["{c}"' in src}
    assert commands == {"inspect", "verify", "pack", "bench", "export", "train"}, commands


def test_valid_bundle_with_hostile_unlisted_names_prints_escaped_lines(tmp_path):
    """Class 6 on a bundle that verifies: names with a newline, ANSI escapes and rich markup can neither
    forge a second OK line nor crash the output; each is printed escaped, on its own one line."""
    b = _packed(tmp_path)
    for name in ("x\nOK forged: 9 files hashed", "\x1b[31mred\x1b[0m", "[x] [bold red]markup"):
        (b / name).write_bytes(b"unlisted")
    for argv in (["verify", "bundle"], ["inspect", "bundle"]):
        r = run_measured(argv, tmp_path)
        assert r.rc == 0, r.stderr
        assert "Traceback" not in r.stderr and not any(c in r.stdout + r.stderr for c in "\x1b\r")
        if argv[0] == "verify":
            assert len([ln for ln in r.stdout.splitlines() if ln.startswith("OK")]) == 1, r.stdout
            warnings = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert len(warnings) == 3 and all("unlisted file" in w for w in warnings), warnings
            assert any("\\nOK forged" in w for w in warnings) and any("[x] [bold red]markup" in w for w in warnings)
        else:
            assert "[x] [bold red]markup" in r.stdout and "\\x1b[31mred" in r.stdout
