"""Adapter surgery and format writers (installed as ``edgepeft.export``).

Every writer is one module exposing ``export(request: ExportRequest) -> ExportResult``,
registered in :data:`WRITERS` by format name and imported only when that format is asked for
(so ``edgepeft export --format gguf`` never imports the ONNX builder). ``edgepeft export``, the
quickstart and the tests all dispatch through :func:`export`. Kept import-light: runtimes and
bench never import this package.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from edgepeft.export.request import ExportRequest

# format -> writer module; the module is imported only when its format is exported
WRITERS: dict[str, str] = {"gguf": "edgepeft.export.gguf", "onnx": "edgepeft.export.onnx"}


@dataclass(frozen=True)
class ExportResult(Mapping):
    """What one export wrote: typed fields, plus the JSON record (also written beside the artifacts and
    printed by ``--json``). Reads like that record, too: ``result["merge"]``."""

    format: str
    files: tuple[Path, ...]
    record: dict = field(repr=False)

    @classmethod
    def of(cls, record: dict) -> ExportResult:
        return cls(record["format"], tuple(Path(f) for f in record.get("files", [])), record)

    @property
    def verification(self):
        """The verdict(s) of the parity check against PyTorch, as the record carries them."""
        return self.record.get("verification", self.record.get("verifications", self.record.get("verify")))

    def __getitem__(self, key: str):
        return self.record[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)


class Writer(Protocol):
    """One format writer module."""

    def export(self, req: ExportRequest) -> ExportResult: ...


def get_writer(fmt: str) -> Writer:
    from edgepeft.errors import ConfigError

    if fmt not in WRITERS:
        raise ConfigError("--format", fmt, ", ".join(WRITERS))
    return importlib.import_module(WRITERS[fmt])


def export(req: ExportRequest) -> ExportResult:
    """Run the writer registered for ``req.format``."""
    return get_writer(req.format).export(req)
