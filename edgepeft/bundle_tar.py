"""Bundle tarballs: written from the manifest's own file list, extracted with no way out.

Extraction streams the tar once: the manifest comes first and is fully checked, then each
member must be a listed regular file of exactly its declared size (no links, devices,
FIFOs, sparse files, absolute names or ``..``). Members are written by edgepeft itself
(never ``extractall``) into a temp dir that is renamed into place only when every member landed.
"""

from __future__ import annotations

import lzma
import tarfile
import zlib
from pathlib import Path

from edgepeft import atomic
from edgepeft.bundle import MANIFEST, check_relpath, read_manifest, safe_member
from edgepeft.errors import EdgepeftError, IntegrityError
from edgepeft.ui import esc

MAX_TAR_MEMBERS = 10_000


def write_tar(src: Path, tar_path: Path) -> None:
    """Tar the bundle's listed files (regular files only, normalised owners), atomically."""
    m = read_manifest(src)
    with atomic.atomic_path(tar_path, suffix=".tar") as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for rel in [MANIFEST, *sorted(m["files"])]:
            p = safe_member(src, rel)
            info = tf.gettarinfo(str(p), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with open(p, "rb") as f:
                tf.addfile(info, f)


MAX_RATIO = 50  # extracted bytes per byte of tar given (weights barely compress; this bounds a "zip bomb")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


def extract_tar(tar_path: Path, dest: Path) -> Path:
    """Extract a bundle tar into a new ``dest``, capped by what its manifest declares.

    The tar is read as a stream, once. Its first member must be ``manifest.json``; it is
    fully checked (seal, types, every path) before anything else is written. Each later
    member must be a regular, non-sparse file the manifest lists, with exactly the declared
    size, appearing once; at most the declared bytes are written for it. The declared total
    must fit the free disk space and ``MAX_RATIO`` times the tar's own size.
    """
    import shutil

    from edgepeft.bundle import parse_manifest
    from edgepeft.readers import MAX_JSON_BYTES

    tar_path, dest = Path(tar_path), Path(dest)
    shown = esc(tar_path)
    if dest.exists():
        raise EdgepeftError(f"{esc(dest)} already exists", "Extract into a new directory")
    try:
        tf = tarfile.open(tar_path, "r|*")  # noqa: SIM115 - closed by the with below
    except _TAR_ERRORS as e:
        raise IntegrityError(f"{shown} is not a readable tar ({type(e).__name__}: {esc(e)})",
                             "Re-pack or re-download the bundle") from None
    given = tar_path.stat().st_size
    try:
        with tf, atomic.atomic_dir(dest) as tmp:
            manifest, seen = None, set()
            for i, mem in enumerate(tf):
                if i >= MAX_TAR_MEMBERS:
                    raise IntegrityError(f"{shown} has more than {MAX_TAR_MEMBERS} members", "Refusing to extract it")
                if not mem.isfile() and not mem.isdir():
                    raise IntegrityError(f"{shown}: member {mem.name!r} is a link or special file",
                                         "Bundles hold regular files only; refusing to extract it")
                name = mem.name.rstrip("/") if mem.isdir() else mem.name
                check_relpath(name)
                if mem.isdir():
                    continue
                if mem.issparse():
                    raise IntegrityError(f"{shown}: member {name!r} is a sparse file", "Refusing to extract it")
                if manifest is None:
                    if name != MANIFEST or mem.size > MAX_JSON_BYTES:
                        raise IntegrityError(f"{shown}: first member is {name!r} ({mem.size} bytes), expected "
                                             f"{MANIFEST}", "Pack the tar with edgepeft pack --tar")
                    raw = tf.extractfile(mem).read(mem.size)
                    manifest = parse_manifest(raw, f"{tar_path}:{MANIFEST}")
                    total = sum(r["size"] for r in manifest["files"].values())
                    if total > MAX_RATIO * given + (1 << 20):
                        raise IntegrityError(f"{shown}: its manifest declares {total} bytes, more than {MAX_RATIO}x "
                                             f"the {given}-byte tar", "Refusing to extract it")
                    free = shutil.disk_usage(tmp).free
                    if total > free:
                        raise IntegrityError(f"{shown}: its manifest declares {total} bytes, {free} are free at "
                                             f"{esc(tmp.parent)}", "Free disk space, or extract elsewhere")
                    (tmp / MANIFEST).write_bytes(raw)
                    continue
                rec = manifest["files"].get(name)
                if rec is None or name in seen:
                    raise IntegrityError(f"{shown}: member {name!r} is " + ("duplicated" if rec else "not in its manifest"),
                                         "Refusing to extract it; re-pack the bundle")
                if mem.size != rec["size"]:
                    raise IntegrityError(f"{shown}: member {name!r} has {mem.size} bytes, the manifest says "
                                         f"{rec['size']}", "Refusing to extract it; re-pack the bundle")
                seen.add(name)
                _copy_member(tf.extractfile(mem), tmp / name, rec["size"], shown, name)
            if manifest is None:
                raise IntegrityError(f"{shown} holds no {MANIFEST}", "Pack the tar with edgepeft pack --tar")
    except _TAR_ERRORS as e:
        raise IntegrityError(f"{shown} is truncated or corrupt ({type(e).__name__}: {esc(e)})",
                             "Re-pack or re-download the bundle") from None
    return dest


def _copy_member(src, dst: Path, size: int, shown: str, name: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    left = size
    with open(dst, "xb") as out:
        while left:
            buf = src.read(min(1 << 22, left))
            if not buf:
                raise IntegrityError(f"{shown}: member {name!r} ends early", "The tar is truncated")
            out.write(buf)
            left -= len(buf)
