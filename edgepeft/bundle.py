"""Bundles: one base plus swappable adapters, with a manifest that pins every byte.

A bundle is a directory (optionally also a ``.tar``)::

    manifest.json            schema below; the only file edgepeft trusts first
    base/<file>.gguf         the base model
    adapters/<name>.gguf     one GGUF LoRA adapter per name
    onnx/<name>/...          ONNX Runtime (GenAI) folders, merged or base + .onnx_adapter

The manifest records the sha256 and size of every file, the base fingerprint, and per
adapter its name, ranks, target modules, prune settings and training summary, plus which
runtimes and device profiles each artifact suits. ``load_checked`` is the single gate
every runtime load goes through: paths must stay inside the bundle, every hash must
match, every header must pass :mod:`edgepeft.security`, and every adapter must fit the
base by fingerprint and by tensor names and shapes. There is no flag that skips it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from edgepeft import __version__, atomic
from edgepeft.errors import EdgepeftError, IntegrityError, MismatchError
from edgepeft.fingerprint import sha256_file, short
from edgepeft.fit import (  # noqa: F401 - re-exported: the bundle API in one place
    GGUFArtifact,
    _adapter_record,
    adapter_fit_problem,
    check_adapter_fits,
    read_gguf,
)
from edgepeft.keys import ADAPTER_SUFFIX_ONNX, ONNX_SIDECAR, QNN_DECODE_GRAPH, local
from edgepeft.keys import BUNDLE_MANIFEST as MANIFEST
from edgepeft.keys import EdgepeftKeys as K
from edgepeft.ui import esc

MANIFEST_VERSION = 1
MAX_FILES = 512  # a bundle is a base, its adapters and a few ONNX folders; each stays open while loaded
from edgepeft.readers import NAME as _NAME

_CHUNK = 1 << 22


# ----------------------------------------------------------------------------- paths
def check_relpath(rel) -> list[str]:
    """A bundle-relative path: plain, relative, no ``..``; returns its parts."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise IntegrityError(f"manifest path {rel!r} is not a plain relative path", "Re-pack the bundle")
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise IntegrityError(f"manifest path {rel!r} leaves the bundle (absolute or '..')",
                             "Refusing it; re-pack the bundle with edgepeft pack")
    return parts


def safe_member(root: Path, rel) -> Path:
    """Resolve a manifest path inside ``root``; refuse absolute paths, ``..`` and links."""
    cur = Path(root)
    for p in check_relpath(rel):
        cur = cur / p
        if cur.is_symlink():
            raise IntegrityError(f"bundle path {rel} is a symbolic link", "Bundles hold regular files only; re-pack it")
    return cur


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise EdgepeftError(f"{what} name {name!r} is not allowed",
                            "Use letters, digits, '.', '_' and '-' (at most 128 characters)")
    return name


# ------------------------------------------------------------------ device suitability
def _suits(fmt: str, quant: str, nbytes: int, runtimes: list[str]) -> dict:
    """Which shipped device profiles can hold and run an artifact of this format/quant/size."""
    from edgepeft.profiles import load_profile, shipped_profiles

    devices = []
    for name in sorted(shipped_profiles()):
        prof = load_profile(name)
        if quant in prof.formats.get(fmt, ()) and nbytes <= prof.usable_bytes and any(
                r in prof.runtimes for r in runtimes):
            devices.append(name)
    return {"runtimes": runtimes, "devices": devices}


# ------------------------------------------------------------------------- ONNX facts
ONNX_SIDECARS = (ONNX_SIDECAR,)  # written by export/onnx.py and export/qnn.py


