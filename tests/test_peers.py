"""The peer-tool fixture fails loudly when the llama.cpp sources cannot be had: it never skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_missing_peer_sdist_fails_not_skips(tmp_path):
    (tmp_path / "test_needs_peer.py").write_text(
        "from peers import llama_cpp_src  # noqa: F401\n\n\ndef test_x(llama_cpp_src):\n    assert llama_cpp_src\n")
    env = dict(os.environ, EDGEPEFT_PEER_CACHE=str(tmp_path / "empty-cache"), PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_RETRIES="0", PIP_TIMEOUT="2", PIP_NO_CACHE_DIR="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_needs_peer.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "1 error" in out and "skipped" not in out, out  # fixture failure: an error
    assert "peer tools are not available" in out and "python tests/peers.py" in out, out
