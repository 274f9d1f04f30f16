"""Load and validate a PEFT LoRA adapter against its base, producing an :class:`AdapterPlan`.

Everything the writers cannot carry is refused here, once, with the reason and the exports
that could carry it. Shapes are checked against the base's safetensors headers (no model
load), and the base fingerprint recorded by ``edgepeft train`` in ``RUN_DIR/manifest.json``
(the adapter folder's parent) is compared with the base we were given.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from edgepeft.errors import ConfigError, EdgepeftError, IntegrityError, MismatchError
from edgepeft.export.plan import AdapterPlan, LoraModule
from edgepeft.fingerprint import read_safetensors_header, sha256_file, short
from edgepeft.models import ResolvedBase
from edgepeft.train.adapter import run_adapter
from edgepeft.train.manifest import read_manifest, recorded_fingerprint

SAFE_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# "base_model.model.<target>.lora_A[.<adapter>].weight" / "...lora_embedding_A[.<adapter>]"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<target>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                  r"(?:\.[^.]+)?(?:\.weight)?$")
# PEFT init schemes that rewrite the base weights: the adapter only fits that rewritten base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "eva")

_MERGE_HINT = ("only a merged export could carry it; merge with PEFT's merge_and_unload(), save_pretrained the result "
               "and pass that folder as --base")


def load_adapter(path, base: ResolvedBase, *, name: str | None = None, force: bool = False,
                 allow_pickle: bool = False) -> AdapterPlan:
    """Load the PEFT LoRA adapter in folder ``path`` and check it against ``base``."""
    folder = run_adapter(path)  # RUN_DIR from edgepeft train, or the PEFT folder itself
    config = _read_config(folder)
    _refuse_unsupported_config(folder, config)
    weights_file, tensors = _read_tensors(folder, allow_pickle)
    groups = _group(folder, tensors, base, config.get("modules_to_save") or [])
    base_shapes = {t.name: (t.shape, t) for t in base.tensors()}  # headers only, no weights read
    modules = {}
    for target in sorted(groups, key=natural_key):
        a, b = groups[target]
        _check_shapes(folder, target, a, b, base, base_shapes)
        r = int(a.shape[0])
        cfg_r, alpha = _rank_alpha(config, target)
        if cfg_r != r:
            raise IntegrityError(
                f"adapter {folder}: {target} has rank {r} in its tensors but adapter_config.json says r={cfg_r}",
                "The config and weights disagree; re-save the adapter with save_pretrained")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[target] = LoraModule(target=target, a=a, b=b, scale=float(scale), alpha=float(alpha))
    if not modules:
        raise EdgepeftError(f"adapter {folder} holds no LoRA tensors (no lora_A/lora_B weights)",
                            "Pass the folder written by PeftModel.save_pretrained")
    manifest = read_manifest(folder)
    recorded = recorded_fingerprint(manifest)
    if recorded and recorded != base.fingerprint and not force:
        raise MismatchError(
            f"adapter {folder} was trained on base {short(recorded)} but --base {base.spec} is {short(base.fingerprint)}",
            "Pass the base it was trained on, or --force if you know the weights are equivalent")
    from edgepeft.readers import NAME_RULE, is_name

    name = name or _default_name(folder)
    if not is_name(name):
        raise EdgepeftError(f"adapter name {name!r} (from --name or the folder name) is not allowed",
                            f"Allowed: {NAME_RULE}; pass --name")
    return AdapterPlan(name=name, modules=modules, adapter_sha256=sha256_file(weights_file),
                       base_fingerprint=recorded or None, source=folder.resolve(), base_path=base.path,
                       train_summary={k: v for k, v in manifest.items() if k != "base_fingerprint"})


def load_adapters(paths, base: ResolvedBase, names=None, *, force: bool = False,
                  allow_pickle: bool = False) -> list[AdapterPlan]:
    """Several adapters for one base. Names default to the folder names and must be unique."""
    paths = [Path(p) for p in paths]
    names = list(names or [])
    if names and len(names) != len(paths):
        raise EdgepeftError(f"{len(names)} names given for {len(paths)} adapters", "Pass one --name per --adapter")
    plans = [load_adapter(p, base, name=(names[i] if names else None), force=force, allow_pickle=allow_pickle)
             for i, p in enumerate(paths)]
    seen: dict[str, Path] = {}
    for plan in plans:
        if plan.name in seen:
            raise EdgepeftError(f"two adapters are both named {plan.name!r} ({seen[plan.name]} and {plan.source})",
                                "Give each a distinct --name")
        seen[plan.name] = plan.source
    return plans


def natural_key(name: str):
    """Model order: layers.2 before layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _default_name(folder: Path) -> str:
    folder = folder.resolve()
    # a training run writes RUN_DIR/adapter: the run's name says more than "adapter"
    return folder.parent.name if folder.name == "adapter" and folder.parent.name else folder.name