def _onnx_dir_record(src: Path, name: str) -> dict:
    """Describe an ONNX folder: sidecar facts, kind, adapters; refuse links and foreign layouts."""
    from edgepeft.security import check_artifact

    if not src.is_dir():
        raise EdgepeftError(f"--onnx {src} is not a directory", "Pass a folder written by edgepeft export --format onnx")
    files = _regular_files(src)
    sidecar = next((src / s for s in ONNX_SIDECARS if (src / s).is_file()), None)
    if sidecar is None:
        raise EdgepeftError(f"--onnx {src} has no edgepeft sidecar manifest ({', '.join(ONNX_SIDECARS)})",
                            "Export it with edgepeft export --format onnx so its base fingerprint is recorded")
    from edgepeft.readers import read_json

    side = read_json(sidecar, "ONNX sidecar")
    base_rec = side.get("base") if side.get("base") is not None else {}
    for key, val, kinds in (("base", base_rec, dict), ("adapters", side.get("adapters") or [], list),
                            ("quant", side.get("quant") or "", str), ("mode", side.get("mode") or "", str),
                            ("base_fingerprint", side.get("base_fingerprint") or "", str)):
        if not isinstance(val, kinds):
            raise IntegrityError(f"{esc(sidecar)}: field {key!r} is a {type(val).__name__}",
                                 f"Allowed: a {kinds.__name__}; re-export the ONNX folder")
    for f in files:
        if f.suffix in (".onnx", ADAPTER_SUFFIX_ONNX):
            check_artifact(f)
    adapters = sorted(f.relative_to(src).as_posix() for f in files if f.suffix == ADAPTER_SUFFIX_ONNX)
    if adapters and not (src / "model.onnx").is_file():
        raise EdgepeftError(f"--onnx {esc(src)} has adapters but no model.onnx", "Pass the folder export wrote")
    _check_onnx_fits(src.parent, {"path": src.name, "adapters": adapters})
    for a in side.get("adapters") or []:
        if isinstance(a, dict) and a.get("base_fingerprint") not in (None, base_rec.get("fingerprint")):
            raise MismatchError(f"--onnx {esc(src)}: adapter {a.get('name')!r} was trained on another base "
                                f"({short(str(a['base_fingerprint']))})", "Re-export it with the base it was trained on")
    quant = side.get("quant") or "int4"
    runtimes = ["onnxruntime"] if any(f.name == QNN_DECODE_GRAPH for f in files) else ["onnxruntime-genai"]
    fp = base_rec.get("fingerprint")
    return {"name": name, "format": "onnx", "mode": side.get("mode") or ("separate" if adapters else "merged"),
            "quant": quant, "base_fingerprint": fp, "adapters": adapters, "sidecar": sidecar.name,
            "_src": src, "_files": files, "_bytes": sum(f.stat().st_size for f in files), "_runtimes": runtimes}


def _regular_files(src: Path, limit: int = MAX_FILES) -> list[Path]:
    """Regular files under ``src`` (links refused, never followed), at most ``limit``."""
    out = []
    for d, dirs, names in os.walk(src, followlinks=False):
        for n in sorted(dirs) + sorted(names):
            p = Path(d) / n
            if p.is_symlink():
                raise EdgepeftError(f"{esc(p)} is a symbolic link", "Bundles hold regular files only; copy the target in")
        for n in names:
            p = Path(d) / n
            if p.is_file() and not n.startswith(atomic.TMP_PREFIX):
                out.append(p)
        if len(out) > limit:
            raise EdgepeftError(f"{esc(src)} holds more than {limit} files", "Pass the folder export wrote")
    return sorted(out)


def _check_onnx_fits(files, rec: dict) -> None:
    """Every .onnx_adapter in a separate-mode folder must fit its model's LoRA inputs (names, shapes).

    ``files`` is an :class:`Opened` bundle (only listed, hashed files are read) or a source folder's parent.
    """
    if not rec.get("adapters"):
        return
    from edgepeft.fit import check_onnx_adapter_fits

    for a in rec["adapters"]:
        model_rel, ad_rel = f"{rec['path']}/model.onnx", f"{rec['path']}/{a}"
        if isinstance(files, Opened):
            check_onnx_adapter_fits(files.path(model_rel), files.path(ad_rel), model_label=model_rel,
                                    adapter_label=ad_rel)
        else:
            folder = Path(files) / rec["path"]
            check_onnx_adapter_fits(folder, folder / a)


# ---------------------------------------------------------------------------- copying
def _copy_hashed(src: Path, dst: Path) -> dict:
    import hashlib

    h, n = hashlib.sha256(), 0
    with open(src, "rb") as f, open(dst, "wb") as g:
        while buf := f.read(_CHUNK):
            h.update(buf)
            g.write(buf)
            n += len(buf)
    return {"sha256": h.hexdigest(), "size": n}


