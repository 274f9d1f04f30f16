"""Loading a trained adapter folder onto its base, refusing the wrong base."""

from __future__ import annotations

from pathlib import Path

from edgepeft.errors import EdgepeftError, MismatchError
from edgepeft.keys import RUN_ADAPTER


def run_adapter(path: str | Path) -> Path:
    """RUN_DIR (from ``edgepeft train``) -> RUN_DIR/adapter; any other folder as given (unchecked)."""
    p = Path(path)
    return p / RUN_ADAPTER if (p / RUN_ADAPTER / "adapter_config.json").is_file() else p


def adapter_dir(path: str | Path) -> Path:
    """Accept RUN_DIR or RUN_DIR/adapter; return the folder holding adapter_config.json."""
    p = run_adapter(path)
    if not p.exists():
        raise EdgepeftError(f"--adapter {path} does not exist", "Pass RUN_DIR or RUN_DIR/adapter from edgepeft train")
    if not (p / "adapter_config.json").is_file():
        raise EdgepeftError(f"--adapter {path} has no adapter_config.json",
                            "Pass a PEFT adapter folder (RUN_DIR/adapter from edgepeft train)")
    if not (p / "adapter_model.safetensors").is_file():
        raise EdgepeftError(f"--adapter {path} has no adapter_model.safetensors",
                            "Re-save it with save_pretrained(safe_serialization=True); pickles are never loaded")
    return p


def check_base(adapter: Path, base) -> None:
    from edgepeft.train.manifest import read_manifest, recorded_fingerprint

    manifest = read_manifest(adapter)
    want = recorded_fingerprint(manifest)
    if want and want != base.fingerprint:
        raise MismatchError(f"adapter {adapter} was trained on base fingerprint {want[:12]}, "
                            f"but --base {base.spec} is {base.fingerprint[:12]}",
                            f"Pass the base it was trained on ({manifest['base'].get('spec')})")


def load_adapter(model, path: str | Path, base=None):
    """PeftModel over ``model`` from an adapter folder (checked against ``base`` if given)."""
    from peft import PeftModel

    p = adapter_dir(path)
    if base is not None:
        check_base(p, base)
    return PeftModel.from_pretrained(model, p)