def _read_config(folder: Path) -> dict:
    from edgepeft.readers import read_json

    if not folder.is_dir():
        raise EdgepeftError(f"adapter {folder} is not a directory", "Pass the folder written by PeftModel.save_pretrained")
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise EdgepeftError(f"{folder} is not a PEFT adapter (no adapter_config.json)",
                            "Pass the folder written by PeftModel.save_pretrained")
    config = read_json(cfg_path, "adapter config", expect=dict, limit=1 << 20)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise EdgepeftError(f"adapter {folder} is a {peft_type[:40] or 'unknown'} adapter, edgepeft exports LoRA only",
                            "Train a LoRA adapter (peft_type LORA)")
    _check_config_types(config, cfg_path)
    return config


MAX_RANK = 1 << 16


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_config_types(cfg: dict, where: Path) -> None:
    """adapter_config.json's fields the exporters use, typed: one line naming the field and what is allowed."""
    rank_ok = lambda v: _is_int(v) and 1 <= v <= MAX_RANK
    checks = {
        "r": (rank_ok, f"an integer in [1, {MAX_RANK}]"),
        "lora_alpha": (_is_finite, "a finite number"),
        "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
        "use_dora": (lambda v: isinstance(v, bool), "true or false"),
        "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
        "target_modules": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                           "a string or a list of strings"),
        "modules_to_save": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
        "rank_pattern": (lambda v: isinstance(v, dict), "an object {module pattern: rank}"),
        "alpha_pattern": (lambda v: isinstance(v, dict), "an object {module pattern: alpha}"),
    }
    for key, (ok, allowed) in checks.items():
        if cfg.get(key) is not None and not ok(cfg[key]):
            raise ConfigError(key, cfg[key], allowed, source=str(where))
    for key, ok, allowed in (("rank_pattern", rank_ok, f"an integer rank in [1, {MAX_RANK}]"),
                             ("alpha_pattern", _is_finite, "a finite number")):
        for pattern, value in (cfg.get(key) or {}).items():
            check_module_pattern(pattern, f"{key} key", where)
            if not ok(value):
                raise ConfigError(f"{key}[{pattern!r}]", value, allowed, source=str(where))


MAX_PATTERN = 256
MAX_TARGET = 512
MAX_UNBOUNDED = 2


def check_module_pattern(pattern: str, what: str, where) -> None:
    """A rank/alpha pattern is PEFT's module regex, restricted so matching stays polynomial and small.

    Allowed: at most ``MAX_PATTERN`` characters; literals, ``.``, classes, groups and alternation;
    repeats only of a single character, class or ``.`` (so no ``(a+)+`` and no ``(a|aa)*``: the
    nested or ambiguous repeats that make a backtracking engine exponential), at most
    ``MAX_UNBOUNDED`` of them unbounded; no backreferences or lookarounds. Every pattern PEFT's
    docs and real adapters use (module names, ``layers.\\d+``, ``.*q_proj``) fits.
    """
    import re._constants as sc
    import re._parser as sp

    allowed = ("a module-name regex of at most 256 characters: literals, '.', classes, groups, '|', and repeats "
               "of a single character or class (at most 2 unbounded); no nested repeats, backreferences or lookarounds")
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN:
        raise ConfigError(what, pattern, allowed, source=str(where))
    try:
        parsed = sp.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        raise ConfigError(what, pattern, allowed, source=str(where)) from None
    simple = {sc.LITERAL, sc.NOT_LITERAL, sc.ANY, sc.IN}
    forbidden = {sc.GROUPREF, sc.GROUPREF_EXISTS, sc.ASSERT, sc.ASSERT_NOT, getattr(sc, "ATOMIC_GROUP", sc.GROUPREF)}
    unbounded = 0

    def walk(items, depth=0):
        nonlocal unbounded
        if depth > 16:
            raise ConfigError(what, pattern, allowed, source=str(where))
        for op, av in items:
            if op in (sc.MAX_REPEAT, sc.MIN_REPEAT, getattr(sc, "POSSESSIVE_REPEAT", None)):
                _lo, hi, body = av
                if len(body) != 1 or body[0][0] not in simple:
                    if hi == sc.MAXREPEAT or hi > 1:  # `(x)?` is fine; a repeated group is not
                        raise ConfigError(what, pattern, allowed, source=str(where))
                    walk(body, depth + 1)
                if hi == sc.MAXREPEAT:
                    unbounded += 1
            elif op == sc.SUBPATTERN:
                walk(av[3], depth + 1)
            elif op == sc.BRANCH:
                for b in av[1]:
                    walk(b, depth + 1)
            elif op in forbidden:
                raise ConfigError(what, pattern, allowed, source=str(where))

    walk(list(parsed))
    if unbounded > MAX_UNBOUNDED:
        raise ConfigError(what, pattern, allowed, source=str(where))


