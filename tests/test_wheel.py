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
import re
import shlex
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


# ---------------------------------------------------------------------------- the README, run
# Set-up commands (install, the suite itself) are not run: the venv above is the installation.
SETUP = (("pip",), ("python", "-m", "pip"), ("python", "-m", "pytest"), ("pytest",), (".ci/run",))
# The ONLY changes made to a README command. Each lowers a step or token count, never raises one and
# never touches anything else; a count the command leaves at its default is set (every default is larger).
LOWER = {
    "train": {"--max-steps": 2},  # README: 60 steps (11 min on 2 cores); 2 steps still write adapter + manifest
    "eval": {"--limit": 4},
    "bench": {"--prompt-tokens": 32, "--gen-tokens": 8, "--repetitions": 1, "--ppl-tokens": 64,
              "--swap-cycles": 1, "--task-limit": 2},
}
ALIASES = {"-r": "--repetitions"}
# `edgepeft quickstart` -> `edgepeft quickstart --fast`: the same steps with the FAST plan, which differs
# from FULL only in counts (training steps, eval examples, bench tokens/repetitions; edgepeft/quickstart.py).
QUICKSTART_FAST = "--fast"


def readme_commands(text: str) -> list[str]:
    """Every command of every ```bash block, in order (continuation lines joined, comments dropped)."""
    cmds = []
    for block in re.findall(r"^```bash[ \t]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        logical = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            logical = (logical + line).strip()
            if logical and not logical.startswith("#"):
                cmds.append(logical)
            logical = ""
    return cmds


def is_setup(argv: list[str]) -> bool:
    return any(tuple(argv[: len(s)]) == s for s in SETUP)


def lowered(cmd: str) -> tuple[str, list[str]]:
    """The command to run and the substitutions made (empty: run exactly as written)."""
    argv = shlex.split(cmd, comments=True)
    if len(argv) < 2 or argv[0] != "edgepeft":
        return cmd, []
    sub, notes = argv[1], []
    if sub == "quickstart" and QUICKSTART_FAST not in argv:
        return shlex.join([*argv, QUICKSTART_FAST]), [f"quickstart {QUICKSTART_FAST}"]
    for opt, most in LOWER.get(sub, {}).items():
        names = [opt, *(a for a, o in ALIASES.items() if o == opt)]
        at = next((i for i, a in enumerate(argv) if a in names or a.split("=", 1)[0] in names), None)
        if at is None:
            argv += [opt, str(most)]
            notes.append(f"{opt} {most} (default is larger)")
        elif "=" in argv[at]:
            name, value = argv[at].split("=", 1)
            if float(value) > most:
                argv[at] = f"{name}={most}"
                notes.append(f"{name} {value} -> {most}")
        elif float(argv[at + 1]) > most:
            notes.append(f"{argv[at]} {argv[at + 1]} -> {most}")
            argv[at + 1] = str(most)
    return (shlex.join(argv), notes) if notes else (cmd, [])


def test_lowered_only_lowers_counts():
    assert lowered("edgepeft train --base b --max-steps 60 --lr 1e-3")[0] == "edgepeft train --base b --max-steps 2 --lr 1e-3"
    assert lowered("edgepeft train --max-steps 1")[1] == []  # never raised
    run, notes = lowered("edgepeft bench out/gguf -r 9 --gen-tokens=4 --json b.json")
    assert shlex.split(run)[:7] == ["edgepeft", "bench", "out/gguf", "-r", "1", "--gen-tokens=4", "--json"]
    assert "-r 9 -> 1" in notes and not any(n.startswith("--gen-tokens") for n in notes)
    assert lowered("edgepeft quickstart   # the whole story")[0] == "edgepeft quickstart --fast"
    assert lowered("edgepeft pack --base a.gguf --out bundle/") == ("edgepeft pack --base a.gguf --out bundle/", [])
    assert readme_commands("```bash\n# c\na \\\n  b  # x\n\nc\n```\n```python\nd\n```\n") == ["a    b  # x", "c"]


def test_fast_plan_only_lowers_counts():
    """What makes `quickstart` -> `quickstart --fast` a count-only substitution."""
    from dataclasses import asdict

    from edgepeft.quickstart import FAST, FULL

    for name, full in asdict(FULL).items():
        fast = getattr(FAST, name)
        if isinstance(full, int) and not isinstance(full, bool) and full != fast:
            assert 0 < fast < full, name
        else:
            assert fast == full, (name, fast, full)


@pytest.mark.slow
@pytest.mark.integration
def test_readme_commands_run_verbatim_from_the_installed_wheel(installed, tmp_path):
    """Every README command (set-up excepted) in order, in a new empty directory, with the wheel's
    ``edgepeft``. This is the suite's one quickstart run: the README's ``edgepeft quickstart``
    (default, relative --out) at the FAST plan's counts."""
    from edgepeft.bundle import load_checked

    work = tmp_path / "fresh"
    work.mkdir()
    cmds = [c for c in readme_commands((ROOT / "README.md").read_text()) if not is_setup(shlex.split(c, comments=True))]
    ran = []
    for cmd in cmds:
        run, notes = lowered(cmd)
        proc = run_installed(installed, "bash", "-c", run, cwd=work, timeout=3600)
        assert proc.returncode == 0, f"README command failed: {cmd}\nran: {run} ({'; '.join(notes)})\n{proc.stderr[-3000:]}"
        ran.append((shlex.split(run, comments=True), proc))
    quickstarts = [(argv, p) for argv, p in ran if argv[:2] == ["edgepeft", "quickstart"]]
    assert quickstarts, "the README no longer shows `edgepeft quickstart`, its main command"
    argv, proc = quickstarts[0]
    out = work / (argv[argv.index("--out") + 1] if "--out" in argv else "edgepeft-quickstart")
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
    refs = [r for r in doc["records"] if r.get("reference")]
    arts = [r for r in doc["records"] if not r.get("reference")]
    # the PyTorch rows, base alone and with the adapter, scored on the same examples as every artifact
    assert {(r["runtime"], r["adapter"]) for r in refs} == {("pytorch", "none"), ("pytorch", "demo")}
    totals = {r["accuracy"]["total"] for r in doc["records"]}
    assert totals == {summary["plan"]["task_limit"]}, totals
    for r in arts:
        assert r["tg"]["mean"] > 0 and r["model_bytes"] > 0
        assert r["top1_agree"] is not None, r  # top-1 agreement with PyTorch for every artifact row
    assert (out / "quickstart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checked = load_checked(out / "bundle")  # hashes, headers, fingerprints, names/shapes
    assert checked.adapter_names == ["demo"] and [o["name"] for o in checked.manifest["onnx"]] == ["onnx-separate"]
    assert "gguf-separate" in proc.stdout and "exact match" in proc.stdout
