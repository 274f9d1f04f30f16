"""Which data calibrates a quantizer (edgepeft.calib.select_calibration): --calib, a run's data, the bundled slice.

In-process on purpose: these are the selector's rules; the CLI promises built on it (hash mismatch is one
line and exit 2, --imatrix none, the record's calibration entry) are tested through the real CLI in
tests/test_imatrix.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepeft.calib import BUNDLED_NAME, CalibRequest, bundled_calibration, select_calibration
from edgepeft.errors import EdgepeftError


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"Order {i}: {i % 7} lamps to Oslo", "completion": f'{{"n":{i % 7},"city":"Oslo"}}'}
            for i in range(n)] + [{"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"},
                                                {"role": "user", "content": "bye"},
                                                {"role": "assistant", "content": "see you"}]}]


def make_run(tmp: Path, rows: list[dict], held_out: list[dict] | None = None, adapter: Path | None = None) -> Path:
    """A training run dir as ``edgepeft train`` lays it out: adapter/ (a copy of ``adapter``) + manifest.json
    naming its data."""
    import shutil

    from edgepeft.train.data import data_sha256, load_jsonl

    run = tmp / "run"
    if adapter is not None:
        run.mkdir(parents=True)
        shutil.copytree(adapter, run / "adapter")
    else:
        (run / "adapter").mkdir(parents=True)
    data = run.parent / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    entry = {"source": "../train.jsonl", "sha256": data_sha256(load_jsonl(data)), "samples": len(rows)}
    if held_out is not None:
        ho = run.parent / "held.jsonl"
        ho.write_text("".join(json.dumps(r) + "\n" for r in held_out))
        entry["held_out"] = {"source": "../held.jsonl", "sha256": data_sha256(load_jsonl(ho))}
    (run / "manifest.json").write_text(json.dumps({"kind": "edgepeft-train-run", "data": entry}))
    return run


def test_run_sample_is_seeded_and_rendered(tmp_path, tok):
    run = make_run(tmp_path, _rows(80))
    lines = []
    a = select_calibration(CalibRequest(adapters=[run / "adapter"], calib_limit=16), tok, say=lines.append)
    b = select_calibration(CalibRequest(adapters=[run], calib_limit=16), tok, say=lambda _: None)
    assert a.kind == "run-sample" and a.pairs == b.pairs and len(a.pairs) == 16
    assert a.sha256 == json.loads((run / "manifest.json").read_text())["data"]["sha256"]
    assert all(p.endswith("assistant\n") for p, _ in a.pairs)  # chat-rendered, as training saw them
    assert len(lines) == 1 and "16-sample of 81" in lines[0] and a.sha256[:12] in lines[0]
    full = select_calibration(CalibRequest(adapters=[run], calib_limit=500), tok, say=lambda _: None)
    chat = [p for p in full.pairs if p[1] == "see you"]  # messages rows: the last assistant turn is the completion
    assert len(chat) == 1 and "hello" in chat[0][0] and "bye" in chat[0][0]


def test_held_out_part_wins_over_the_training_data(tmp_path, tok):
    run = make_run(tmp_path, _rows(40), held_out=[{"prompt": "held", "completion": "out"}])
    c = select_calibration(CalibRequest(adapters=[run]), tok, say=lambda _: None)
    assert c.kind == "run-held-out" and [x[1] for x in c.pairs] == ["out"]


def test_hash_mismatch_names_both_hashes(tmp_path, tok):
    run = make_run(tmp_path, _rows(10))
    recorded = json.loads((run / "manifest.json").read_text())["data"]["sha256"]
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "new", "completion": "row"}) + "\n")
    with pytest.raises(EdgepeftError, match="changed since training") as e:
        select_calibration(CalibRequest(adapters=[run]), tok, say=lambda _: None)
    assert recorded[:12] in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "train.jsonl").unlink()
    with pytest.raises(EdgepeftError, match="not there"):
        select_calibration(CalibRequest(adapters=[run]), tok, say=lambda _: None)


def test_calib_file_wins_and_plain_adapter_falls_back_to_bundled(tmp_path, tok):
    run = make_run(tmp_path, _rows(10))
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "raw"}\n{"prompt": "p", "completion": "c"}\n')
    c = select_calibration(CalibRequest(adapters=[run], calib=f), tok, say=lambda _: None)
    assert c.kind == "file" and len(c.pairs) == 2 and c.texts[0] == "raw"
    plain = tmp_path / "plain"
    plain.mkdir()
    lines = []
    d = select_calibration(CalibRequest(adapters=[plain]), tok, say=lines.append)
    assert d.kind == "bundled" and d.source == BUNDLED_NAME and BUNDLED_NAME in lines[0]
    assert d.pairs == bundled_calibration().pairs and len(d.pairs) == 64 and all(p == "" for p, _ in d.pairs)
    assert d.record() == {"source": BUNDLED_NAME, "kind": "bundled", "sha256": d.sha256, "texts": 64}


def test_bundled_task_run_samples_its_train_split(tmp_path, tok):
    """A run on the bundled demo task: the hash is re-derived from the task's train split (never its eval split)."""
    from edgepeft.train.data import data_sha256, records_from_examples
    from edgepeft.train.tasks import get_task

    run = tmp_path / "demo-run"
    run.mkdir()
    sha = data_sha256(records_from_examples(get_task("demo").examples("train"), "task:demo"))
    (run / "manifest.json").write_text(json.dumps({"data": {"source": "task:demo", "sha256": sha}}))
    c = select_calibration(CalibRequest(adapters=[run], calib_limit=8), tok, say=lambda _: None)
    evals = {e.completion for e in get_task("demo").examples("eval")}
    assert c.kind == "run-sample" and len(c.pairs) == 8 and not evals & {x[1] for x in c.pairs}
    (run / "manifest.json").write_text(json.dumps({"data": {"source": "task:demo", "sha256": "0" * 64}}))
    with pytest.raises(EdgepeftError, match="changed since training"):
        select_calibration(CalibRequest(adapters=[run]), tok, say=lambda _: None)


def test_gptq_mix_adds_generic_chunks_disjoint_from_merge_auto(tmp_path, tok):
    """GPTQ's Hessians: the task texts (cut to GPTQ_TASK_TEXTS) plus wikitext-2 chunks that --merge-into auto
    does not score on; the bundled slice as the task gets no second copy of itself."""
    from edgepeft import calib as C

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task, text = C.with_generic_text(select_calibration(CalibRequest(calib=f), tok))
    assert [c for _, c in task.pairs] == [f"a{i}" for i in range(C.GPTQ_TASK_TEXTS)] and task.kind == "file"
    merge_text = C.MergeChoice.for_request(CalibRequest(calib=f), tok).text
    assert len(text.pairs) == C.GPTQ_TEXT_CHUNKS and text.kind == "bundled"
    assert not set(text.texts) & set(merge_text.texts)
    assert bundled_calibration(C.MERGE_TEXT_CHUNKS + C.GPTQ_TEXT_CHUNKS).pairs[C.MERGE_TEXT_CHUNKS:] == text.pairs
    same, none = C.with_generic_text(bundled_calibration())
    assert none is None and len(same.pairs) == C.GPTQ_TASK_TEXTS
