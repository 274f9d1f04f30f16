"""Peer tools: the llama.cpp sources vendored in the pinned llama-cpp-python sdist.

``llama_cpp_src()`` downloads the sdist of exactly the installed llama-cpp-python version
with ``pip download --no-binary :all: --no-deps`` (pip's cache makes repeats cheap), extracts
it once into a cache dir, and returns its ``vendor/llama.cpp`` folder. Tests and benchmarks
RUN the peer tools from there (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ...);
their code is never copied into edgepeft. A test that needs a peer FAILS when it cannot be had:
the peer-identity checks are the point of those tests, so they never skip. The first test that needs
the sources fetches the sdist from the package registry (the one network CI has), so ``.ci/run`` stays
the README's two commands; ``python tests/peers.py`` prefetches it by hand.

Use as a fixture: ``from tests.peers import llama_cpp_src`` (session fixture) or call
``peer_dir()`` directly from a benchmark.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

import pytest

# only what the peer converters need: keeps the extraction small and quick
_MEMBERS = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/convert_lora_to_gguf.py",
            "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")


def cache_root() -> Path:
    root = os.environ.get("EDGEPEFT_PEER_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "edgepeft" / "peers"


def peer_dir(members=_MEMBERS) -> Path:
    """Extract (once) the pinned llama-cpp-python sdist; return its vendor/llama.cpp folder."""
    ver = version("llama_cpp_python")
    root = cache_root() / f"llama-cpp-python-{ver}"
    src = root / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp"
    marker = root / ".complete"
    if marker.is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):  # the suite's xdist workers may all ask at once on a clean machine
        if not marker.is_file():
            with tarfile.open(sdist()) as tf:
                prefix = f"llama_cpp_python-{ver}/"
                picked = [m for m in tf.getmembers()
                          if any(m.name.startswith(prefix + want) for want in members) and (m.isfile() or m.isdir())]
                tf.extractall(root, members=picked, filter="data")
            marker.write_text(ver)
    return src


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive flock on ``path`` for the block (other processes wait)."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sdist() -> Path:
    """The pinned llama-cpp-python sdist tarball (``pip download`` into the peer cache once)."""
    ver = version("llama_cpp_python")
    dl = cache_root() / f"llama-cpp-python-{ver}" / "sdist"
    tarballs = list(dl.glob("llama_cpp_python-*.tar.gz"))
    if not tarballs:
        dl.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={ver}", "-d", str(dl), "-q"], check=True, timeout=1800)
        tarballs = list(dl.glob("llama_cpp_python-*.tar.gz"))
    return tarballs[0]


def run_peer(script: str, *args, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a vendored llama.cpp python tool with its own gguf-py (as llama.cpp does)."""
    src = peer_dir()
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("NO_LOCAL_GGUF", None)
    proc = subprocess.run([sys.executable, str(src / script), *map(str, args)], capture_output=True, text=True, check=False,
                          cwd=cwd or src, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"peer {script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def llama_cpp_src() -> Path:
    try:
        return peer_dir()
    except (subprocess.SubprocessError, OSError) as e:
        ver = version("llama_cpp_python")
        pytest.fail(f"the llama.cpp peer tools are not available: the llama-cpp-python {ver} sdist could not be "
                    f"fetched into {cache_root()} ({e}). Fetch it once where the registry is reachable: "
                    f"`python tests/peers.py` (pip download --no-deps --no-binary :all: llama-cpp-python=={ver})")


if __name__ == "__main__":  # prefetch by hand, e.g. before running the suite on a machine without the registry
    print(peer_dir())
