"""Device profiles: typed, validated views of ``devices/*.yaml``.

A profile says what a target can hold and run: memory, bandwidth (with where the number
comes from), cores, which runtimes and execution providers with which options, which
formats and quant types, and how to reach it. ``bench`` uses it to refuse an artifact that
cannot work there before copying anything, and to pick execution providers.

YAML is loaded with a loader that remembers the line of every key, so a bad value is
reported as ``file:line: field=value is not allowed``.
"""

from __future__ import annotations

import importlib.resources
import math
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from edgepeft.errors import ConfigError, EdgepeftError

RUNTIME_NAMES = ("llama.cpp", "onnxruntime-genai", "onnxruntime")
FORMATS = {
    "gguf": ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q4_k_s", "q5_k_m", "q5_0", "q6_k"),
    "onnx": ("fp32", "fp16", "int8", "int4", "qnn-ctx"),
}
REACH_KINDS = ("local", "ssh", "adb")
# Part of memory the OS, display and other processes keep; the artifact plus KV cache must fit the rest.
DEFAULT_USABLE_FRACTION = 0.75


@dataclass(frozen=True)
class Bandwidth:
    gb_s: float
    source: str


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    providers: tuple[str, ...] = ()  # execution providers / backends, in preference order
    options: dict = field(default_factory=dict)  # runtime options, e.g. n_gpu_layers, n_threads
    provider_options: dict = field(default_factory=dict)  # provider -> {option: value}
    binaries: dict = field(default_factory=dict)  # remote llama-bench / llama-cli paths
    notes: str = ""


@dataclass(frozen=True)
class Reach:
    kind: str = "local"
    uri: str | None = None  # ssh://user@host[:port] or adb://SERIAL
    python: str = "python3"
    workdir: str = "~/edgepeft-bench"
    known_hosts: str | None = None
    timeout_s: float = 20.0
    notes: str = ""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    memory_gb: float
    bandwidth: Bandwidth
    cores: int
    runtimes: dict[str, RuntimeSpec]
    formats: dict[str, tuple[str, ...]]
    reach: Reach
    arch: str = "x86_64"
    usable_fraction: float = DEFAULT_USABLE_FRACTION
    source: str = ""  # the YAML file it came from

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_gb * self.usable_fraction * 1e9)

    def runtime(self, name: str) -> RuntimeSpec:
        if name not in self.runtimes:
            raise EdgepeftError(f"device {self.name} has no runtime {name!r}",
                                f"Runtimes on this device: {', '.join(self.runtimes) or 'none'}")
        return self.runtimes[name]


# ---------------------------------------------------------------- YAML with line numbers
class _LineDict(dict):
    lines: dict
    line: int


def _loader():
    import yaml

    from edgepeft.readers import yaml_loader

    class Loader(yaml_loader()):
        pass

    def construct_mapping(loader, node, deep=False):
        d = _LineDict(loader.construct_mapping(node, deep=True))
        d.lines = {loader.construct_object(k, deep=True): k.start_mark.line + 1 for k, _ in node.value}
        d.line = node.start_mark.line + 1
        return d

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


class _Fields:
    """Read typed fields from one YAML mapping, raising ConfigError with file:line."""

    def __init__(self, data, path: str, prefix: str = ""):
        if not isinstance(data, dict):
            raise EdgepeftError(f"{path}: {prefix or 'profile'} must be a mapping, got {type(data).__name__}",
                                "See devices/x86-64-cpu.yaml for the layout")
        self.data, self.path, self.prefix = data, path, prefix
        self.seen: set[str] = set()

    def where(self, key: str | None = None) -> str:
        lines = getattr(self.data, "lines", {})
        line = lines.get(key) if key is not None else None
        return f"{self.path}:{line or getattr(self.data, 'line', '?')}"

    def get(self, key: str, kind, default=..., allowed: str | None = None, check=None):
        self.seen.add(key)
        name = f"{self.prefix}{key}"
        if key not in self.data:
            if default is ...:
                raise EdgepeftError(f"{self.where()}: missing required field {name!r}",
                                    "See devices/x86-64-cpu.yaml for the layout")
            return default
        value = self.data[key]
        ok = isinstance(value, kind) and not (kind in (int, float, (int, float)) and isinstance(value, bool))
        if ok and check is not None:
            ok = check(value)
        if not ok:
            raise ConfigError(name, value, allowed or _kind_name(kind), source=self.where(key))
        return value

    def done(self):
        extra = [k for k in self.data if k not in self.seen]
        if extra:
            k = extra[0]
            raise EdgepeftError(f"{self.where(k)}: unknown field {self.prefix}{k!r}",
                                f"Allowed here: {', '.join(sorted(self.seen))}")


