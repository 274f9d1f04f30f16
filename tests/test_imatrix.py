"""The importance matrix through the real CLI: from a training run's data, in llama.cpp's imatrix GGUF
format (read back by the vendored gguf-py), recorded in the artifact and the record, and what it buys:
llama.cpp's quantizer given the matrix lands closer to the weights where the calibration inputs are
large (the error it weighs), and --imatrix none gives another file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error, run_cli
from lora_factory import make_lora
from peers import peer_dir
from test_calib_select import make_run

ROWS = [{"prompt": f"Ship {i % 9} blue lamps to Oslo, order {1000 + i}.",
         "completion": f'{{"qty":{i % 9},"city":"Oslo","order":{1000 + i}}}'} for i in range(40)]
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def vendored_read(path: Path) -> dict:
    """Fields and tensors of a GGUF as the llama.cpp sources' own gguf-py reads them."""
    code = ("import json, sys, gguf\n"
            "r = gguf.GGUFReader(sys.argv[1])\n"
            "kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith('GGUF.')}\n"
            "types = {k: [t.name for t in f.types] for k, f in r.fields.items() if not k.startswith('GGUF.')}\n"
            "t = {x.name: {'type': x.tensor_type.name, 'ne': [int(n) for n in x.shape],"
            " 'sum': float(x.data.astype('float64').sum()) if x.tensor_type.name == 'F32' else None} for x in r.tensors}\n"
            "print(json.dumps({'kv': kv, 'types': types, 'tensors': t}, default=str))\n")
    env = dict(os.environ, PYTHONPATH=str(peer_dir() / "gguf-py"))
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("imatrix")
    adapter = make_lora(tiny_llama, root / "lora", seed=3, b_std=0.05)
    return make_run(root, ROWS, adapter=adapter)