_SEAL_KEY = "manifest_sha256"
_ZERO = "0" * 64


def _seal_line(value: str) -> str:
    return f'"{_SEAL_KEY}": "{value}"'


def seal_manifest(manifest: dict) -> bytes:
    """Serialize with ``manifest_sha256`` = sha256 of these very bytes (with the field zeroed),
    so a one-byte change anywhere in manifest.json, even in whitespace, fails verify."""
    import hashlib

    body = {_SEAL_KEY: _ZERO, **{k: v for k, v in manifest.items() if k != _SEAL_KEY}}
    raw = (json.dumps(body, indent=2, default=str) + "\n").encode()
    digest = hashlib.sha256(raw).hexdigest()
    manifest[_SEAL_KEY] = digest
    return raw.replace(_seal_line(_ZERO).encode(), _seal_line(digest).encode(), 1)


def write_manifest(root: Path, manifest: dict) -> None:
    atomic.write_bytes(root / MANIFEST, seal_manifest(manifest))


def _check_seal(path: Path, raw: bytes, m: dict) -> None:
    import hashlib

    got = m.get(_SEAL_KEY)
    line = _seal_line(str(got)).encode()
    if not isinstance(got, str) or raw.count(line) != 1 or \
            hashlib.sha256(raw.replace(line, _seal_line(_ZERO).encode())).hexdigest() != got:
        raise IntegrityError(f"{path} fails its own hash check (manifest_sha256); it was edited or corrupted",
                             "Re-pack the bundle with edgepeft pack")


# --------------------------------------------------------------------------------- pack
@dataclass
class PackInput:
    base: Path | None
    adapters: list[Path] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    onnx: list[Path] = field(default_factory=list)


def _adapter_name(art: GGUFArtifact, given: str | None) -> str:
    name = given or art.meta.get(local(K.ADAPTER_NAME)) or art.path.stem
    return _check_name(str(name), "adapter")


def _base_record(art: GGUFArtifact) -> dict:
    if art.kind != "model":
        raise EdgepeftError(f"--base {art.path} is a GGUF {art.kind}, not a model", "Pass the base model .gguf")
    fp = art.fingerprint
    if fp is None:
        raise EdgepeftError(f"--base {art.path} records no base fingerprint (edgepeft.base_fingerprint)",
                            "Export the base with edgepeft export --format gguf --mode separate")
    quant = str(art.meta.get(local(K.QUANT)) or art.ggml_type_name())
    return {"format": "gguf", "mode": art.meta.get(local(K.MODE)), "architecture": art.header.metadata.get("general.architecture"),
            "quant": quant, "fingerprint": fp}


