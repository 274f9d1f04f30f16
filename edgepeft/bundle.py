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
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from edgepeft import __version__, atomic
from edgepeft.bundle_fit import (  # noqa: F401 - re-exported: the bundle API in one place
    GGUFArtifact,
    _adapter_record,
    adapter_fit_problem,
    check_adapter_fits,
    read_gguf,
)
from edgepeft.errors import EdgepeftError, IntegrityError, MismatchError
from edgepeft.fingerprint import sha256_file, short

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
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
    if not _NAME.match(name or ""):
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
ONNX_SIDECARS = ("edgepeft-onnx.json",)  # written by export/onnx.py


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
    try:
        side = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{sidecar} is not valid JSON ({e})", "Re-export the ONNX folder") from e
    for f in files:
        if f.suffix in (".onnx", ".onnx_adapter"):
            check_artifact(f)
    adapters = sorted(f.relative_to(src).as_posix() for f in files if f.suffix == ".onnx_adapter")
    _check_onnx_fits(src.parent, {"path": src.name, "adapters": adapters})
    for a in side.get("adapters") or []:
        if isinstance(a, dict) and a.get("base_fingerprint") not in (None, (side.get("base") or {}).get("fingerprint")):
            raise MismatchError(f"--onnx {src}: adapter {a.get('name')} was trained on another base "
                                f"({short(str(a['base_fingerprint']))})", "Re-export it with the base it was trained on")
    quant = side.get("quant") or side.get("precision") or "int4"
    runtimes = ["onnxruntime"] if any(f.name.endswith("_ctx.onnx") for f in files) else ["onnxruntime-genai"]
    fp = side.get("base_fingerprint") or (side.get("base") or {}).get("fingerprint")
    return {"name": name, "format": "onnx", "mode": side.get("mode") or ("separate" if adapters else "merged"),
            "quant": quant, "base_fingerprint": fp, "adapters": adapters, "sidecar": sidecar.name,
            "_src": src, "_files": files, "_bytes": sum(f.stat().st_size for f in files), "_runtimes": runtimes}


def _regular_files(src: Path) -> list[Path]:
    out = []
    for p in sorted(src.rglob("*")):
        if p.is_symlink():
            raise EdgepeftError(f"{p} is a symbolic link", "Bundles hold regular files only; copy the target in")
        if p.is_file() and not p.name.startswith(atomic.TMP_PREFIX):
            out.append(p)
    return out


def _check_onnx_fits(root: Path, rec: dict) -> None:
    """Every .onnx_adapter in a separate-mode folder must fit its model's LoRA inputs (names, shapes)."""
    if not rec.get("adapters"):
        return
    from edgepeft.export.onnx_adapters import check_onnx_adapter_fits

    folder = root / rec["path"]
    for a in rec["adapters"]:
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
    name = given or art.meta.get("adapter.name") or art.meta.get("adapter_name") or art.path.stem
    return _check_name(str(name), "adapter")


def _base_record(art: GGUFArtifact) -> dict:
    if art.kind != "model":
        raise EdgepeftError(f"--base {art.path} is a GGUF {art.kind}, not a model", "Pass the base model .gguf")
    fp = art.fingerprint
    if fp is None:
        raise EdgepeftError(f"--base {art.path} records no base fingerprint (edgepeft.base_fingerprint)",
                            "Export the base with edgepeft export --format gguf --mode separate")
    quant = str(art.meta.get("quant") or art.ggml_type_name())
    return {"format": "gguf", "mode": art.meta.get("mode"), "architecture": art.header.metadata.get("general.architecture"),
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
    adapters, onnx = _plan(inp, read_gguf(out / base_rel), manifest["base_fingerprint"], taken)
    _write_new_files(out, manifest, adapters, onnx, final=True)
    manifest["edgepeft_version"] = __version__
    write_manifest(out, manifest)
    return manifest


# ------------------------------------------------------------------------------- verify
@dataclass
class CheckedBundle:
    """A bundle that passed every check; hand its paths (and only these) to runtimes."""

    root: Path
    manifest: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def base_path(self) -> Path:
        return self.root / self.manifest["base"]["path"]

    @property
    def adapter_names(self) -> list[str]:
        return [a["name"] for a in self.manifest["adapters"]]

    def adapter_path(self, name: str) -> Path:
        for a in self.manifest["adapters"]:
            if a["name"] == name:
                return self.root / a["path"]
        raise EdgepeftError(f"bundle {self.root} has no adapter {name!r}",
                            f"Adapters in it: {', '.join(self.adapter_names) or 'none'}")

    def onnx_path(self, name: str) -> Path:
        for o in self.manifest["onnx"]:
            if o["name"] == name:
                return self.root / o["path"]
        raise EdgepeftError(f"bundle {self.root} has no ONNX folder {name!r}",
                            f"ONNX folders in it: {', '.join(o['name'] for o in self.manifest['onnx']) or 'none'}")


def read_manifest(root: Path) -> dict:
    root = Path(root)
    if root.name.startswith(atomic.TMP_PREFIX):
        raise IntegrityError(f"{root} is an unfinished write left by an interrupted edgepeft run",
                             "Delete it and run the command again")
    if not root.is_dir():
        raise EdgepeftError(f"bundle {root} is not a directory", "Pass the folder written by edgepeft pack (or its .tar)")
    mpath = root / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        raise IntegrityError(f"bundle {root} has no {MANIFEST}", "Pass a folder written by edgepeft pack")
    raw = mpath.read_bytes()
    try:
        m = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{mpath} is not valid JSON ({e})", "Re-pack the bundle") from e
    if not isinstance(m, dict) or m.get("manifest_version") != MANIFEST_VERSION:
        found = m.get("manifest_version") if isinstance(m, dict) else type(m).__name__
        raise IntegrityError(f"{mpath}: manifest_version {found!r} is not supported (this edgepeft reads "
                             f"{MANIFEST_VERSION})", "Re-pack the bundle with this edgepeft version")
    for key, kind in (("files", dict), ("base", dict), ("adapters", list), ("onnx", list), ("base_fingerprint", str)):
        if not isinstance(m.get(key), kind):
            raise IntegrityError(f"{mpath}: field {key!r} is missing or not a {kind.__name__}", "Re-pack the bundle")
    _check_seal(mpath, raw, m)
    entries = [("base", m["base"])] + [(f"adapters[{i}]", a) for i, a in enumerate(m["adapters"])] + \
        [(f"onnx[{i}]", o) for i, o in enumerate(m["onnx"])]
    for where, e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("path"), str) or \
                (where != "base" and not isinstance(e.get("name"), str)):
            raise IntegrityError(f"{mpath}: {where} needs a string 'path'" + ("" if where == "base" else " and 'name'"),
                                 "Re-pack the bundle")
    return m


