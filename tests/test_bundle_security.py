"""Header sanity checks (edgepeft.security): hostile or broken files stop before native code."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import write_adapter, write_base

from edgepeft.errors import IntegrityError
from edgepeft.security import check_artifact, check_gguf_header, check_onnx_adapter


@pytest.fixture
def base(tmp_path) -> Path:
    return write_base(tmp_path / "base.gguf")


def _mutate(src: Path, dst: Path, fn) -> Path:
    data = bytearray(src.read_bytes())
    fn(data)
    dst.write_bytes(bytes(data))
    return dst


def test_header_matches_gguf_py(base):
    from gguf import GGUFReader

    hdr = check_gguf_header(base)
    r = GGUFReader(str(base))
    assert {t.name: (tuple(int(x) for x in t.shape), int(t.data_offset), int(t.n_bytes)) for t in r.tensors} == \
        {n: (t.ne, t.offset, t.nbytes) for n, t in hdr.tensors.items()}
    assert hdr.metadata["edgepeft.base_fingerprint"] == "a" * 64


CASES = {
    "bad magic": (lambda d: d.__setitem__(slice(0, 4), b"GGUX"), "not a GGUF file"),
    "version 99": (lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 99)), "unsupported GGUF version 99"),
    "huge tensor count": (lambda d: d.__setitem__(slice(8, 16), struct.pack("<Q", 1 << 40)), "implausible"),
    "huge kv count": (lambda d: d.__setitem__(slice(16, 24), struct.pack("<Q", 1 << 40)), "implausible"),
    "key length past end": (lambda d: d.__setitem__(slice(24, 32), struct.pack("<Q", 1 << 60)), "limit"),
    "truncated header": (lambda d: d.__delitem__(slice(40, None)), "truncated"),
    "truncated data": (lambda d: d.__delitem__(slice(len(d) - 100, None)), "past the file end"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_gguf_headers_are_refused(base, tmp_path, case):
    fn, needle = CASES[case]
    bad = _mutate(base, tmp_path / "bad.gguf", fn)
    with pytest.raises(IntegrityError, match=needle):
        check_gguf_header(bad)


def test_tensor_offset_and_dims_are_bounded(tmp_path, base):
    """Flip the first tensor's dims/offset fields, found by walking the real header."""
    hdr = check_gguf_header(base)
    raw = base.read_bytes()
    name = b"token_embd.weight"
    pos = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)  # -> n_dims
    n_dims = struct.unpack_from("<I", raw, pos)[0]
    assert n_dims == len(hdr.tensors["token_embd.weight"].ne)
    dims_at, off_at = pos + 4, pos + 4 + 8 * n_dims + 4
    cases = {
        "rank 9": (pos, struct.pack("<I", 9), "dims"),
        "zero dim": (dims_at, struct.pack("<Q", 0), "dimension 0"),
        "giant dim": (dims_at, struct.pack("<Q", 1 << 50), "dimension"),
        "offset past end": (off_at, struct.pack("<Q", 1 << 40), "past the file end"),
        "misaligned offset": (off_at, struct.pack("<Q", 3), "aligned"),
        "unknown type": (off_at - 4, struct.pack("<I", 999), "unknown ggml type"),
    }
    for label, (at, val, needle) in cases.items():
        bad = _mutate(base, tmp_path / f"{label}.gguf", lambda d, at=at, val=val: d.__setitem__(slice(at, at + len(val)), val))
        with pytest.raises(IntegrityError, match=needle):
            check_gguf_header(bad)


def test_zero_byte_and_directory(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(IntegrityError, match="empty"):
        check_artifact(tmp_path / "empty.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(IntegrityError, match="directory"):
        check_artifact(tmp_path / "dir.gguf")


def test_adapter_gguf_passes(tmp_path):
    hdr = check_gguf_header(write_adapter(tmp_path / "a.gguf", rank=4))
    assert hdr.tensors["blk.0.attn_q.weight.lora_a"].ne == (64, 4)


# --- .onnx_adapter ---------------------------------------------------------------------------

@pytest.fixture
def onnx_adapter(tmp_path) -> Path:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({
        "m.lora_A": ort.OrtValue.ortvalue_from_numpy(np.ones((4, 16), np.float32)),
        "m.lora_B": ort.OrtValue.ortvalue_from_numpy(np.ones((16, 4), np.float16)),
    })
    path = tmp_path / "a.onnx_adapter"
    fmt.export_adapter(str(path))
    return path


def test_onnx_adapter_header_matches_ort(onnx_adapter):
    import onnxruntime as ort

    hdr = check_onnx_adapter(onnx_adapter)
    params = ort.AdapterFormat.read_adapter(str(onnx_adapter)).get_parameters()
    assert {k: tuple(v.numpy().shape) for k, v in params.items()} == {k: p.shape for k, p in hdr.params.items()}
    assert hdr.params["m.lora_B"].data_type == 10 and hdr.format_version == 1


def test_onnx_adapter_corruptions(onnx_adapter, tmp_path):
    raw = onnx_adapter.read_bytes()
    dims_at = raw.index(struct.pack("<qq", 4, 16))
    cases = {
        "identifier": (lambda d: d.__setitem__(slice(4, 8), b"ORTM"), "not an .onnx_adapter"),
        "root offset": (lambda d: d.__setitem__(slice(0, 4), struct.pack("<I", 1 << 30)), "outside the file"),
        "truncated": (lambda d: d.__delitem__(slice(len(d) // 2, None)), "outside the file"),
        "dims vs data": (lambda d: d.__setitem__(slice(dims_at, dims_at + 8), struct.pack("<q", 5)), "data bytes"),
        "negative dim": (lambda d: d.__setitem__(slice(dims_at, dims_at + 8), struct.pack("<q", -4)), "negative"),
    }
    for label, (fn, needle) in cases.items():
        bad = _mutate(onnx_adapter, tmp_path / f"{label.replace(' ', '_')}.onnx_adapter", fn)
        with pytest.raises(IntegrityError, match=needle):
            check_onnx_adapter(bad)


def test_onnx_external_data_cannot_escape(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    t = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "8")):
        t.external_data.add(key=k, value=v)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [t])
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(IntegrityError, match="outside the model folder"):
        check_artifact(path)
    assert onnx.load(str(path), load_external_data=False)  # a valid model otherwise


def test_no_pickle_is_loaded_by_default():
    """Scan our sources: no pickle.load/joblib/dill, np.load only without allow_pickle=True,
    torch.load only with weights_only=True (and only behind --allow-pickle in export/adapter.py)."""
    import ast

    root = Path(__file__).parents[1]
    offenders, private = [], []
    for f in [*root.glob("edgepeft/**/*.py"), *root.glob("export/*.py"), *root.glob("runtimes/*.py")]:
        src = f.read_text()
        lines = src.splitlines()
        for node in ast.walk(ast.parse(src, str(f))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            kw = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            call = f"{owner}.{node.func.attr}"
            if call in ("pickle.load", "pickle.loads", "joblib.load", "dill.load", "cloudpickle.load") or \
                    (call == "np.load" and kw.get("allow_pickle") is True) or \
                    (call == "torch.load" and kw.get("weights_only") is not True):
                where = f"{f.relative_to(root)}:{node.lineno} {call}"
                # the one exception, marked at the call: the verifier's reference child and its parent
                # exchange pickles they wrote themselves (an O_EXCL 0600 temp file, then a pipe); no user file
                (private if "pickle-ok: own child process" in lines[node.lineno - 1] else offenders).append(where)
    assert not offenders, offenders
    assert len(private) == 2, private  # the request the child reads, the results the parent reads