def pack(inp: PackInput, out: Path, tar: bool = False) -> dict:
    """Write a new bundle at ``out``, or add adapters/ONNX folders to the bundle already there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EdgepeftError(f"--out {out} is a file, expected a bundle directory", "Pass a directory path")
    if (out / MANIFEST).exists():
        manifest = _add_to_bundle(inp, out)
    else:
        if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(atomic.TMP_PREFIX)):
            raise EdgepeftError(f"--out {out} exists and is not a bundle (no {MANIFEST})",
                                "Pass an empty or new directory, or an existing bundle to add to")
        if inp.base is None:
            raise EdgepeftError("a new bundle needs --base", "Pass --base BASE.gguf")
        manifest = _new_bundle(inp, out)
    if tar:
        from edgepeft.bundle_tar import write_tar

        write_tar(out, out.with_name(out.name + ".tar"))
    return manifest


def _plan(inp: PackInput, base_art: GGUFArtifact, fp: str, taken: set[str]) -> tuple[list, list]:
    """Read and check every new adapter / ONNX folder before anything is written."""
    if inp.names and len(inp.names) != len(inp.adapters):
        raise EdgepeftError(f"{len(inp.names)} --name for {len(inp.adapters)} --adapter", "Give one --name per --adapter")
    adapters = []
    for i, p in enumerate(inp.adapters):
        art = read_gguf(p)
        name = _adapter_name(art, inp.names[i] if inp.names else None)
        check_adapter_fits(base_art, art, fp)
        if name in taken:
            raise EdgepeftError(f"adapter name {name!r} is already used in this bundle", "Pass a different --name")
        taken.add(name)
        adapters.append((name, art))
    onnx = []
    for d in inp.onnx:
        d = Path(d)
        name = _check_name(d.name, "ONNX folder")
        rec = _onnx_dir_record(d, name)
        if rec["base_fingerprint"] != fp:
            raise MismatchError(f"ONNX folder {d} was exported from base {short(str(rec['base_fingerprint']))}, "
                                f"the bundle base is {short(fp)}", "Pack it with the base it was exported from")
        if "onnx/" + name in taken:
            raise EdgepeftError(f"ONNX folder name {name!r} is already used in this bundle", "Rename the folder")
        taken.add("onnx/" + name)
        onnx.append(rec)
    return adapters, onnx


def _new_bundle(inp: PackInput, out: Path) -> dict:
    base_art = read_gguf(inp.base)
    base_rec = _base_record(base_art)
    adapters, onnx = _plan(inp, base_art, base_rec["fingerprint"], set())
    manifest = {"manifest_version": MANIFEST_VERSION, "edgepeft_version": __version__,
                "base_fingerprint": base_rec["fingerprint"], "base": None, "adapters": [], "onnx": [], "files": {}}
    with atomic.atomic_dir(out) as tmp:
        rel = f"base/{_check_name(base_art.path.name, 'base file')}"
        (tmp / "base").mkdir()
        manifest["files"][rel] = _copy_hashed(base_art.path, tmp / rel)
        atomic.fault_point("pack:copied:base")
        base_size = manifest["files"][rel]["size"]
        manifest["base"] = {"path": rel, **base_rec, "suits": _suits("gguf", base_rec["quant"], base_size, ["llama.cpp"])}
        _write_new_files(tmp, manifest, adapters, onnx)
        write_manifest(tmp, manifest)
    return manifest


def _write_new_files(root: Path, manifest: dict, adapters: list, onnx: list, final: bool = False) -> None:
    """Copy new adapters and ONNX folders into ``root`` and record them (final=True: existing bundle)."""
    base = manifest["base"]
    base_size = manifest["files"][base["path"]]["size"]
    for name, art in adapters:
        rel = f"adapters/{name}.gguf"
        (root / "adapters").mkdir(exist_ok=True)
        if final:  # into a live bundle: temp name + rename, so a kill leaves only a temp file
            with atomic.atomic_path(root / rel) as tmp:
                manifest["files"][rel] = _copy_hashed(art.path, tmp)
        else:
            manifest["files"][rel] = _copy_hashed(art.path, root / rel)
        atomic.fault_point(f"pack:copied:{name}")
        size = manifest["files"][rel]["size"]
        manifest["adapters"].append({"path": rel, **_adapter_record(art, name),
                                     "suits": _suits("gguf", base["quant"], base_size + size, ["llama.cpp"])})
    for rec in onnx:
        rel_dir = f"onnx/{rec['name']}"
        src, files = rec.pop("_src"), rec.pop("_files")
        nbytes, runtimes = rec.pop("_bytes"), rec.pop("_runtimes")
        with (atomic.atomic_dir(root / rel_dir) if final else _plain_dir(root / rel_dir)) as d:
            for f in files:
                sub = f.relative_to(src).as_posix()
                (d / sub).parent.mkdir(parents=True, exist_ok=True)
                manifest["files"][f"{rel_dir}/{sub}"] = _copy_hashed(f, d / sub)
            atomic.fault_point(f"pack:copied:onnx/{rec['name']}")
        rec["path"] = rel_dir
        manifest["onnx"].append({**rec, "suits": _suits("onnx", rec["quant"], nbytes, runtimes)})


@contextlib.contextmanager
def _plain_dir(path: Path):
    path.mkdir(parents=True)
    yield path


def _add_to_bundle(inp: PackInput, out: Path) -> dict:
    """Add adapters / ONNX folders to a verified bundle: only the new files and the manifest are written."""
    bundle = load_checked(out)
    manifest = bundle.manifest
    base_rel = manifest["base"]["path"]
    if inp.base is not None:
        sha = sha256_file(inp.base) if Path(inp.base).is_file() else None
        if sha != manifest["files"][base_rel]["sha256"]:
            raise MismatchError(f"--base {inp.base} is not the base of bundle {out} ({base_rel})",
                                "A bundle holds one base: omit --base to add adapters, or pack a new bundle")
    if not inp.adapters and not inp.onnx:
        raise EdgepeftError(f"nothing to add to bundle {out}", "Pass --adapter FILE.gguf or --onnx DIR")
    taken = {a["name"] for a in manifest["adapters"]} | {"onnx/" + o["name"] for o in manifest["onnx"]}
    atomic.clean_stale_temps(out)
    for sub in ("adapters", "onnx"):
        if (out / sub).is_dir():
            atomic.clean_stale_temps(out / sub)
    adapters, onnx = _plan(inp, read_gguf(bundle.base_path, base_rel), manifest["base_fingerprint"], taken)
    _write_new_files(out, manifest, adapters, onnx, final=True)
    manifest["edgepeft_version"] = __version__
    write_manifest(out, manifest)
    return manifest


# ------------------------------------------------------------------------------- verify
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Opened:
    """A bundle's listed files, each opened once and hashed through that descriptor.

    What runs afterwards (header checks, fit checks, the runtime load) is handed
    :meth:`path`, which names the very bytes that were hashed: on Linux the descriptor
    itself (``/proc/self/fd/N``), so a file swapped in by rename after the hash is never
    read; elsewhere a private copy (0700 temp dir) written from the hashed bytes.
    The descriptors stay open as long as this object lives.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._fds: dict[str, int] = {}
        self._paths: dict[str, Path] = {}
        self._copy_dir = None
        self.via_fd = os.path.isdir("/proc/self/fd")

    def add(self, rel: str, rec: dict) -> None:
        import hashlib
        import stat

        p = safe_member(self.root, rel)
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise IntegrityError(f"bundle file {esc(rel)} is missing", "Re-pack the bundle") from None
        except OSError as e:
            raise IntegrityError(f"bundle file {esc(rel)} cannot be opened ({e.strerror})",
                                 "Bundles hold regular files only; re-pack it") from None
        self._fds[rel] = fd
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"bundle file {esc(rel)} is not a regular file", "Re-pack the bundle")
        if st.st_size != rec["size"]:
            raise IntegrityError(f"bundle file {esc(rel)} has {st.st_size} bytes, the manifest says {rec['size']}",
                                 "The file was changed or truncated")
        h, left = hashlib.sha256(), rec["size"]
        out = None
        if not self.via_fd:
            import tempfile

            if self._copy_dir is None:
                self._copy_dir = tempfile.TemporaryDirectory(prefix="edgepeft-bundle-")
            dst = Path(self._copy_dir.name) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            out = open(dst, "xb")  # noqa: SIM115 - closed below
            self._paths[rel] = dst
        try:
            while left:
                buf = os.read(fd, min(_CHUNK, left))
                if not buf:
                    raise IntegrityError(f"bundle file {esc(rel)} shrank while it was hashed", "Re-pack the bundle")
                h.update(buf)
                if out is not None:
                    out.write(buf)
                left -= len(buf)
        finally:
            if out is not None:
                out.close()
        got = h.hexdigest()
        if got != rec["sha256"]:
            raise IntegrityError(f"bundle file {esc(rel)} fails its hash check (sha256 {got[:16]}, manifest "
                                 f"{rec['sha256'][:16]})", "The file was modified or corrupted; re-pack")
        if self.via_fd:
            self._paths[rel] = Path(f"/proc/self/fd/{fd}")

    def path(self, rel: str) -> Path:
        """The hashed bytes of listed file ``rel``; anything unlisted is refused, never opened."""
        if rel not in self._paths:
            raise IntegrityError(f"bundle path {esc(rel)} is not listed (with a hash) in {MANIFEST}",
                                 "Refusing to read an unlisted file; re-pack the bundle")
        return self._paths[rel]

    def get(self, rel: str) -> Path | None:
        return self._paths.get(rel)

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds, self._paths = {}, {}
        if self._copy_dir is not None:
            self._copy_dir.cleanup()
            self._copy_dir = None

    def __del__(self):
        self.close()


