"""The bounded text readers: every JSON and YAML file someone else produced goes through here.

Binary headers (GGUF, ``.onnx_adapter``, ``.onnx``) are read by :mod:`edgepeft.security`;
this module is its text counterpart. Each reader bounds what a small hostile file can cost
and turns every malformed input into one :class:`IntegrityError` naming the file:

- size: one bounded ``read()`` of at most ``limit`` bytes (never more than the file had);
- encoding: strict UTF-8;
- nesting: at most ``MAX_DEPTH`` levels (deeper input would otherwise hit Python's recursion limit);
- JSON: ``NaN``/``Infinity`` and duplicate keys are refused (the value would be ambiguous or non-finite);
- YAML: a safe loader that refuses aliases and anchors, so a 1 KB "billion laughs" file cannot
  expand to gigabytes, and no ``!!python`` tag constructs anything.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from edgepeft.errors import IntegrityError

MAX_DEPTH = 64
MAX_JSON_BYTES = 64 << 20  # manifests, sidecars, configs and records are KBs
MAX_YAML_BYTES = 1 << 20
# Artifact/adapter names users and files give: always fullmatch (`$` would accept a trailing newline).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit (at most 128 characters)"


def is_name(x) -> bool:
    return isinstance(x, str) and NAME.fullmatch(x) is not None


def read_bytes(path: Path, what: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file, in one bounded read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not _is_regular(st.st_mode):
                raise IntegrityError(f"{what} {path} is not a regular file", "Pass a regular file")
            if st.st_size > limit:
                raise IntegrityError(f"{what} {path} is {st.st_size} bytes; at most {limit} are allowed",
                                     "Pass the file edgepeft wrote (it is far smaller)")
            return f.read(limit + 1)[:limit]
    except OSError as e:
        raise IntegrityError(f"cannot read {what} {path} ({e.strerror})", "Check the path") from e


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed (only finite numbers)")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def loads_json(raw, where: str):
    """Parse JSON text or bytes with the bounds above; ``where`` names the file (and field) in errors."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise IntegrityError(f"{where} is not UTF-8 (byte {e.start})", "Save it as UTF-8 JSON") from None
    try:
        obj = json.loads(raw, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise IntegrityError(f"{where} nests deeper than {MAX_DEPTH} levels", "Pass a flat JSON file") from None
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                             "Fix or re-create the file") from None
    except ValueError as e:  # NaN/Infinity, duplicate keys
        raise IntegrityError(f"{where} is not allowed JSON ({e})", "Fix or re-create the file") from None
    check_depth(obj, where)
    return obj


def check_depth(obj, where: str) -> None:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > MAX_DEPTH:
            raise IntegrityError(f"{where} nests deeper than {MAX_DEPTH} levels", "Pass a flat file")
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)


def read_json(path: Path, what: str, expect: type | None = dict, limit: int = MAX_JSON_BYTES):
    """A JSON file, bounded; with ``expect`` the top level must be that type."""
    path = Path(path)
    obj = loads_json(read_bytes(path, what, limit), f"{what} {path}")
    if expect is not None and not isinstance(obj, expect):
        raise IntegrityError(f"{what} {path} holds a JSON {_json_kind(obj)}, allowed: a JSON {_json_kind(expect())}",
                             "Pass the file edgepeft (or PEFT) wrote")
    return obj


def _json_kind(obj) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(obj), "number")


def yaml_loader(base=None):
    """A yaml.SafeLoader subclass that refuses aliases/anchors and nesting deeper than MAX_DEPTH."""
    import yaml

    class Loader(base or yaml.SafeLoader):
        _depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                ev = self.peek_event()
                raise yaml.composer.ComposerError(None, None, f"alias *{ev.anchor} is not allowed "
                                                  "(edgepeft YAML has no anchors or aliases)", ev.start_mark)
            ev = self.peek_event()
            if getattr(ev, "anchor", None):
                raise yaml.composer.ComposerError(None, None, f"anchor &{ev.anchor} is not allowed "
                                                  "(edgepeft YAML has no anchors or aliases)", ev.start_mark)
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels",
                                                  ev.start_mark)
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    return Loader


def loads_yaml(text: str, where: str, loader=None):
    """Parse YAML with :func:`yaml_loader`; a syntax error names ``where``:line."""
    import yaml

    try:
        return yaml.load(text, Loader=loader or yaml_loader())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"{mark.line + 1}" if mark else "?"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise IntegrityError(f"{where}:{line}: invalid YAML ({problem})", "Fix the YAML") from None
    except RecursionError:
        raise IntegrityError(f"{where}: YAML nests too deep", "Fix the YAML") from None


def read_text(path: Path, what: str, limit: int) -> str:
    raw = read_bytes(path, what, limit)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IntegrityError(f"{what} {path} is not UTF-8 (byte {e.start})", "Save it as UTF-8") from None
