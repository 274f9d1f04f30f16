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


def from_record(stored: str | os.PathLike, record_file: str | os.PathLike) -> Path:
    """The path a record stores, usable from the current directory (absolute paths, from old records, kept)."""
    p = Path(stored)
    return p if p.is_absolute() else Path(record_file).parent / p