@dataclass
class CheckedBundle:
    """A bundle that passed every check; hand its paths (and only these) to runtimes."""

    root: Path
    manifest: dict
    warnings: list[str] = field(default_factory=list)
    opened: Opened | None = None

    def file(self, rel: str) -> Path:
        """The verified bytes of a listed file (its descriptor path on Linux)."""
        return self.opened.path(rel) if self.opened is not None else self.root / rel

    @property
    def base_path(self) -> Path:
        return self.file(self.manifest["base"]["path"])

    @property
    def adapter_names(self) -> list[str]:
        return [a["name"] for a in self.manifest["adapters"]]

    def adapter_path(self, name: str) -> Path:
        for a in self.manifest["adapters"]:
            if a["name"] == name:
                return self.file(a["path"])
        raise EdgepeftError(f"bundle {esc(self.root)} has no adapter {name!r}",
                            f"Adapters in it: {esc(', '.join(self.adapter_names)) or 'none'}")

    def onnx_path(self, name: str) -> Path:
        for o in self.manifest["onnx"]:
            if o["name"] == name:
                return self.root / o["path"]
        raise EdgepeftError(f"bundle {esc(self.root)} has no ONNX folder {name!r}",
                            f"ONNX folders in it: {esc(', '.join(o['name'] for o in self.manifest['onnx'])) or 'none'}")


