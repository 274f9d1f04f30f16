"""The product as users install it: the built wheel, non-editable, in a fresh virtual environment.

The wheel is built from the checkout (``pip wheel --no-deps --no-build-isolation``) and
installed into a new venv (``--system-site-packages --no-deps``: the dependencies come from the
environment running the tests, nothing is downloaded). Everything then runs from a directory
outside the checkout, so nothing can be picked up from the source tree: every module of the
installed package imports, ``edgepeft --version`` answers, and ``edgepeft quickstart --fast``
runs the whole story with its default, relative ``--out``. That run is the suite's quickstart
run (there is no second one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgepeft import __version__

ROOT = Path(__file__).resolve().parents[1]
# the design card's layout: source folder -> installed package (setup.py discovers what is inside)
SOURCE_ROOTS = {"edgepeft": "edgepeft", "export": "edgepeft.export", "runtimes": "edgepeft.runtimes",
                "devices": "edgepeft.devices"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    # from a clean copy: setuptools reuses a checkout's build/lib, which still holds modules deleted since
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in SOURCE_ROOTS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
                        dirs_exist_ok=True)
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(src)], check=True, capture_output=True, cwd=tmp)
    whl = next(wheels.glob("edgepeft-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, capture_output=True)
    py = venv / "bin" / "python"
    # --ignore-installed: an edgepeft already in the system site-packages (an editable checkout) stays
    # untouched, and the venv's own copy is the one imported (asserted below)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    str(whl)], check=True, capture_output=True, cwd=tmp)
    outside = tmp / "outside"
    outside.mkdir()
    return {"wheel": whl, "python": py, "bin": venv / "bin", "cwd": outside}


def run_installed(installed, *args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{installed['bin']}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(list(map(str, args)), capture_output=True, text=True, cwd=cwd or installed["cwd"],
                          env=env, timeout=timeout, check=False)


def source_modules() -> set[str]:
    """Every module of the checkout, named as it installs."""
    out = set()
    for folder, package in SOURCE_ROOTS.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = list(f.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out.add(".".join([package, *parts]))
    return out


def test_wheel_holds_every_module_and_the_data(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    shipped = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    assert shipped == source_modules(), (source_modules() - shipped, shipped - source_modules())
    assert {n.split("/")[0] for n in names} == {"edgepeft", f"edgepeft-{__version__}.dist-info"}
    devices = {Path(n).name for n in names if n.startswith("edgepeft/devices/") and n.endswith(".yaml")}
    assert devices == {p.name for p in (ROOT / "devices").glob("*.yaml")}
    data = {Path(n).name for n in names if n.startswith("edgepeft/data/")}
    assert data == {p.name for p in (ROOT / "edgepeft" / "data").iterdir() if p.is_file()}


WALK = """
import importlib, importlib.resources, json, pkgutil, edgepeft
seen = {}
for m in pkgutil.walk_packages(edgepeft.__path__, "edgepeft."):
    if m.name.rsplit(".", 1)[-1] == "__main__":  # importing it runs the CLI
        continue
    seen[m.name] = importlib.import_module(m.name).__file__
devices = sorted(p.name for p in importlib.resources.files("edgepeft.devices").iterdir())
print(json.dumps({"root": edgepeft.__file__, "modules": seen, "devices": devices}))
"""


def test_every_installed_module_imports_from_the_venv(installed):
    proc = run_installed(installed, installed["python"], "-c", WALK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    site = Path(got["root"]).parent
    assert site.parent.name == "site-packages" and Path(installed["bin"]).parent in site.parents, got["root"]
    want = source_modules() - {"edgepeft", "edgepeft.__main__"}
    assert set(got["modules"]) == want, (want - set(got["modules"]), set(got["modules"]) - want)
    for name, file in got["modules"].items():  # none comes from the checkout (or an editable install of it)
        assert Path(file).is_relative_to(site), (name, file)
    assert {p.name for p in (ROOT / "devices").glob("*.yaml")} <= set(got["devices"])


def test_installed_cli_version(installed):
    proc = run_installed(installed, "edgepeft", "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"edgepeft, version {__version__}", proc


@pytest.mark.slow
@pytest.mark.integration
def test_installed_quickstart_fast_from_an_empty_dir(installed, tmp_path):
    """``edgepeft quickstart --fast`` from the wheel, in a new empty directory, default relative --out."""
    from edgepeft.bundle import load_checked

    work = tmp_path / "fresh"
    work.mkdir()
    proc = run_installed(installed, "edgepeft", "quickstart", "--fast", cwd=work, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = work / "edgepeft-quickstart"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fast"] is True and summary["train"]["steps"] == 3
    assert set(summary["exports"]) == {"gguf-merged", "gguf-separate", "onnx-merged", "onnx-separate"}
    for step in ("train", "evaluate", "bench", "chart + bundle", "total"):
        assert summary["seconds"][step] > 0
    for key in ("bench", "chart", "bundle"):  # stored relative to summary.json (edgepeft.paths)
        assert not Path(summary[key]).is_absolute() and (out / summary[key]).exists(), summary[key]
    doc = json.loads((out / "bench.json").read_text())
    seen = {(r["artifact"].rsplit("/", 1)[-1], r["runtime"], r["adapter"]) for r in doc["records"]}
    assert ("gguf-merged", "llama.cpp", "none") in seen
    assert ("gguf-separate", "llama.cpp", "demo") in seen and ("gguf-separate", "llama.cpp", "none") in seen
    assert ("onnx-merged", "onnxruntime-genai", "none") in seen
    assert ("onnx-separate", "onnxruntime-genai", "demo") in seen
    for r in doc["records"]:
        assert r["tg"]["mean"] > 0 and r["model_bytes"] > 0
    assert (out / "quickstart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checked = load_checked(out / "bundle")  # hashes, headers, fingerprints, names/shapes
    assert checked.adapter_names == ["demo"] and [o["name"] for o in checked.manifest["onnx"]] == ["onnx-separate"]
    assert "gguf-separate" in proc.stdout and "exact match" in proc.stdout
