"""``edgepeft quickstart --fast``: the whole story end to end on the real smollm2-135m, CPU."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from edgepeft.bundle import load_checked


@pytest.mark.slow
@pytest.mark.integration
def test_quickstart_fast_runs_end_to_end(tmp_path):
    out = tmp_path / "qs"
    proc = run_cli("quickstart", "--fast", "--out", out, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fast"] is True and summary["train"]["steps"] == 3
    assert set(summary["exports"]) == {"gguf-merged", "gguf-separate", "onnx-merged", "onnx-separate"}
    for step in ("train", "evaluate", "bench", "chart + bundle", "total"):
        assert summary["seconds"][step] > 0
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
