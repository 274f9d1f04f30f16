"""Paths inside records: stored relative to the file that stores them, resolved the same way.

Every record, sidecar and manifest edgepeft writes (gguf-export.json, the ONNX sidecar, a
bundle's manifest.json, a training run's manifest.json, bench.json, summary.json) stores each
path through :func:`to_record` and every reader turns it back into a path through
:func:`from_record`. So a folder keeps working after it is moved or copied to another machine,
whatever the working directory was when it was written or is when it is read.
"""

from __future__ import annotations

import os
from pathlib import Path


def to_record(path: str | os.PathLike, record_file: str | os.PathLike) -> str:
    """``path`` as ``record_file`` stores it: relative to the folder holding ``record_file``, POSIX slashes."""
    target = os.path.abspath(path)
    folder = os.path.dirname(os.path.abspath(record_file))
    try:
        rel = os.path.relpath(target, folder)
    except ValueError:  # another drive on Windows: no relative form exists
        return Path(target).as_posix()
    return Path(rel).as_posix()


def from_record(stored: str | os.PathLike, record_file: str | os.PathLike, *, confine: str | None = None) -> Path:
    """The path a record stores, usable from the current directory (absolute paths, from old records, kept).

    With ``confine`` (the field's name, for the error) the path must stay inside the record's folder:
    absolute paths, ``..`` and links leaving it raise :class:`~edgepeft.errors.IntegrityError`; an old
    record's absolute path is honoured only when it points inside the folder, else by its file name."""
    p = Path(stored)
    if confine is None:
        return p if p.is_absolute() else Path(record_file).parent / p
    return _inside(Path(record_file).parent, str(stored), confine)


def _inside(folder: Path, rel: str, where: str) -> Path:
    from edgepeft.errors import IntegrityError

    rp = Path(rel)
    if rp.is_absolute() and "\0" not in rel:
        rp = Path(os.path.relpath(rp, folder)) if rp.resolve().is_relative_to(folder.resolve()) else Path(rp.name)
        rel = rp.as_posix()
    if not rel or "\0" in rel or rp.is_absolute() or ".." in rp.parts:
        raise IntegrityError(f"{where}={rel!r} leaves the folder", "Allowed: a path relative to the folder")
    target = folder / rp
    if not target.resolve().is_relative_to(folder.resolve()):
        raise IntegrityError(f"{where}={rel!r} leaves the folder (through a link)",
                             "Allowed: a path relative to the folder")
    return target