@pytest.fixture(scope="module")
def exports(run_dir, tiny_llama):
    """The same merged q4_k_m export with the run's matrix and with --imatrix none (relative paths, from the run's parent)."""
    cwd = run_dir.parent
    out = {}
    for tag, extra in (("with", ()), ("none", ("--imatrix", "none"))):
        proc = run_cli("export", "--base", tiny_llama, "--adapter", "run", "--quant", "q4_k_m", "--merge-into",
                       "original", "--no-verify", "--json", "--out", f"out-{tag}", *extra, cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        out[tag] = (json.loads(proc.stdout), proc.stderr, cwd / f"out-{tag}")
    return out


def test_matrix_from_the_run_data_in_llama_cpp_format(exports, run_dir):
    rec, err, out = exports["with"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    imx = rec["imatrix"]
    assert imx["used"] and imx["calibration"][0]["kind"] == "run-sample"
    assert imx["data_sha256"] == manifest["data"]["sha256"] == imx["calibration"][0]["sha256"]
    status = [ln for ln in err.splitlines() if "calibration:" in ln]
    assert len(status) == 1 and "training run data" in status[0] and "32-sample of 40" in status[0]  # imatrix.TEXTS
    path = out / "run-merged-q4_k_m.imatrix.gguf"
    assert path.is_file() and sha256(path) == imx["sha256"]
    stored = json.loads((out / "gguf-export.json").read_text())["imatrix"]
    assert stored["path"] == path.name  # relative to the record

    got = vendored_read(path)
    assert got["kv"]["general.type"] == "imatrix" and got["kv"]["imatrix.chunk_count"] == 32
    assert got["kv"]["imatrix.chunk_size"] == 256 and got["kv"]["imatrix.datasets"] == [imx["source"]]
    # what llama.cpp's reader (common/imatrix-loader.cpp) asks of the keys: gguf_get_val_u32 on the chunk
    # keys (it asserts the type), an array of strings for the datasets; all three for has_metadata
    assert got["types"]["imatrix.chunk_count"] == got["types"]["imatrix.chunk_size"] == ["UINT32"]
    assert got["types"]["imatrix.datasets"] == ["ARRAY", "STRING"]
    names = {f"blk.{i}.{n}.weight" for i in range(2) for n in LINEARS}
    assert set(got["tensors"]) == {n + s for n in names for s in (".in_sum2", ".counts")}
    for n in names:
        s, c = got["tensors"][n + ".in_sum2"], got["tensors"][n + ".counts"]
        assert s["type"] == c["type"] == "F32" and c["ne"] == [1, 1]
        assert s["ne"] == [128 if "ffn_down" in n else 64, 1] and s["sum"] > 0
    assert len({got["tensors"][n + ".counts"]["sum"] for n in names}) == 1  # every linear saw every token

    model = vendored_read(out / "run-merged-q4_k_m.gguf")["kv"]
    assert model["edgepeft.imatrix.sha256"] == imx["sha256"]
    assert model["edgepeft.imatrix.data_sha256"] == manifest["data"]["sha256"]
    assert model["edgepeft.imatrix.source"].startswith("training run data")


def test_imatrix_none_and_what_the_matrix_changes(exports, run_dir, tiny_llama):
    import gguf
    from gguf.quants import dequantize

    from edgepeft.export import gguf_tensors as gt
    from edgepeft.imatrix import read
    from edgepeft.models import resolve_base

    rec_none, err_none, out_none = exports["none"]
    assert rec_none["imatrix"] == {"used": False, "reason": "--imatrix none"}
    assert "importance matrix: off (--imatrix none)" in err_none and "calibration:" not in err_none
    assert not list(out_none.glob("*.imatrix.gguf"))
    assert not any(k.startswith("edgepeft.imatrix") for k in vendored_read(out_none / "run-merged-q4_k_m.gguf")["kv"])

    # the merged fp32 weights both files quantize, in GGUF row order
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = resolve_base(str(tiny_llama))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run_dir / "adapter")
    sd = {k: v.detach().float() for k, v in merged.merge_and_unload().state_dict().items()}
    tmap = gt.name_map(base.arch, base.config["num_hidden_layers"])
    ref = {gt.map_name(tmap, k): gt.to_gguf(v, k, base.arch, base.config).numpy() for k, v in sd.items()}
    means = read(exports["with"][2] / "run-merged-q4_k_m.imatrix.gguf").means()

    def weighted_error(path: Path) -> dict[str, float]:
        r = gguf.GGUFReader(str(path))
        out = {}
        for t in r.tensors:
            if t.name in means:
                w = dequantize(t.data, t.tensor_type).reshape(ref[t.name].shape)
                out[t.name] = float((((w - ref[t.name]) ** 2) * means[t.name][None, :]).sum())
        return out

    with_m = weighted_error(exports["with"][2] / "run-merged-q4_k_m.gguf")
    without = weighted_error(out_none / "run-merged-q4_k_m.gguf")
    assert set(with_m) == set(means) and len(means) == 14
    assert sum(with_m.values()) < 0.97 * sum(without.values()), (with_m, without)
    assert sum(with_m[k] < without[k] for k in means) >= 10  # most weights, not one lucky tensor
    assert not np.isclose(sum(with_m.values()), sum(without.values()))


def test_changed_training_data_is_one_line_and_writes_nothing(run_dir, tiny_llama, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.copy(run_dir.parent / "train.jsonl", tmp_path / "train.jsonl")
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "one more", "completion": "row"}) + "\n")
    proc = run_cli("export", "--base", tiny_llama, "--adapter", "run/adapter", "--quant", "q4_k_m", "--out", "out",
                   cwd=tmp_path)
    assert_clean_error(proc, "train.jsonl", "changed since training", "--imatrix none")
    assert not (tmp_path / "out").exists()
    # without the matrix, --merge-into auto still scores the run's data: its own line, and a fix that works
    proc = run_cli("export", "--base", tiny_llama, "--adapter", "run/adapter", "--quant", "q4_k_m", "--imatrix", "none",
                   "--out", "out", cwd=tmp_path)
    assert_clean_error(proc, "--merge-into auto", "changed since training", "--merge-into original")
    assert not (tmp_path / "out").exists()
    proc = run_cli("export", "--base", tiny_llama, "--adapter", "run/adapter", "--quant", "q4_k_m", "--imatrix", "none",
                   "--merge-into", "original", "--no-verify", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(tmp_path / "out")
    proc = run_cli("export", "--base", tiny_llama, "--quant", "iq3_xxs", "--imatrix", "none", "--out", "out",
                   cwd=tmp_path)
    assert_clean_error(proc, "iq3_xxs needs an importance matrix")
    proc = run_cli("export", "--base", tiny_llama, "--imatrix", "matrix.dat", "--out", "out", cwd=tmp_path)
    assert_clean_error(proc, "--imatrix", "an imatrix .gguf file")
    assert not (tmp_path / "out").exists()



def test_keep_delta_keeps_the_most_changed_weights_within_the_budget(run_dir, tiny_llama):
    """--keep-delta's choice (export/overrides.py): ranked by ‖ΔW‖/‖W‖, extra bytes within the budget."""
    import re

    from edgepeft.export.adapter import load_adapter
    from edgepeft.export.overrides import bytes_per_weight, choose
    from edgepeft.models import resolve_base

    base = resolve_base(str(tiny_llama))
    plan = load_adapter(run_dir, base)
    per = bytes_per_weight("q8_0") - bytes_per_weight("q4_k")
    everything, all_kept = choose(base, [plan], "q4_k_m", "10MB")
    assert len(all_kept) == len(everything) == 14  # every touched weight fits
    rel = [k["rel_delta"] for k in all_kept]
    assert rel == sorted(rel, reverse=True) and rel[0] > rel[-1] > 0
    patterns, kept = choose(base, [plan], "q4_k_m", "20KB")
    assert 0 < len(kept) < 14 and sum(k["extra_bytes"] for k in kept) <= 20_000
    first = next(k for k in all_kept if k["extra_bytes"] <= 20_000)
    assert kept[0] == first  # the most-changed weight that fits comes first
    sizes = {k["weight"]: k["extra_bytes"] for k in all_kept}
    assert all(abs(sizes[k["weight"]] - k["extra_bytes"]) == 0 for k in kept) and per > 0
    assert set(patterns.values()) == {"q8_0"}
    assert [k["weight"] for k in kept] == [w for w in sizes if any(re.search(p, w) for p in patterns)]


@pytest.mark.parametrize(("tiny", "bf16"), [("tiny_llama", False), ("tiny_qwen2", False), ("tiny_llama", True)])
def test_streamed_batched_collection_equals_the_full_model_one_text_at_a_time(tiny, bf16, request):
    """The export's collector (export.reference.importance_sums: one layer resident, right-padded batches)
    gives, at every linear, the sums and counts of hooks on the whole transformers model run on each text
    alone, with the adapter's ΔW merged into the weights: padded positions add nothing, no layer is skipped."""
    import random

    import torch
    from lora_factory import make_lora
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgepeft.export.adapter import load_adapters
    from edgepeft.export.reference import importance_sums, pad_batches
    from edgepeft.imatrix import linear_names
    from edgepeft.models import resolve_base

    folder = request.getfixturevalue(tiny)
    base = resolve_base(str(folder))
    lora = make_lora(folder, folder.parent / f"imx-lora-{tiny}", seed=5, r=4, b_std=0.3)
    (plan,) = load_adapters([str(lora)], base, ["a"])
    names = linear_names(base)
    rng = random.Random(0)
    lengths = (37, 5, 64, 12, 12, 50, 1, 29)
    seqs = [[rng.randrange(1, base.config["vocab_size"]) for _ in range(n)] for n in lengths]
    groups = pad_batches(lengths, 256)
    assert len(groups) < len(seqs) and any(len({lengths[i] for i in g}) > 1 for g in groups)  # padding happens
    sums, counts = importance_sums(base, [([plan], seqs, "original")], names, budget=256, bf16=bf16)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), lora)
    model = model.merge_and_unload().eval()
    want: dict = {}
    hooks = [model.get_submodule(path).register_forward_pre_hook(
        lambda _m, args, k=key: want.__setitem__(k, want.get(k, 0) + torch.square(
            args[0].reshape(-1, args[0].shape[-1]).double()).sum(0))) for path, key in names.items()]
    with torch.no_grad():
        for s in seqs:
            model(input_ids=torch.tensor([s]), use_cache=False)
    for h in hooks:
        h.remove()
    assert set(sums) == set(want) == set(names.values())
    assert counts == {g: sum(lengths) for g in names.values()}
    for k, v in want.items():
        # bf16 matmuls (edgepeft.imatrix.use_bf16): the sums of squares move by well under 1 % per column
        np.testing.assert_allclose(sums[k], v.numpy(), rtol=3e-2 if bf16 else 2e-5, err_msg=k)
        assert sums[k].dtype == np.float64 and (sums[k] > 0).all()