def read_manifest(root: Path) -> dict:
    from edgepeft.readers import MAX_JSON_BYTES, read_bytes

    root = Path(root)
    if root.name.startswith(atomic.TMP_PREFIX):
        raise IntegrityError(f"{esc(root)} is an unfinished write left by an interrupted edgepeft run",
                             "Delete it and run the command again")
    if not root.is_dir():
        raise EdgepeftError(f"bundle {esc(root)} is not a directory", "Pass the folder written by edgepeft pack (or its .tar)")
    mpath = root / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        raise IntegrityError(f"bundle {esc(root)} has no {MANIFEST}", "Pass a folder written by edgepeft pack")
    raw = read_bytes(mpath, "bundle manifest", MAX_JSON_BYTES)
    return parse_manifest(raw, mpath)


def parse_manifest(raw: bytes, mpath) -> dict:
    """Parse and fully check manifest bytes: seal, types, and every path in every section."""
    from edgepeft.readers import loads_json

    m = loads_json(raw, f"bundle manifest {mpath}")
    if not isinstance(m, dict) or m.get("manifest_version") != MANIFEST_VERSION:
        found = m.get("manifest_version") if isinstance(m, dict) else type(m).__name__
        raise IntegrityError(f"{esc(mpath)}: manifest_version {found!r} is not supported (this edgepeft reads "
                             f"{MANIFEST_VERSION})", "Re-pack the bundle with this edgepeft version")
    for key, kind in (("files", dict), ("base", dict), ("adapters", list), ("onnx", list), ("base_fingerprint", str)):
        if not isinstance(m.get(key), kind):
            raise IntegrityError(f"{esc(mpath)}: field {key!r} is missing or not a {kind.__name__}", "Re-pack the bundle")
    _check_seal(mpath, raw, m)
    _check_manifest(mpath, m)
    return m


def _bad(mpath, where: str, allowed: str):
    raise IntegrityError(f"{esc(mpath)}: {where} is not allowed", f"Allowed: {allowed}; re-pack the bundle")


