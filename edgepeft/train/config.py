"""``TrainConfig``: every ``edgepeft train`` option as one typed, self-validating record.

Precedence is CLI flag, then ``--config train.yaml``, then the defaults below. A bad value
raises :class:`ConfigError` naming the field, the value, where it came from and what is
allowed, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from edgepeft.errors import ConfigError, EdgepeftError

BITS = (4, 8, 16, 32)
DEVICES = ("auto", "cpu", "cuda", "mps")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,255}")


@dataclass
class TrainConfig:
    out: str = ""
    base: str = "smollm2-135m"
    data: str | None = None  # JSONL path, or a task name such as "demo"
    task: str | None = None  # bundled task to train on (same as --data NAME)
    rank: int = 16
    alpha: float = 32.0
    dropout: float | None = None  # None: picked per device (trainer.pick_recipe: 0 on a CPU, 0.05 on a GPU)
    target: str = "all-linear"
    bits: int = 4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 512
    seed: int = 42
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 5
    packing: bool = False
    device: str = "auto"
    resume: bool = False
    sources: dict = field(default_factory=dict, repr=False, compare=False)  # field -> "CLI" | yaml path

    def __post_init__(self):
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def _bad(self, name: str, allowed: str):
        raise ConfigError(name.replace("_", "-"), getattr(self, name), allowed, self.sources.get(name))

    def validate(self) -> None:
        if not self.out:
            raise EdgepeftError("no output directory given", "Pass --out RUN_DIR (or out: in the YAML config)")
        if self.data is None and self.task is None:
            raise EdgepeftError("no training data given", "Pass --data FILE.jsonl, or --task demo for the bundled demo")
        if self.data is not None and self.task is not None and self.data != self.task:
            raise EdgepeftError(f"both --data {self.data} and --task {self.task} given", "Pass only one of them")
        for name in ("rank", "batch_size", "grad_accum", "max_seq_len", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                self._bad(name, "an integer >= 1")
        if self.max_seq_len < 16:
            self._bad("max_seq_len", "an integer >= 16")
        if self.save_total_limit < 1:
            self._bad("save_total_limit", "an integer >= 1")
        if self.max_steps == 0 or self.max_steps < -1:
            self._bad("max_steps", "an integer >= 1 (or -1: use --epochs)")
        if not self.alpha > 0:
            self._bad("alpha", "a number > 0")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            self._bad("dropout", "a number in [0, 1)")
        if not 0 < self.lr < 1:
            self._bad("lr", "a number in (0, 1), e.g. 2e-4")
        if not self.epochs > 0:
            self._bad("epochs", "a number > 0")
        if not 0 <= self.warmup_ratio < 1:
            self._bad("warmup_ratio", "a number in [0, 1)")
        if self.weight_decay < 0:
            self._bad("weight_decay", "a number >= 0")
        if self.bits not in BITS:
            self._bad("bits", " | ".join(map(str, BITS)))
        if self.device not in DEVICES:
            self._bad("device", " | ".join(DEVICES))
        if self.scheduler not in SCHEDULERS:
            self._bad("scheduler", " | ".join(SCHEDULERS))
        if self.target != "all-linear" and not all(_MODULE_NAME.fullmatch(t) for t in self.target_modules):
            self._bad("target", "all-linear, or comma-separated module names such as q_proj,v_proj")

    # -- derived ----------------------------------------------------------------------------
    @property
    def target_modules(self) -> str | list[str]:
        if self.target == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.target.split(",") if t.strip()] or [""]

    @property
    def data_name(self) -> str:
        return self.task if self.task is not None else str(self.data)

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def hyperparams(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("sources")
        return d

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_sources(cls, cli: dict, yaml_path: str | None = None) -> TrainConfig:
        """Merge defaults < YAML < CLI (CLI values of ``None`` mean "not given")."""
        values: dict = {}
        sources: dict = {}
        if yaml_path:
            for k, v in load_yaml(yaml_path).items():
                values[k] = _coerce(k, v, yaml_path)
                sources[k] = yaml_path
        for k, v in cli.items():
            if v is not None:
                values[k] = _coerce(k, v, "CLI")
                sources[k] = "CLI"
        return cls(**values, sources=sources)


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(TrainConfig) if f.name != "sources"}


def _coerce(name: str, value, source: str):
    """YAML values arrive untyped; convert to the field's type or name the field."""
    kind = _field_types()[name]
    optional, kind = kind.endswith(" | None"), kind.removesuffix(" | None")
    flag = name.replace("_", "-")
    if value is None and optional:  # YAML null: the default (picked per device for dropout)
        return None
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if value is None:
            return None
        if isinstance(value, (dict, list)):
            raise TypeError
        return str(value)
    except (TypeError, ValueError):
        allowed = {"bool": "true or false", "int": "an integer", "float": "a number"}.get(kind, "a string")
        raise ConfigError(flag, value, allowed, None if source == "CLI" else source) from None


def load_yaml(path: str) -> dict:
    from edgepeft.readers import MAX_YAML_BYTES, loads_yaml, read_text

    p = Path(path)
    if not p.is_file():
        raise EdgepeftError(f"--config {path} does not exist", "Pass a YAML file with TrainConfig fields")
    data = loads_yaml(read_text(p, "--config", MAX_YAML_BYTES), str(path)) or {}
    if not isinstance(data, dict):
        raise EdgepeftError(f"{path}: top level is {type(data).__name__}, expected a mapping",
                            "Write one 'field: value' per line")
    known = _field_types()
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(str(key), value, "fields " + ", ".join(sorted(k.replace("_", "-") for k in known)),
                              path)
        out[name] = value
    return out