def test_matrix_file_reuse_gives_the_same_quantized_tensors(exports, run_dir, tiny_llama):
    """--imatrix FILE: the matrix one export wrote, passed to a second one (as typed, relative), quantizes
    every tensor to the same bytes, with no calibration data read; the record names the file's data."""
    import gguf

    rec, _, out = exports["with"]
    cwd = run_dir.parent
    proc = run_cli("export", "--base", tiny_llama, "--adapter", "run", "--quant", "q4_k_m", "--merge-into",
                   "original", "--no-verify", "--json", "--out", "out-reuse", "--imatrix",
                   f"{out.name}/run-merged-q4_k_m.imatrix.gguf", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "calibration:" not in proc.stderr
    imx = json.loads(proc.stdout)["imatrix"]
    assert imx["used"] and imx["data_sha256"] == rec["imatrix"]["data_sha256"]
    assert imx["source"] == rec["imatrix"]["source"] and imx["sha256"] == rec["imatrix"]["sha256"]

    def tensors(path: Path) -> dict:
        return {t.name: (t.tensor_type, bytes(t.data.tobytes())) for t in gguf.GGUFReader(str(path)).tensors}

    first, again = tensors(out / "run-merged-q4_k_m.gguf"), tensors(cwd / "out-reuse" / "run-merged-q4_k_m.gguf")
    none = tensors(exports["none"][2] / "run-merged-q4_k_m.gguf")
    assert set(first) == set(again) and sum(t.name not in ("F32", "F16") for t, _ in first.values()) >= 10
    assert [n for n in first if first[n] != again[n]] == []
    assert [n for n in first if first[n] != none[n]]  # the reused matrix was applied, not dropped


def test_bad_matrix_file_is_one_line_and_writes_nothing(exports, run_dir, tiny_llama, tmp_path):
    """Garbage, a model GGUF, or a matrix of another model's shapes: one line, exit 2, no --out."""
    from edgepeft.imatrix import ImportanceMatrix, write

    (tmp_path / "junk.imatrix.gguf").write_bytes(b"not a gguf file\n" * 64)
    model = exports["with"][2] / "run-merged-q4_k_m.gguf"
    write(ImportanceMatrix({"blk.0.attn_q.weight": np.ones(32)}, {"blk.0.attn_q.weight": 10}),
          tmp_path / "narrow.imatrix.gguf")
    write(ImportanceMatrix({"blk.7.attn_q.weight": np.ones(64)}, {"blk.7.attn_q.weight": 10}),
          tmp_path / "deeper.imatrix.gguf")
    cases = {"junk.imatrix.gguf": ("junk.imatrix.gguf", "not a GGUF file"),
             str(model): ("general.type", "not 'imatrix'"),
             "narrow.imatrix.gguf": ("32 columns for blk.0.attn_q.weight", "has 64", "another model"),
             "deeper.imatrix.gguf": ("blk.7.attn_q.weight", "no weight of", "another model")}
    for matrix, needles in cases.items():
        proc = run_cli("export", "--base", tiny_llama, "--adapter", run_dir, "--quant", "q4_k_m", "--imatrix", matrix,
                       "--out", "out", cwd=tmp_path)
        assert_clean_error(proc, *needles)
        assert not (tmp_path / "out").exists()
    # a type that needs a matrix for every weight refuses a partial one
    write(ImportanceMatrix({"blk.0.attn_q.weight": np.ones(64)}, {"blk.0.attn_q.weight": 10}),
          tmp_path / "partial.imatrix.gguf")
    proc = run_cli("export", "--base", tiny_llama, "--adapter", run_dir, "--quant", "iq3_xxs", "--imatrix",
                   "partial.imatrix.gguf", "--out", "out", cwd=tmp_path)
    assert_clean_error(proc, "partial.imatrix.gguf", "no entry for", "13 of 14")
    assert not (tmp_path / "out").exists()


def test_lazy_tokenizer_gives_autotokenizers_ids_and_loads_it_only_when_needed(smollm2):
    """The export process tokenizes calibration text with the cached effective tokenizer.json
    (export.reference.LazyTokenizer); its ids are AutoTokenizer's, and a chat template loads AutoTokenizer."""
    from edgepeft.calib import bundled_calibration, demo_calibration
    from edgepeft.export.gguf_tokenizer import cached_tokenizer_text, tokenizer_job
    from edgepeft.export.reference import LazyTokenizer
    from edgepeft.imatrix import calibration_tokens

    with tokenizer_job(smollm2.path) as job:
        job.result()  # the cache a first export leaves
    assert cached_tokenizer_text(smollm2.path) is not None
    full = smollm2.load_tokenizer()
    plain = bundled_calibration(8).pairs
    lazy = LazyTokenizer(smollm2)
    assert calibration_tokens(lazy, plain) == calibration_tokens(full, plain)
    assert lazy._fast and lazy._full is None  # plain text: transformers' tokenizer never loaded
    chat = demo_calibration(lazy, 4)  # renders the chat template: the full tokenizer, loaded once
    assert lazy._full is not None and chat == demo_calibration(full, 4)
    assert calibration_tokens(lazy, chat) == calibration_tokens(full, chat)  # special tokens in the text