def _refuse_unsupported_config(folder: Path, cfg: dict) -> None:
    if cfg.get("use_dora"):
        raise EdgepeftError(f"adapter {folder} uses DoRA (use_dora=true): its magnitude vectors rescale whole weight "
                            "columns, which neither GGUF nor ONNX LoRA adapters can express", _MERGE_HINT)
    if cfg.get("lora_bias"):
        raise EdgepeftError(f"adapter {folder} trains LoRA biases (lora_bias=true), which the adapter formats cannot carry",
                            _MERGE_HINT)
    if cfg.get("fan_in_fan_out"):
        raise EdgepeftError(f"adapter {folder} has fan_in_fan_out=true (Conv1D layers), unsupported for llama/qwen2",
                            "Train with nn.Linear targets (fan_in_fan_out=false)")
    for key in ("layer_replication", "target_parameters", "trainable_token_indices"):
        if cfg.get(key):
            raise EdgepeftError(f"adapter {folder} uses {key}={cfg[key]!r}, which the exporters cannot carry", _MERGE_HINT)
    init = str(cfg.get("init_lora_weights", "true")).lower()
    if init.startswith(_BASE_REWRITING_INITS):
        raise EdgepeftError(f"adapter {folder} was initialised with init_lora_weights={init!r}, which rewrites the base "
                            "weights, so it does not fit the original base",
                            "Save it with save_pretrained(path_initial_model_for_weight_conversion=...) to get a plain LoRA")


def _read_tensors(folder: Path, allow_pickle: bool):
    """Return (weights file, {key: fp32 tensor}). Pickle only when explicitly allowed."""
    safe, pickled = folder / SAFE_NAME, folder / PICKLE_NAME
    if safe.is_file():
        tensors = _load_safetensors(safe)
        weights_file = safe
    elif pickled.is_file():
        if not allow_pickle:
            raise EdgepeftError(f"adapter {folder} is a pickle file ({PICKLE_NAME}); edgepeft never unpickles by default",
                                "Re-save with save_pretrained(safe_serialization=True), or pass --allow-pickle if you "
                                "trust the file")
        import torch

        tensors = torch.load(pickled, map_location="cpu", weights_only=True)
        weights_file = pickled
    else:
        raise EdgepeftError(f"adapter {folder} has no weights ({SAFE_NAME} missing)",
                            "Pass the folder written by PeftModel.save_pretrained")
    return weights_file, {k: v.float() for k, v in tensors.items()}


MAX_ADAPTER_FILE = 4 << 30


def _load_safetensors(path: Path) -> dict:
    """The adapter's tensors from ONE bounded read (safetensors' load_file mmaps the file, so a file that
    shrinks meanwhile would SIGBUS); the header is checked by our own reader first."""
    from safetensors.torch import load

    from edgepeft.readers import read_bytes

    read_safetensors_header(path)  # named IntegrityError on a truncated/corrupt header
    raw = read_bytes(path, "adapter weights", MAX_ADAPTER_FILE)
    try:
        return load(raw)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError/ValueError
        raise IntegrityError(f"{path} is not a readable safetensors file ({type(e).__name__})",
                             "Re-save the adapter with save_pretrained") from None


