"""Bundle tarballs: written from the manifest's own file list, extracted with no way out.

Extraction refuses links, devices and FIFOs, absolute names and ``..`` before anything
is written, then extracts into a temp dir with tarfile's ``data`` filter as a second
layer, and renames it into place only when every member landed.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from edgepeft import atomic
from edgepeft.bundle import MANIFEST, check_relpath, read_manifest, safe_member
from edgepeft.errors import EdgepeftError, IntegrityError

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


def extract_tar(tar_path: Path, dest: Path) -> Path:
    """Extract a bundle tar into a new ``dest``: regular files only, every name inside ``dest``."""
    tar_path, dest = Path(tar_path), Path(dest)
    if dest.exists():
        raise EdgepeftError(f"{dest} already exists", "Extract into a new directory")
    try:
        tf = tarfile.open(tar_path, "r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as e:
        raise IntegrityError(f"{tar_path} is not a readable tar ({e})", "Re-pack or re-download the bundle") from e
    with tf:
        members = []
        for i, mem in enumerate(tf):
            if i >= MAX_TAR_MEMBERS:
                raise IntegrityError(f"{tar_path} has more than {MAX_TAR_MEMBERS} members", "Refusing to extract it")
            if not (mem.isfile() or mem.isdir()):
                raise IntegrityError(f"{tar_path}: member {mem.name!r} is a link or special file",
                                     "Bundles hold regular files only; refusing to extract it")
            check_relpath(mem.name.rstrip("/") if mem.isdir() else mem.name)
            members.append(mem)
        with atomic.atomic_dir(dest) as tmp:
            try:
                tf.extractall(tmp, members=members, filter="data")
            except (tarfile.TarError, OSError) as e:
                raise IntegrityError(f"{tar_path} cannot be extracted safely ({e})", "Refusing it") from e
    return dest