def verify(root: Path) -> CheckedBundle:
    """Every check, in order; raise on the first failure, naming it. Returns the checked bundle."""
    from edgepeft.security import check_artifact

    root = Path(root)
    m = read_manifest(root)
    for rel, rec in m["files"].items():
        p = safe_member(root, rel)
        if not p.is_file():
            raise IntegrityError(f"bundle file {rel} is missing", "Re-pack the bundle")
        if not isinstance(rec, dict) or p.stat().st_size != rec.get("size"):
            raise IntegrityError(f"bundle file {rel} has {p.stat().st_size} bytes, the manifest says "
                                 f"{rec.get('size') if isinstance(rec, dict) else rec}", "The file was changed or truncated")
        got = sha256_file(p)
        if got != rec.get("sha256"):
            raise IntegrityError(f"bundle file {rel} fails its hash check (sha256 {got[:16]}, manifest "
                                 f"{str(rec.get('sha256'))[:16]})", "The file was modified or corrupted; re-pack")
    referenced = [m["base"].get("path")] + [a.get("path") for a in m["adapters"]]
    for rel in referenced:
        if rel not in m["files"]:
            raise IntegrityError(f"manifest names {rel!r} but records no hash for it", "Re-pack the bundle")
    for rel in m["files"]:
        if rel.endswith((".gguf", ".onnx_adapter", ".onnx")):
            check_artifact(root / rel)
    base = read_gguf(root / m["base"]["path"])
    if base.fingerprint != m["base_fingerprint"]:
        raise MismatchError(f"base {m['base']['path']} has fingerprint {short(str(base.fingerprint))}, the manifest "
                            f"says {short(m['base_fingerprint'])}", "Re-pack the bundle")
    for a in m["adapters"]:
        check_adapter_fits(base, read_gguf(root / a["path"]), m["base_fingerprint"])
    for o in m["onnx"]:
        if o.get("base_fingerprint") != m["base_fingerprint"]:
            raise MismatchError(f"ONNX folder {o.get('name')} is for base {short(str(o.get('base_fingerprint')))}, "
                                f"the bundle base is {short(m['base_fingerprint'])}", "Re-pack the bundle")
        for a in o.get("adapters", []):
            if f"{o['path']}/{a}" not in m["files"]:
                raise IntegrityError(f"ONNX adapter {o['path']}/{a} has no hash in the manifest", "Re-pack the bundle")
        _check_onnx_fits(root, o)
    listed = set(m["files"]) | {MANIFEST}
    warnings = [f"unlisted file {p.relative_to(root).as_posix()} (ignored; never loaded)"
                for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).as_posix() not in listed]
    return CheckedBundle(root, m, warnings)


def load_checked(bundle_dir: Path) -> CheckedBundle:
    """The gate before any runtime load: a bundle that fails any check is never returned."""
    return verify(bundle_dir)


def verify_path(target: Path) -> CheckedBundle:
    """verify a bundle directory, or a .tar extracted into a throwaway directory."""
    import tempfile

    from edgepeft.bundle_tar import extract_tar

    target = Path(target)
    if target.name.startswith(atomic.TMP_PREFIX):
        raise IntegrityError(f"{target} is an unfinished write left by an interrupted edgepeft run",
                             "Delete it and run the command again")
    if target.is_file() and tarfile.is_tarfile(target):
        with tempfile.TemporaryDirectory(prefix="edgepeft-verify-") as d:
            checked = verify(extract_tar(target, Path(d) / "bundle"))
            return CheckedBundle(target, checked.manifest, checked.warnings)
    if target.is_file():
        raise EdgepeftError(f"{target} is a file but not a bundle tar", "Pass a bundle directory or its .tar")
    if not target.exists():
        raise EdgepeftError(f"bundle {target} does not exist", "Check the path")
    return verify(target)


# ------------------------------------------------------------------------------ inspect
def is_bundle(p: Path) -> bool:
    return (p.is_dir() and (p / MANIFEST).is_file()) or (p.is_file() and p.suffix == ".tar")


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


def as_artifact(bundle_dir: Path, extra: dict | None = None):
    """A checked bundle as a ``runtimes.base.Artifact`` (GGUF base + its adapters), for bench/runtimes."""
    from edgepeft.runtimes.base import Artifact

    checked = load_checked(bundle_dir)
    adapters = {n: checked.adapter_path(n) for n in checked.adapter_names}
    return Artifact(Path(bundle_dir), "gguf", checked.base_path, {**adapters, **(extra or {})},
                    checked.manifest["base"].get("quant"))