def _check_manifest(mpath, m: dict) -> None:
    """Every path in every section passes check_relpath and is listed with a hash; names match in full."""
    files = m["files"]
    if len(files) > MAX_FILES:
        _bad(mpath, f"files ({len(files)} entries)", f"at most {MAX_FILES} files")
    for rel, rec in files.items():
        check_relpath(rel)
        if rel == MANIFEST:
            _bad(mpath, f"files[{rel!r}]", "data files only (the manifest seals itself)")
        if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or \
                not _HEX64.fullmatch(rec["sha256"]) or type(rec.get("size")) is not int or rec["size"] < 0:
            _bad(mpath, f"files[{rel!r}]={rec!r}", "{sha256: 64 lowercase hex digits, size: integer >= 0}")
    if not _HEX64.fullmatch(m["base_fingerprint"]):
        _bad(mpath, f"base_fingerprint={m['base_fingerprint']!r}", "64 lowercase hex digits")

    def listed(rel, where, suffix):
        if not isinstance(rel, str):
            _bad(mpath, f"{where}={rel!r}", "a bundle-relative path string")
        check_relpath(rel)
        if not rel.endswith(suffix):
            _bad(mpath, f"{where}={rel!r}", f"a {suffix} file")
        if rel not in files:
            raise IntegrityError(f"{esc(mpath)}: {where} names {rel!r} but records no hash for it",
                                 "Re-pack the bundle")

    base = m["base"]
    listed(base.get("path"), "base.path", ".gguf")
    names = set()
    for i, a in enumerate(m["adapters"]):
        if not isinstance(a, dict):
            _bad(mpath, f"adapters[{i}]", "an object with name and path")
        _manifest_name(mpath, a.get("name"), f"adapters[{i}].name", names)
        listed(a.get("path"), f"adapters[{i}].path", ".gguf")
    for i, o in enumerate(m["onnx"]):
        if not isinstance(o, dict):
            _bad(mpath, f"onnx[{i}]", "an object with name, path and adapters")
        name = _manifest_name(mpath, o.get("name"), f"onnx[{i}].name", names, prefix="onnx/")
        if o.get("path") != f"onnx/{name}":
            _bad(mpath, f"onnx[{i}].path={o.get('path')!r}", f"'onnx/{esc(name)}' (the folder pack wrote)")
        check_relpath(o["path"])
        ads = o.get("adapters", [])
        if not isinstance(ads, list):
            _bad(mpath, f"onnx[{i}].adapters", "a list of folder-relative .onnx_adapter paths")
        for j, a in enumerate(ads):
            listed(f"{o['path']}/{a}" if isinstance(a, str) else a, f"onnx[{i}].adapters[{j}]", ADAPTER_SUFFIX_ONNX)
        if ads:
            listed(f"{o['path']}/model.onnx", f"onnx[{i}] (its model.onnx)", ".onnx")


def _manifest_name(mpath, name, where: str, taken: set, prefix: str = "") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        _bad(mpath, f"{where}={name!r}", "letters, digits, '.', '_' and '-' (at most 128 characters)")
    if prefix + name in taken:
        _bad(mpath, f"{where}={name!r}", "a name used once")
    taken.add(prefix + name)
    return name


def verify(root: Path) -> CheckedBundle:
    """Every check, in order; raise on the first failure, naming it. Returns the checked bundle.

    Every listed file is opened once and hashed through its descriptor; every later check
    (headers, fingerprints, fits) and the runtime load read those same bytes, and nothing
    that is not listed is ever opened.
    """
    from edgepeft.security import check_artifact

    root = Path(root)
    m = read_manifest(root)
    opened = Opened(root)
    try:
        for rel, rec in m["files"].items():
            opened.add(rel, rec)
        for rel in m["files"]:
            if rel.endswith((".gguf", ADAPTER_SUFFIX_ONNX, ".onnx")):
                folder = rel.rsplit("/", 1)[0]
                check_artifact(opened.path(rel), label=rel, resolve=lambda loc, folder=folder: opened.get(f"{folder}/{loc}"))
        base = read_gguf(opened.path(m["base"]["path"]), m["base"]["path"])
        if base.fingerprint != m["base_fingerprint"]:
            raise MismatchError(f"base {esc(m['base']['path'])} has fingerprint {short(str(base.fingerprint))}, the "
                                f"manifest says {short(m['base_fingerprint'])}", "Re-pack the bundle")
        for a in m["adapters"]:
            check_adapter_fits(base, read_gguf(opened.path(a["path"]), a["path"]), m["base_fingerprint"])
        for o in m["onnx"]:
            if o.get("base_fingerprint") != m["base_fingerprint"]:
                raise MismatchError(f"ONNX folder {esc(o['name'])} is for base {short(str(o.get('base_fingerprint')))}, "
                                    f"the bundle base is {short(m['base_fingerprint'])}", "Re-pack the bundle")
            _check_onnx_fits(opened, o)
    except BaseException:
        opened.close()
        raise
    listed = set(m["files"]) | {MANIFEST}
    warnings = [f"unlisted file {esc(rel)} (ignored; never loaded)" for rel in _walk_names(root) if rel not in listed]
    return CheckedBundle(root, m, warnings, opened)


