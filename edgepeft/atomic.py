"""Atomic writes: everything lands under a temp name in the destination dir, then renames.

A crash or SIGKILL leaves only ``.edgepeft-tmp-*`` names behind, never a partial file
under the final name, and never touches what an earlier run wrote.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from edgepeft.errors import EdgepeftError

TMP_PREFIX = ".edgepeft-tmp-"
PAUSE_ENV = "EDGEPEFT_PAUSE_AT"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file: the mode every output file ends with
DIR_MODE = 0o777 & ~_UMASK


def fault_point(name: str) -> None:
    """Test hook for the kill tests: ``EDGEPEFT_PAUSE_AT="<glob>=<marker file>"`` makes the
    process write the marker and sleep when it reaches a point whose name matches, so a test
    can SIGKILL it at exactly that point. Without the variable this is one dict lookup."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    pattern, _, marker = spec.rpartition("=")
    if fnmatch.fnmatchcase(name, pattern):
        Path(marker).write_text(name)
        time.sleep(3600)


def ensure_writable_dir(path: Path) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EdgepeftError(f"--out {path} is a file, expected a directory", "Pass a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgepeftError(f"cannot create output directory {path}: {e.strerror}",
                            "Choose a directory you can write to") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise EdgepeftError(f"output directory {path} is not writable", "Choose a directory you can write to")
    return path


@contextlib.contextmanager
def atomic_path(final: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to ``final``; rename onto ``final`` only if the block succeeds."""
    final = Path(final)
    ensure_writable_dir(final.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix or final.suffix, dir=final.parent)
    except OSError as e:  # read-only or pseudo filesystems (root passes os.access checks)
        raise _unwritable(final.parent, e) from e
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, FILE_MODE)  # mkstemp makes 0600; final artifacts get normal permissions
    try:
        yield tmp_path
        _fsync(tmp_path)
        fault_point(f"before-rename:{final.name}")
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp directory next to ``final``; it replaces ``final`` only on success."""
    final = Path(final)
    ensure_writable_dir(final.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=final.parent))
    except OSError as e:
        raise _unwritable(final.parent, e) from e
    os.chmod(tmp, DIR_MODE)
    try:
        yield tmp
        normal_modes(tmp)
        fault_point(f"before-rename:{final.name}")
        if final.exists():
            old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def normal_modes(root: Path) -> None:
    """Give every file and folder under ``root`` the mode a plain ``open()``/``mkdir`` would have.

    Libraries that write into our temp folders create some files 0600 (ONNX's external-data
    writer, anything through ``mkstemp``); renamed as they are, a service account that did not
    create them could not read them on the device. Executable bits are kept.
    """
    for p in [Path(root), *Path(root).rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode & 0o777
        want = DIR_MODE if p.is_dir() else FILE_MODE | (mode & 0o111 & ~_UMASK)
        if mode != want:
            os.chmod(p, want)


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp file (or folder) onto its final name, with normal permissions."""
    if Path(tmp).is_dir():
        normal_modes(tmp)
    else:
        os.chmod(tmp, FILE_MODE)
    os.replace(tmp, final)


def _unwritable(directory: Path, e: OSError) -> EdgepeftError:
    return EdgepeftError(f"cannot write in {directory}: {e.strerror or e}", "Choose a directory you can write to")


def write_bytes(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: Path, text: str) -> None:
    write_bytes(final, text.encode())


def write_json(final: Path, obj) -> None:
    write_text(final, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _fsync(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    except OSError:
        pass


def clean_stale_temps(directory: Path) -> None:
    """Remove temp files a killed run left behind (never final names)."""
    for p in Path(directory).glob(TMP_PREFIX + "*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
