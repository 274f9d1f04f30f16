"""Device profiles: every shipped YAML validates; bad YAML and bad values point at file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepeft.errors import EdgepeftError
from edgepeft.profiles import RUNTIME_NAMES, load_profile, load_profile_file, shipped_profiles

SHIPPED = Path(__file__).parents[1] / "devices"
REQUIRED = {"x86-64-cpu", "arm64-cpu", "jetson-orin-nano-8gb", "jetson-agx-orin", "snapdragon-8-gen-3",
            "snapdragon-x-elite", "apple-m-series"}


def test_shipped_profiles_validate():
    names = set(shipped_profiles())
    assert REQUIRED <= names
    for name in names:
        p = load_profile(name)
        assert p.name == name and p.memory_gb > 0 and p.cores > 0 and p.bandwidth.gb_s > 0
        assert len(p.bandwidth.source) > 20, f"{name}: say where the bandwidth comes from"
        assert set(p.runtimes) <= set(RUNTIME_NAMES) and p.formats
    jetson = load_profile("jetson-orin-nano-8gb")
    assert jetson.runtimes["llama.cpp"].providers[0] == "cuda"
    assert "TensorrtExecutionProvider" in jetson.runtimes["onnxruntime"].providers
    assert "no aarch64 GPU wheels" in jetson.runtimes["onnxruntime"].notes
    for soc, arch in (("snapdragon-8-gen-3", "75"), ("snapdragon-x-elite", "73")):
        qnn = load_profile(soc).runtimes["onnxruntime"].provider_options["QNNExecutionProvider"]
        assert qnn["htp_arch"] == arch and qnn["soc_model"]
    assert "CoreMLExecutionProvider" in load_profile("apple-m-series").runtimes["onnxruntime"].providers


def _variant(tmp_path, old: str, new: str) -> Path:
    text = (SHIPPED / "x86-64-cpu.yaml").read_text()
    assert old in text
    lines = text.replace(old, new).splitlines()
    y = tmp_path / "dev.yaml"
    y.write_text("\n".join(lines) + "\n")
    return y


@pytest.mark.parametrize("old,new,needle", [
    ("memory_gb: 16", "memory_gb: -16", "memory_gb"),
    ("memory_gb: 16", "memory_gb: lots", "memory_gb"),
    ("cores: 8", "cores: 8.5", "cores"),
    ("  gb_s: 51.2", "  gb_s: 0", "bandwidth.gb_s"),
    ("  onnxruntime:\n", "  tflite:\n", "tflite"),
    ("  kind: local", "  kind: carrier-pigeon", "reach.kind"),
    ("arch: x86_64", "arch: x86_64\ncolour: blue", "colour"),
    ("  onnx: [fp32, fp16, int8, int4]", "  onnx: [fp32, int3]", "int3"),
])
def test_bad_value_names_file_and_line(tmp_path, old, new, needle):
    y = _variant(tmp_path, old, new)
    line = next(i + 1 for i, ln in enumerate(y.read_text().splitlines()) if new.strip().split("\n")[-1].strip() in ln)
    with pytest.raises(EdgepeftError) as e:
        load_profile_file(y)
    msg = str(e.value)
    assert needle in msg and f"dev.yaml:{line}" in msg, msg


def test_missing_field_and_bad_yaml(tmp_path):
    y = _variant(tmp_path, "cores: 8\n", "")
    with pytest.raises(EdgepeftError, match="missing required field 'cores'"):
        load_profile_file(y)
    y.write_text("name: x\nmemory_gb: [1,\n  2\n")
    with pytest.raises(EdgepeftError, match=r"dev.yaml:\d+: invalid YAML"):
        load_profile_file(y)


def test_unknown_device_lists_known():
    with pytest.raises(EdgepeftError) as e:
        load_profile("pocket-calculator")
    assert "unknown device" in str(e.value) and "jetson-agx-orin" in str(e.value)