def _walk_names(root: Path, limit: int = 10_000) -> list[str]:
    """Relative names of regular files under ``root`` (links not followed, at most ``limit``)."""
    out = []
    for d, dirs, names in os.walk(root, followlinks=False):
        for n in names:
            rel = (Path(d) / n).relative_to(root).as_posix()
            out.append(rel)
            if len(out) >= limit:
                return sorted(out)
    return sorted(out)


def load_checked(bundle_dir: Path) -> CheckedBundle:
    """The gate before any runtime load: a bundle that fails any check is never returned."""
    return verify(bundle_dir)


def verify_path(target: Path) -> CheckedBundle:
    """verify a bundle directory, or a tar extracted into a private throwaway directory."""
    import tempfile

    target = Path(target)
    if target.name.startswith(atomic.TMP_PREFIX):
        raise IntegrityError(f"{esc(target)} is an unfinished write left by an interrupted edgepeft run",
                             "Delete it and run the command again")
    if target.is_file():
        with tempfile.TemporaryDirectory(prefix="edgepeft-verify-") as d:
            checked = _verify_tar(target, Path(d))
            checked.opened.close()
            return CheckedBundle(target, checked.manifest, checked.warnings)
    if not target.exists():
        raise EdgepeftError(f"bundle {esc(target)} does not exist", "Check the path")
    return verify(target)


def _verify_tar(target: Path, workdir: Path) -> CheckedBundle:
    from edgepeft.artifacts import is_tar
    from edgepeft.bundle_tar import extract_tar

    if not is_tar(target):
        raise EdgepeftError(f"{esc(target)} is a file but not a bundle tar", "Pass a bundle directory or its .tar")
    return verify(extract_tar(target, workdir / "bundle"))


# ------------------------------------------------------------------------------ inspect
def describe_bundle(p: Path) -> dict:
    """``edgepeft inspect BUNDLE``: what is inside, after the full check."""
    checked = verify_path(p)
    m = checked.manifest
    return {"kind": "bundle", "path": str(p), "verified": True, "base": m["base"]["path"],
            "architecture": m["base"].get("architecture"), "quant": m["base"].get("quant"),
            "fingerprint": m["base_fingerprint"], "adapters": [a["name"] for a in m["adapters"]],
            "onnx": [o["name"] for o in m["onnx"]],
            "files": {rel: f["size"] for rel, f in m["files"].items()},
            "total_bytes": sum(f["size"] for f in m["files"].values()), "warnings": checked.warnings}


_KEEP: list = []  # checked bundles handed to runtimes: their descriptors (and tar extractions) live until exit


def as_artifact(bundle: Path, extra: dict | None = None):
    """A checked bundle as a ``runtimes.base.Artifact`` (GGUF base + its adapters), for bench/runtimes.

    The model and adapter paths are the descriptors the files were hashed through (see :class:`Opened`),
    so the runtime loads exactly the verified bytes; ``names`` maps them back to bundle paths.
    """
    import tempfile

    from edgepeft.runtimes.base import Artifact

    bundle = Path(bundle)
    if bundle.is_file():
        work = tempfile.TemporaryDirectory(prefix="edgepeft-bench-")
        _KEEP.append(work)
        checked = _verify_tar(bundle, Path(work.name))
    else:
        checked = load_checked(bundle)
    _KEEP.append(checked)
    adapters = {n: checked.adapter_path(n) for n in checked.adapter_names}
    names = {checked.base_path: checked.manifest["base"]["path"],
             **{checked.adapter_path(a["name"]): a["path"] for a in checked.manifest["adapters"]}}
    return Artifact(bundle, "gguf", checked.base_path, {**adapters, **(extra or {})},
                    checked.manifest["base"].get("quant"), names=names)
