"""pack / verify / load_checked on synthetic GGUF files written by gguf-py (milliseconds each)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from bundle_factory import FP_B, make_set, write_adapter

from edgepeft import bundle as B
from edgepeft.bundle_tar import extract_tar, write_tar
from edgepeft.errors import EdgepeftError, IntegrityError, MismatchError


@pytest.fixture
def src(tmp_path) -> dict[str, Path]:
    return make_set(tmp_path / "src")


@pytest.fixture
def packed(src, tmp_path) -> Path:
    out = tmp_path / "bundle"
    B.pack(B.PackInput(base=src["base"], adapters=[src["a"], src["b"]]), out)
    return out


def _reseal(root: Path, edit) -> None:
    """Edit the manifest and seal it again: exercises the checks behind the hash check."""
    m = json.loads((root / B.MANIFEST).read_text())
    edit(m)
    (root / B.MANIFEST).write_bytes(B.seal_manifest(m))


def test_manifest_records_everything(packed, src):
    m = json.loads((packed / "manifest.json").read_text())
    assert m["manifest_version"] == B.MANIFEST_VERSION and m["edgepeft_version"]
    assert m["base_fingerprint"] == "a" * 64 and m["base"]["quant"] == "f32"
    assert set(m["files"]) == {"base/base.gguf", "adapters/alpha.gguf", "adapters/beta.gguf"}
    for rel, rec in m["files"].items():
        assert rec["size"] == (packed / rel).stat().st_size
        assert rec["sha256"] == B.sha256_file(packed / rel)
    alpha, beta = m["adapters"]
    assert (alpha["name"], beta["name"]) == ("alpha", "beta")
    assert alpha["ranks"] == {"attn_q": [4], "attn_v": [4]} and beta["ranks"]["attn_q"] == [8]
    assert alpha["target_modules"] == ["attn_q", "attn_v"]
    assert alpha["prune"] == {"energy": 0.99}
    assert alpha["training"] == {"task": "demo-sort", "data_sha256": "d" * 64}
    assert "llama.cpp" in alpha["suits"]["runtimes"] and "x86-64-cpu" in alpha["suits"]["devices"]
    # files are readable by others on the device (mkstemp's 0600 is not kept)
    assert (packed / "base/base.gguf").stat().st_mode & 0o044 == 0o044


def test_cli_pack_verify_roundtrip(src, tmp_path, cli):
    out = tmp_path / "b"
    p = cli("pack", "--base", src["base"], "--adapter", src["a"], "--adapter", src["b"], "--out", out, "--tar")
    assert p.returncode == 0, p.stderr
    for target in (out, out.with_name("b.tar")):
        v = cli("verify", target)
        assert v.returncode == 0, v.stderr
        assert "alpha, beta" in v.stdout


def _flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel", ["manifest.json", "base/base.gguf", "adapters/alpha.gguf", "adapters/beta.gguf"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_byte_change_anywhere_fails(packed, rel, where):
    p = packed / rel
    n = p.stat().st_size
    _flip(p, {"first": 0, "middle": n // 2, "last": n - 1}[where])
    with pytest.raises(IntegrityError):
        B.load_checked(packed)


def test_whitespace_edit_of_manifest_fails(packed):
    p = packed / "manifest.json"
    p.write_bytes(p.read_bytes().replace(b"\n  ", b"\n\t", 1))
    json.loads(p.read_text())  # still valid JSON ...
    with pytest.raises(IntegrityError, match="own hash"):
        B.verify(packed)  # ... but not the bytes that were sealed


def test_cli_verify_names_the_changed_file(packed, cli):
    _flip(packed / "adapters/beta.gguf", 5000)
    from conftest import assert_clean_error

    assert_clean_error(cli("verify", packed), "adapters/beta.gguf", "hash")


def test_verify_checks_fingerprint_behind_the_hashes(packed, src, tmp_path):
    """A same-shape adapter for another base swapped in with a matching hash still fails."""
    other = write_adapter(tmp_path / "other.gguf", fingerprint=FP_B, rank=4, name="alpha")
    (packed / "adapters/alpha.gguf").write_bytes(other.read_bytes())
    _reseal(packed, lambda m: m["files"]["adapters/alpha.gguf"].update(
        sha256=B.sha256_file(other), size=other.stat().st_size))
    with pytest.raises(MismatchError, match="made for base bbbb"):
        B.verify(packed)


def test_verify_checks_shapes_behind_the_hashes(packed, tmp_path):
    bad = write_adapter(tmp_path / "bad.gguf", rank=4, out_dim=48)
    (packed / "adapters/alpha.gguf").write_bytes(bad.read_bytes())
    _reseal(packed, lambda m: m["files"]["adapters/alpha.gguf"].update(
        sha256=B.sha256_file(bad), size=bad.stat().st_size))
    with pytest.raises(MismatchError, match="blk.0.attn_q.weight shape mismatch"):
        B.verify(packed)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"fingerprint": FP_B}, "made for base bbbb"),
    ({"b_rank": 2}, "rank mismatch"),
    ({"out_dim": 48}, "shape mismatch"),
    ({"arch": "qwen2"}, "architecture qwen2"),
    ({"targets": ("attn_k",)}, "attn_k.weight does not exist in the base"),
])
def test_pack_refuses_adapters_that_do_not_fit(src, tmp_path, kwargs, needle):
    path = write_adapter(tmp_path / "x.gguf", **kwargs)
    out = tmp_path / "out"
    with pytest.raises(MismatchError, match=needle):
        B.pack(B.PackInput(base=src["base"], adapters=[path]), out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edgepeft-tmp-")]


def test_add_adapter_writes_only_manifest_and_new_file(src, tmp_path):
    out = tmp_path / "bundle"
    B.pack(B.PackInput(base=src["base"], adapters=[src["a"]]), out)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
              for p in [out / "base/base.gguf", out / "adapters/alpha.gguf"]}
    m = B.pack(B.PackInput(base=None, adapters=[src["b"]]), out)
    assert [a["name"] for a in m["adapters"]] == ["alpha", "beta"]
    for p, (ino, mtime, data) in before.items():
        assert (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) == (ino, mtime, data)
    assert B.load_checked(out).adapter_path("beta").samefile(out / "adapters/beta.gguf")  # its hashed descriptor
    # the same base may be named again; a different one may not
    B.pack(B.PackInput(base=src["base"], adapters=[write_adapter(tmp_path / "g.gguf", name="gamma")]), out)
    manifest = (out / "manifest.json").read_bytes()
    with pytest.raises(MismatchError, match="not the base of bundle"):
        B.pack(B.PackInput(base=src["a"], adapters=[write_adapter(tmp_path / "d.gguf", name="delta")]), out)
    with pytest.raises(EdgepeftError, match="already used"):
        B.pack(B.PackInput(base=None, adapters=[src["a"]]), out)
    assert (out / "manifest.json").read_bytes() == manifest


def test_add_to_a_corrupted_bundle_is_refused(packed, tmp_path):
    _flip(packed / "base/base.gguf", 100)
    with pytest.raises(IntegrityError, match="base/base.gguf"):
        B.pack(B.PackInput(base=None, adapters=[write_adapter(tmp_path / "g.gguf", name="gamma")]), packed)
    assert not (packed / "adapters/gamma.gguf").exists()


@pytest.mark.parametrize("bad", ["../outside.gguf", "/etc/passwd", "adapters/../../x", "adapters//a.gguf", "a\\b"])
def test_manifest_paths_must_stay_inside(packed, bad):
    _reseal(packed, lambda m: m["files"].update({bad: {"sha256": "0" * 64, "size": 1}}))
    with pytest.raises(IntegrityError, match="manifest path"):
        B.verify(packed)


def test_symlinked_member_is_refused(packed, tmp_path):
    real = tmp_path / "real.gguf"
    real.write_bytes((packed / "adapters/alpha.gguf").read_bytes())
    (packed / "adapters/alpha.gguf").unlink()
    (packed / "adapters/alpha.gguf").symlink_to(real)
    with pytest.raises(IntegrityError, match="symbolic link"):
        B.verify(packed)


def test_pack_refuses_symlinks_in_onnx_folder(src, tmp_path):
    d = tmp_path / "onnxdir"
    d.mkdir()
    (d / "edgepeft-manifest.json").write_text(json.dumps({"base_fingerprint": "a" * 64}))
    (d / "model.onnx").symlink_to("/etc/hostname")
    with pytest.raises(EdgepeftError, match="symbolic link"):
        B.pack(B.PackInput(base=src["base"], onnx=[d]), tmp_path / "out")


def _evil_tar(path: Path, kind: str) -> Path:
    with tarfile.open(path, "w") as tf:
        data = b"{}"
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo({"dotdot": "../evil.txt", "abs": "/tmp/edgepeft-evil.txt"}.get(kind, "x"))
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "manifest.json"
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        info.size = 0 if kind in ("symlink", "hardlink", "fifo") else 4
        tf.addfile(info, io.BytesIO(b"evil") if info.size else None)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "abs", "symlink", "hardlink", "fifo"])
def test_tar_extraction_refuses_traversal_and_links(tmp_path, kind):
    tar = _evil_tar(tmp_path / "evil.tar", kind)
    dest = tmp_path / "x" / "dest"
    dest.parent.mkdir()
    with pytest.raises(IntegrityError):
        extract_tar(tar, dest)
    assert not dest.exists() and not (tmp_path / "x" / "evil.txt").exists()
    assert not Path("/tmp/edgepeft-evil.txt").exists()
    assert list(dest.parent.iterdir()) == []


def test_tar_roundtrip_and_extracted_bundle_loads(packed, tmp_path):
    tar = tmp_path / "b.tar"
    write_tar(packed, tar)
    with tarfile.open(tar) as tf:
        assert all(m.isfile() and m.uid == 0 for m in tf.getmembers())
    dest = extract_tar(tar, tmp_path / "unpacked")
    assert B.load_checked(dest).adapter_names == ["alpha", "beta"]


def test_unlisted_file_is_only_a_warning(packed):
    (packed / "adapters" / "stray.txt").write_text("hi")
    assert B.verify(packed).warnings == ["unlisted file adapters/stray.txt (ignored; never loaded)"]


def test_inspect_describes_a_bundle(packed, cli):
    p = cli("inspect", packed, "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["kind"] == "bundle" and info["adapters"] == ["alpha", "beta"] and info["verified"] is True


def test_load_checked_has_no_bypass():
    import inspect

    assert list(inspect.signature(B.load_checked).parameters) == ["bundle_dir"]



def test_adapters_never_go_on_a_merged_base(src, tmp_path):
    from bundle_factory import write_base

    merged = write_base(tmp_path / "merged.gguf", mode="merged")
    with pytest.raises(MismatchError, match="already has adapters merged"):
        B.pack(B.PackInput(base=merged, adapters=[src["a"]]), tmp_path / "out")
    B.pack(B.PackInput(base=merged), tmp_path / "out")  # alone it is a fine thing to ship
    assert B.load_checked(tmp_path / "out").adapter_names == []


def test_bench_discovers_a_bundle_only_through_its_checks(packed):
    """`edgepeft bench bundle/` loads through load_checked: a byte flip stops it before any runtime."""
    from edgepeft.artifacts import runtime_artifact as discover

    art = discover(packed)
    assert art.format == "gguf" and sorted(art.adapters) == ["alpha", "beta"]
    assert art.model.is_file() and art.model.samefile(packed / "base/base.gguf")  # the descriptor it was hashed through
    _flip(next(p for p in art.adapters.values()), 7)
    with pytest.raises(IntegrityError):
        discover(packed)