def _kind_name(kind) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return {str: "a string", int: "an integer", float: "a number", dict: "a mapping", list: "a list",
            bool: "true or false"}.get(kind, kind.__name__)


def _positive(v) -> bool:
    return math.isfinite(v) and v > 0


# Runtime options are typed: each known key has one type and range, anything else is refused
# (they reach llama.cpp here and llama-bench's argv on a remote device).
RUNTIME_OPTIONS = {
    "n_threads": (lambda v: _int(v) and 0 <= v <= 4096, "an integer in [0, 4096] (0 = physical cores)"),
    "n_gpu_layers": (lambda v: _int(v) and -1 <= v <= 100_000, "an integer in [-1, 100000] (999 = all)"),
}
BINARY_KEYS = ("llama_bench", "llama_cli")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_name(v) -> bool:
    return isinstance(v, str) and _NAME.fullmatch(v) is not None


def _plain_path(v: str) -> bool:
    return bool(v) and not v.startswith("-") and not _CONTROL.search(v)


def _plain_word(v: str) -> bool:
    return _plain_path(v) and " " not in v


def _options(opts: dict, field_name: str, where: str) -> dict:
    for k, v in opts.items():
        if k not in RUNTIME_OPTIONS:
            raise ConfigError(field_name, k, ", ".join(RUNTIME_OPTIONS), source=where)
        ok, allowed = RUNTIME_OPTIONS[k]
        if not ok(v):
            raise ConfigError(f"{field_name}.{k}", v, allowed, source=where)
    return dict(opts)


def _provider_options(po: dict, field_name: str, where: str) -> dict:
    out = {}
    for prov, opts in po.items():
        if not _is_name(prov):
            raise ConfigError(field_name, prov, "an execution provider name", source=where)
        if not isinstance(opts, dict):
            raise ConfigError(f"{field_name}.{prov}", opts, "a mapping of option: value", source=where)
        for k, v in opts.items():
            if not _is_name(k) or isinstance(v, (dict, list)) or v is None or \
                    (isinstance(v, str) and _CONTROL.search(v)) or (isinstance(v, float) and not math.isfinite(v)):
                raise ConfigError(f"{field_name}.{prov}.{k}", v, "a string, number or boolean", source=where)
        out[prov] = dict(opts)
    return out


def _binaries(b: dict, field_name: str, where: str) -> dict:
    for k, v in b.items():
        if k not in BINARY_KEYS:
            raise ConfigError(field_name, k, ", ".join(BINARY_KEYS), source=where)
        if not isinstance(v, str) or not v or v.startswith("-") or _CONTROL.search(v):
            raise ConfigError(f"{field_name}.{k}", v, "a path to the binary (no control characters, not starting "
                              "with '-')", source=where)
    return dict(b)