def _group(folder: Path, tensors: dict, base: ResolvedBase, to_save: list[str]) -> dict[str, tuple]:
    """{target: (a (r,in), b (out,r))} in nn.Linear orientation; refuse tensors we cannot carry."""
    tied = bool(base.config.get("tie_word_embeddings", False))
    parts: dict[str, dict] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        module = key.split(".modules_to_save.")[0].removeprefix("base_model.model.").removesuffix(".weight")
        if ".modules_to_save." in key or (not m and any(module.split(".")[-1] == n or module == n for n in to_save)):
            raise EdgepeftError(f"adapter {folder} saves a full copy of {module} (modules_to_save): the adapter formats "
                                "carry only low-rank A/B pairs", _MERGE_HINT)
        if ".base_layer." in key:
            # PEFT saves the whole embedding matrix when embeddings are targeted; it must equal the base's.
            _check_saved_base_layer(folder, key, t, base)
            continue
        if not m:
            raise EdgepeftError(f"adapter {folder} has tensor {key}, which is not a LoRA A/B weight",
                                "edgepeft exports plain LoRA adapters only; " + _MERGE_HINT)
        target, kind = m["target"], m["kind"]
        leaf = target.rsplit(".", 1)[-1]
        if tied and (leaf == "lm_head" or "embed_tokens" in leaf):
            raise EdgepeftError(
                f"adapter {folder} puts LoRA on {target}, but the base ties its input and output embeddings, so the "
                "update would change both at once",
                "Only a merged GGUF export with an untied output.weight could carry it; retrain without "
                f"{leaf} in target_modules")
        if kind.startswith("lora_embedding"):
            # nn.Embedding: ΔW (vocab, hidden) = (B @ A)ᵀ with A (r, vocab), B (hidden, r);
            # normalise to ΔW = b @ a with a = Bᵀ (r, hidden), b = Aᵀ (vocab, r).
            kind, t = ("lora_B", t.t()) if kind.endswith("A") else ("lora_A", t.t())
        parts.setdefault(target, {})[kind] = t.contiguous()
    groups = {}
    for target, p in parts.items():
        if set(p) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(p)).pop()
            raise IntegrityError(f"adapter {folder}: {target} has no {missing} tensor", "Re-save the adapter")
        groups[target] = (p["lora_A"], p["lora_B"])
    return groups


def _check_saved_base_layer(folder: Path, key: str, t, base: ResolvedBase) -> None:
    from safetensors import safe_open

    name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
    entry = next((e for e in base.tensors() if e.name == name), None)
    if entry is None or tuple(entry.shape) != tuple(t.shape):
        raise EdgepeftError(f"adapter {folder} carries a full {name} of shape {tuple(t.shape)} that the base does not "
                            "have (resized vocabulary?)", _MERGE_HINT)
    with safe_open(str(entry.file), "pt") as f:
        same = bool((f.get_tensor(name).float() == t).all())
    if not same:
        raise EdgepeftError(f"adapter {folder} carries a modified full copy of {name}", _MERGE_HINT)


def _check_shapes(folder, target, a, b, base, base_shapes) -> None:
    entry = base_shapes.get(target + ".weight")
    if entry is None:
        raise MismatchError(f"adapter {folder} targets {target}, but base {base.spec} has no tensor {target}.weight",
                            "Pass the base the adapter was trained on")
    want = tuple(entry[0])
    if len(want) != 2 or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise MismatchError(f"adapter {folder}: {target} has A {tuple(a.shape)} and B {tuple(b.shape)}, which do not "
                            f"form a LoRA update of {target}.weight {want}", "Pass the base it was trained on")
    out_f, in_f = want
    for tensor, dim, n, what in ((a, 1, in_f, "lora_A"), (b, 0, out_f, "lora_B")):
        if tensor.shape[dim] != n:
            raise MismatchError(f"adapter {folder}: {target}.{what} has shape {tuple(tensor.shape)}, but base "
                                f"{target}.weight is {want}", "Pass the base the adapter was trained on")


def _rank_alpha(cfg: dict, target: str) -> tuple[int, float]:
    """PEFT's own rule (peft.utils.other.get_pattern_key): the first pattern matching the key's tail.

    PEFT tests ``re.match(rf"(.*\\.)?({key})$", target)``; here the same thing is ``fullmatch`` of the
    pattern against ``target`` or one of its suffixes after a '.', on a bounded name with a pattern
    that :func:`check_module_pattern` accepted (no ``$``-before-newline quirk, no backtracking blow-up).
    """
    if len(target) > MAX_TARGET:
        raise EdgepeftError(f"module name {target[:60]!r}... is {len(target)} characters long",
                            f"Allowed: at most {MAX_TARGET}; this is not a model module")
    tails = [target] + [target[i + 1:] for i, c in enumerate(target) if c == "."]

    def lookup(patterns: dict, default):
        for key, value in (patterns or {}).items():
            rx = re.compile(key)
            if any(rx.fullmatch(t) for t in tails):
                return value
        return default

    return int(lookup(cfg.get("rank_pattern"), cfg.get("r", 8))), float(lookup(cfg.get("alpha_pattern"),
                                                                              cfg.get("lora_alpha", 8)))