def parse_profile(data, path: str) -> DeviceProfile:
    f = _Fields(data, path)
    name = f.get("name", str)
    bw = _Fields(f.get("bandwidth", dict), path, "bandwidth.")
    bandwidth = Bandwidth(float(bw.get("gb_s", (int, float), check=_positive, allowed="a number > 0")),
                          bw.get("source", str))
    bw.done()
    runtimes = {}
    for rname, spec in f.get("runtimes", dict).items():
        if rname not in RUNTIME_NAMES:
            raise ConfigError("runtimes", rname, ", ".join(RUNTIME_NAMES),
                              source=f"{path}:{data['runtimes'].lines.get(rname, '?')}")
        r = _Fields(spec if spec is not None else _LineDict(), path, f"runtimes.{rname}.")
        runtimes[rname] = RuntimeSpec(
            name=rname,
            providers=tuple(r.get("providers", list, default=[], check=lambda v: all(_is_name(x) for x in v),
                                  allowed="a list of provider names (letters, digits, '.', '_', '-')")),
            options=_options(r.get("options", dict, default={}), f"runtimes.{rname}.options", r.where("options")),
            provider_options=_provider_options(r.get("provider_options", dict, default={}),
                                               f"runtimes.{rname}.provider_options", r.where("provider_options")),
            binaries=_binaries(r.get("binaries", dict, default={}), f"runtimes.{rname}.binaries", r.where("binaries")),
            notes=r.get("notes", str, default=""),
        )
        r.done()
    formats = {}
    for fmt, quants in f.get("formats", dict).items():
        where = f"{path}:{data['formats'].lines.get(fmt, '?')}"
        if fmt not in FORMATS:
            raise ConfigError("formats", fmt, ", ".join(FORMATS), source=where)
        if not isinstance(quants, list):
            raise ConfigError(f"formats.{fmt}", quants, "a list of quant types", source=where)
        for q in quants:
            if q not in FORMATS[fmt]:
                raise ConfigError(f"formats.{fmt}", q, ", ".join(FORMATS[fmt]), source=where)
        formats[fmt] = tuple(quants)
    rd = _Fields(f.get("reach", dict, default=_LineDict(kind="local")), path, "reach.")
    reach = Reach(
        kind=rd.get("kind", str, check=lambda v: v in REACH_KINDS, allowed=", ".join(REACH_KINDS)),
        uri=rd.get("uri", str, default=None, check=lambda v: v.startswith(("ssh://", "adb://")),
                   allowed="ssh://user@host[:port] or adb://SERIAL"),
        python=rd.get("python", str, default="python3", check=_plain_word,
                      allowed="an interpreter path (no spaces or control characters, not starting with '-')"),
        workdir=rd.get("workdir", str, default="~/edgepeft-bench", check=_plain_path,
                       allowed="a directory path (no control characters, not starting with '-')"),
        known_hosts=rd.get("known_hosts", str, default=None, check=_plain_path,
                           allowed="a file path (no control characters, not starting with '-')"),
        timeout_s=float(rd.get("timeout_s", (int, float), default=20.0, check=_positive, allowed="a number > 0")),
        notes=rd.get("notes", str, default=""),
    )
    rd.done()
    prof = DeviceProfile(
        name=name,
        description=f.get("description", str),
        memory_gb=float(f.get("memory_gb", (int, float), check=_positive, allowed="a number > 0")),
        bandwidth=bandwidth,
        cores=f.get("cores", int, check=_positive, allowed="an integer > 0"),
        runtimes=runtimes,
        formats=formats,
        reach=reach,
        arch=f.get("arch", str, default="x86_64", check=lambda v: v in ("x86_64", "arm64"),
                   allowed="x86_64, arm64"),
        usable_fraction=float(f.get("usable_fraction", (int, float), default=DEFAULT_USABLE_FRACTION,
                                    check=lambda v: math.isfinite(v) and 0 < v <= 1, allowed="a number in (0, 1]")),
        source=path,
    )
    f.done()
    return prof


def load_profile_file(path: Path) -> DeviceProfile:
    from edgepeft.readers import MAX_YAML_BYTES, loads_yaml, read_text

    path = Path(path)
    text = read_text(path, "device profile", MAX_YAML_BYTES)
    return parse_profile(loads_yaml(text, str(path), _loader()), str(path))


def shipped_profiles() -> dict[str, Path]:
    root = importlib.resources.files("edgepeft.devices")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def load_profile(spec: str) -> DeviceProfile:
    """A profile by shipped name (``jetson-orin-nano-8gb``) or YAML path."""
    p = Path(spec).expanduser()
    if spec.endswith((".yaml", ".yml")) or p.is_file():
        if not p.is_file():
            raise EdgepeftError(f"device profile {spec} does not exist", "Check the path")
        return load_profile_file(p)
    known = shipped_profiles()
    if spec not in known:
        raise EdgepeftError(f"unknown device {spec!r}",
                            f"Known devices: {', '.join(sorted(known))}, local, ssh://user@host[:port], "
                            "adb://SERIAL, or a profile .yaml path")
    return load_profile_file(known[spec])


def local_profile_name() -> str:
    return "arm64-cpu" if platform.machine().lower() in ("aarch64", "arm64") else "x86-64-cpu"
