# ruff: noqa: F811  (pytest fixtures imported from bench_artifacts are parameters by design)
"""edgepeft bench end to end on tiny exported artifacts: records, metrics, table, PNG, --compare, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_artifacts import gguf_sep, onnx_sep, peft_adapters  # noqa: F401  (session fixtures)
from conftest import assert_clean_error, run_cli

from edgepeft import bench
from edgepeft.artifacts import runtime_artifact
from edgepeft.errors import EdgepeftError
from edgepeft.profiles import load_profile

SMALL = ["--prompt-tokens", "32", "--gen-tokens", "8", "-r", "2", "--ppl-tokens", "64", "--swap-cycles", "2"]


@pytest.fixture(scope="module")
def result(gguf_sep, onnx_sep, tiny_llama, peft_adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    refs = [x for n, p in peft_adapters.items() for x in ("--reference-adapter", f"{n}={p}")]
    proc = run_cli("bench", gguf_sep, onnx_sep, *SMALL, "--task", "demo", "--task-limit", "1",
               "--reference", tiny_llama, *refs, "--json", "-", "--png", out / "a.png")
    assert proc.returncode == 0, proc.stderr
    (out / "a.json").write_text(proc.stdout)
    return out, json.loads(proc.stdout), proc  # stdout holds only the JSON document


def test_records_and_metrics(result, gguf_sep, onnx_sep, peft_adapters):
    out, doc, _ = result
    assert doc["schema"] == bench.SCHEMA and doc["device"]["bandwidth_gb_s"] > 0
    refs = [r for r in doc["records"] if r.get("reference")]
    recs = [r for r in doc["records"] if not r.get("reference")]
    # the PyTorch reference: the base and each adapter, scored by the same loop on the same example
    assert doc["records"][: len(refs)] == refs and [r["adapter"] for r in refs] == ["none", *peft_adapters]
    for r in refs:
        assert r["runtime"] == "pytorch" and r["top1_agree"] == 1.0 and r["tg"] is None
        assert r["accuracy"]["total"] == 1 and r["perplexity"]["tokens"] == 64
    ref_ppl = {r["adapter"]: r["perplexity"]["ppl"] for r in refs}
    # one record per artifact x runtime x device x adapter
    keys = {(Path(r["artifact"]).name, r["runtime"], r["device"], r["adapter"]) for r in recs}
    assert len(keys) == len(recs) == 6
    assert {r["runtime"] for r in recs} == {"llama.cpp", "onnxruntime-genai"}
    for r in recs:
        assert r["load_ms"] > 0 and r["ttft_ms"]["mean"] > 0 and r["ttft_ms"]["n"] == 2
        assert r["pp"]["mean"] > 0 and r["pp"]["tokens"] == 32
        assert r["tg"]["mean"] > 0 and r["tg"]["tokens"] == 8
        if r["adapter"] == "none":  # the base alone is what the ratios are taken against
            assert r["adapter_tg_ratio"] is None and r["adapter_pp_ratio"] is None
        else:  # same run, same repetitions: a ratio of two measured speeds, so positive and finite
            assert 0 < r["adapter_tg_ratio"] < 100 and 0 < r["adapter_pp_ratio"] < 100, r
        assert r["peak_rss_mb"] > 10
        assert r["swap_ms"]["median"] > 0 and r["swap_ms"]["n"] == 2 * 3
        assert 1 < r["perplexity"]["ppl"] < 1e7 and r["perplexity"]["tokens"] == 64
        acc = r["accuracy"]  # scoring itself is checked against known answers in test_task_accuracy_scores
        assert acc["total"] == 1 and acc["task"] == "demo" and acc["accuracy"] == acc["correct"] / acc["total"]
        # bw_util is bytes/token x tok/s over the best numpy read rate of the same working set (copy, per-core
        # max and gemv, BLAS gemv). This tiny model's 13 MiB sit in cache, which llama.cpp's kernels read
        # faster than numpy: 1.52 against the copy alone, 1.05 against the read probes with OMP_NUM_THREADS=1
        # (real models in DRAM: 0.15-0.64 in the quickstarts); a byte-accounting bug gave 10. Beside the suite's
        # other xdist worker the probe and the decode see different load: 1.5003 once
        assert 0 < r["bw_util"] <= 2.0 and r["bytes_per_token"] > 0
        model = Path(r["model_file"])
        files = [p for p in (model.rglob("*") if model.is_dir() else [model]) if p.is_file()
                 and p.suffix != ".onnx_adapter"]
        assert r["model_bytes"] == sum(p.stat().st_size for p in files)
        if r["adapter"] != "none":
            suffix = ".lora.gguf" if r["format"] == "gguf" else ".onnx_adapter"
            adapter = next(Path(r["artifact"]).rglob(r["adapter"] + suffix))
            assert r["adapter_bytes"] == adapter.stat().st_size
        else:
            assert r["adapter_bytes"] == 0
    # f32 exports of the same weights: both runtimes agree with PyTorch on (nearly) every top-1
    for r in recs:
        assert r["top1_agree"] >= 0.9, r
        # and on perplexity: the same text, the same chunks, the same weights
        assert r["perplexity"]["ppl"] == pytest.approx(ref_ppl[r["adapter"]], rel=0.02), (r, ref_ppl)
    assert (out / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_and_compare(result, gguf_sep, cli):
    out, doc, _ = result
    a = bench.load_document(out / "a.json")
    a2 = json.loads(json.dumps(a))
    for r in a2["records"]:  # a run twice as fast in tg, same elsewhere
        if not r.get("reference"):
            r["tg"]["mean"] *= 2
    (out / "b.json").write_text(json.dumps(a2))
    rows = bench.compare(a, a2)
    assert len(rows) == 6 and all(r["tg"] == pytest.approx(2.0, rel=1e-3) and r["pp"] == 1.0 for r in rows)
    proc = cli("bench", "--compare", out / "a.json", out / "b.json")
    assert proc.returncode == 0 and "2.000x" in proc.stdout and "tg t/s" in proc.stdout, proc.stderr
    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(bench.table(doc))
    text = console.export_text()
    assert "tg t/s" in text and "bw_util" in text and "onnxruntime-genai" in text
    assert "PyTorch fp32 (reference)" in text


def test_adapter_ratios_in_table_and_json(gguf_sep, tmp_path, cli):
    """Every adapter's tg and pp against the base alone of the same run: in the table (read through a
    pipe), in the --json file and in --json - on stdout. Three measured pairs (``-r 4``: repetition 0 warms up):
    with SMALL's one pair, a base decode of 8 tokens stalled by the other xdist worker once gave tg/base 209x."""
    proc = cli("bench", gguf_sep, *SMALL, "-r", "4", "--no-ppl", "--json", "r.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "tg/base" in proc.stdout and "pp/base" in proc.stdout
    doc = bench.load_document(tmp_path / "r.json")
    by = {r["adapter"]: r for r in doc["records"]}
    assert set(by) == {"none", "sql", "chat"}
    assert by["none"]["adapter_tg_ratio"] is None
    for name in ("sql", "chat"):
        tg, pp = by[name]["adapter_tg_ratio"], by[name]["adapter_pp_ratio"]
        assert 0 < tg < 100 and 0 < pp < 100
        assert f"{tg:.2f}x" in proc.stdout and f"{pp:.2f}x" in proc.stdout
    piped = cli("bench", gguf_sep, *SMALL, "--no-ppl", "--json", "-", cwd=tmp_path)
    assert piped.returncode == 0, piped.stderr
    recs = json.loads(piped.stdout)["records"]
    assert all((r["adapter_tg_ratio"] is None) == (r["adapter"] == "none") for r in recs)


class _Clocked:
    """A runtime whose steps advance a fake clock: the base takes 1 unit per token, adapter "slow"
    2 units per decode token and 4 per prefill token."""

    def __init__(self, clock: list[float]):
        self.clock, self.active, self.order = clock, None, []

    def set_adapter(self, name):
        self.active = name
        self.order.append(name)

    def reset(self):
        pass

    def prefill(self, tokens, all_logits=False):
        self.clock[0] += len(tokens) * (4 if self.active and len(tokens) > 1 else 1)

    def logits(self):
        return None

    def decode(self, n, tokens=None):
        self.clock[0] += n * (2 if self.active else 1)


def test_interleaved_speed_ratios(monkeypatch):
    """Base and adapter alternate within each repetition, and the ratio is adapter tok/s over base tok/s."""
    from edgepeft.bench import measure

    clock = [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])
    rt = _Clocked(clock)
    cfg = bench.BenchConfig(gen_tokens=4, repetitions=3, ppl_file=None)
    out = measure.interleaved_speed(rt, list(range(8)), cfg, [None, "slow"])
    assert rt.order == [None, "slow"] * 4  # warm-up + 3 repetitions, A B A B
    assert out["slow"]["adapter_tg_ratio"] == 0.5 and out["slow"]["adapter_pp_ratio"] == 0.25
    assert "adapter_tg_ratio" not in out[None]
    assert out[None]["tg"]["mean"] == 1.0 and out["slow"]["tg"]["mean"] == 0.5 and out[None]["pp"]["n"] == 3


def test_too_big_wrong_quant_wrong_format_refused(gguf_sep, onnx_sep, tmp_path, cli):
    art = runtime_artifact(gguf_sep)
    text = (Path(__file__).parents[1] / "devices" / "x86-64-cpu.yaml").read_text()
    tiny = tmp_path / "tiny-dev.yaml"
    tiny.write_text(text.replace("memory_gb: 16", "memory_gb: 0.01"))
    with pytest.raises(EdgepeftError, match="needs .* GB .* has 0.01 GB"):
        bench.check_fits(art, load_profile(str(tiny)), "llama.cpp", 1024)
    assert_clean_error(cli("bench", gguf_sep, "--device", tiny, *SMALL), "needs", "0.01 GB")
    noquant = tmp_path / "noquant.yaml"
    noquant.write_text(text.replace("  gguf: [f32, ", "  gguf: ["))
    with pytest.raises(EdgepeftError, match="quant f32"):
        bench.check_fits(art, load_profile(str(noquant)), "llama.cpp", 1024)
    nogguf = tmp_path / "nogguf.yaml"
    nogguf.write_text(text.replace("  gguf: [f32, f16, bf16, q8_0, q4_0, q4_1, q4_k_m, q4_k_s, q5_k_m, q5_0, q6_k]\n", ""))
    with pytest.raises(EdgepeftError, match="does not run gguf"):
        bench.check_fits(art, load_profile(str(nogguf)), "llama.cpp", 1024)
    with pytest.raises(EdgepeftError, match="cannot run"):
        bench.check_fits(runtime_artifact(onnx_sep), load_profile("x86-64-cpu"), "llama.cpp", 1024)


def test_bad_inputs_one_line(gguf_sep, tmp_path, cli):
    assert_clean_error(cli("bench", gguf_sep, "--runtime", "tflite"), "unknown runtime", "llama.cpp")
    assert_clean_error(cli("bench", tmp_path / "missing.gguf"), "does not exist")
    assert_clean_error(cli("bench", gguf_sep, "--adapter", "nonsense"), "NAME=PATH")
    (tmp_path / "x.json").write_text('{"schema": "other/1", "records": []}')
    assert_clean_error(cli("bench", "--compare", tmp_path / "x.json", tmp_path / "x.json"), "not an edgepeft bench")


def test_bytes_per_token_skips_gathered_embedding(gguf_sep, onnx_sep):
    g = runtime_artifact(gguf_sep)
    assert bench.bytes_per_token(g, None) < g.model_bytes  # untied: token_embd is gathered, output is read
    assert bench.bytes_per_token(g, "sql") == bench.bytes_per_token(g, None) + g.adapter_bytes["sql"]
    o = runtime_artifact(onnx_sep)
    assert 0 < bench.bytes_per_token(o, None) < o.model_bytes
    assert bench.measure_bandwidth(mib=32, reps=2) > 0.1


def test_task_template_comes_from_the_artifact(gguf_sep, onnx_sep, tiny_llama):
    """Task prompts are rendered with the template each artifact carries, exactly as PyTorch renders them."""
    from transformers import AutoTokenizer

    from edgepeft.bench.artifacts import task_template
    from edgepeft.train.chat import render_prompt

    hf = AutoTokenizer.from_pretrained(tiny_llama)
    assert hf.chat_template
    for art in (bench.discover(gguf_sep), bench.discover(onnx_sep)):
        tmpl = task_template(art)
        assert tmpl.chat_template, art.format
        for prompt in ("List the tables.", "Say hi"):
            assert render_prompt(tmpl, prompt) == render_prompt(hf, prompt), art.format


class _Scripted:
    """A runtime that answers every prompt with a scripted completion: token 2 (the answer), then token 1
    (<|im_end|>), then token 3 (text after the turn ended, which scoring must never see)."""

    def __init__(self, answer: str):
        self.answer = answer
        self.script = [2, 1, 3]
        self.prompts: list[str] = []

    def reset(self):
        self.i = 0

    def tokenize(self, text, special=False):
        self.prompts.append(text)
        return [0]

    def prefill(self, tokens, all_logits=False):
        pass

    def logits(self):
        import numpy as np

        row = np.zeros((1, 8), dtype=np.float32)
        row[0, self.script[min(self.i, len(self.script) - 1)]] = 1
        return row

    def decode(self, n, tokens=None):
        self.i += n

    def detokenize(self, tokens):
        return "".join({1: "<|im_end|>", 2: self.answer, 3: " and more"}[t] for t in tokens)


def test_task_accuracy_scores(monkeypatch):
    """The bench scoring loop counts a right answer as right and a wrong one as wrong."""
    from edgepeft.bench.measure import task_accuracy
    from edgepeft.train.chat import ChatTemplate
    from edgepeft.train.tasks import get_task

    ex = get_task("demo").examples("eval")[0]
    cfg = bench.BenchConfig(task="demo", task_limit=1, ppl_file=None)
    tmpl = ChatTemplate("{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>")
    right = _Scripted(ex.completion)
    assert task_accuracy(right, cfg, tmpl) == {"task": "demo", "accuracy": 1.0, "correct": 1, "total": 1,
                                               "misses": []}
    assert right.prompts == [f"<u>{ex.prompt}</u><a>"]
    wrong = task_accuracy(_Scripted(ex.completion + " extra"), cfg, tmpl)
    assert wrong["accuracy"] == 0.0 and wrong["misses"][0]["got"] == ex.completion + " extra"


CHAT_TASK = [  # a user's own task file: both training formats, a system prompt, two turns
    {"messages": [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Sky color?"},
                  {"role": "assistant", "content": "blue"}, {"role": "user", "content": "Grass color?"},
                  {"role": "assistant", "content": "green"}]},
    {"prompt": "Capital of France?", "completion": "Paris"},
    {"messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1 2 3"}]},
]


def test_own_task_file_answers_identically_in_pytorch_and_every_runtime(gguf_sep, onnx_sep, tiny_llama, tmp_path,
                                                                        cli):
    """`eval --task FILE` (PyTorch) and `bench --task FILE` (its PyTorch reference, llama.cpp, ORT-genai, plain
    ORT) render, generate and stop by one rule: on fp32 artifacts of the same tiny model every engine gives
    the very same (non-empty) answer to every example, read from each record's misses."""
    (tmp_path / "own.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT_TASK))
    sub = tmp_path / "cwd"
    sub.mkdir()
    p = cli("eval", "--base", tiny_llama, "--task", "../own.jsonl", "--batch-size", "1", "--json", cwd=sub)
    assert p.returncode == 0, p.stderr
    ev = json.loads(p.stdout)
    assert ev["task"] == "../own.jsonl" and ev["total"] == 3 and ev["correct"] == 0  # random weights
    got = [m["got"] for m in ev["misses"]]
    assert [m["expected"] for m in ev["misses"]] == ["green", "Paris", "1 2 3"] and all(got), got
    p = cli("bench", gguf_sep, onnx_sep, "--runtime", "llama.cpp", "--runtime", "onnxruntime-genai", *SMALL,
            "--no-ppl", "--task", "../own.jsonl", "--task-limit", "3", "--reference", tiny_llama, "--json", "-",
            cwd=sub)
    assert p.returncode == 0, p.stderr
    p2 = cli("bench", onnx_sep, "--runtime", "onnxruntime", *SMALL, "--no-ppl", "--task", "../own.jsonl",
             "--json", "-", cwd=sub)
    assert p2.returncode == 0, p2.stderr
    recs = [r for r in json.loads(p.stdout)["records"] + json.loads(p2.stdout)["records"] if r["adapter"] == "none"]
    assert sorted(r["runtime"] for r in recs) == ["llama.cpp", "onnxruntime", "onnxruntime-genai", "pytorch"]
    for r in recs:
        assert r["accuracy"]["task"] == "../own.jsonl" and r["accuracy"]["total"] == 3, r["runtime"]
        assert [m["got"] for m in r["accuracy"]["misses"]] == got, r["runtime"]


def test_bad_task_file_one_line(gguf_sep, tmp_path, cli):
    (tmp_path / "notjsonl.jsonl").write_text("prompt,completion\nhi,there\n")
    (tmp_path / "nocompl.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    (tmp_path / "noanswer.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    cases = [("missing.jsonl", ["--task", "does not exist"]), ("notjsonl.jsonl", ["notjsonl.jsonl:1", "malformed JSON"]),
             ("nocompl.jsonl", ["nocompl.jsonl:1", "completion"]), ("noanswer.jsonl", ["noanswer.jsonl:1", "assistant"]),
             ("binary.jsonl", ["binary.jsonl", "UTF-8"])]
    for name, needles in cases:
        assert_clean_error(cli("bench", gguf_sep, "--task", name, cwd=tmp_path), *needles)
    assert_clean_error(cli("bench", gguf_sep, "--task", "dem"), "--task", "dem", "demo", "JSONL")



def test_extra_adapter_joins_only_artifacts_that_take_adapters(gguf_sep, tiny_llama, peft_adapters, tmp_path, cli):
    """``--adapter`` goes to the separate export; the merged one is measured as it is, and said so. With only
    merged artifacts it is one error line before anything is measured."""
    from bench_artifacts import export

    merged = tmp_path / "merged"
    export("gguf", tiny_llama, {"sql": peft_adapters["sql"]}, merged, mode="merged", quant="f32",
           merge_into="original")
    extra = f"again={gguf_sep / 'chat.lora.gguf'}"
    proc = cli("bench", merged, gguf_sep, "--adapter", extra, "--no-ppl", "--prompt-tokens", "8", "--gen-tokens", "2",
               "-r", "1", "--swap-cycles", "1", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    recs = [r for r in json.loads(proc.stdout)["records"] if not r.get("reference")]
    by_art = {}
    for r in recs:
        by_art.setdefault(Path(r["artifact"]).name, set()).add(r["adapter"])
    assert by_art["merged"] == {"none"} and {"again", "sql", "chat"} <= by_art["sep"], by_art  # none: nothing swapped
    assert "merged: adapters merged in, so --adapter again is not applied to it" in proc.stderr
    assert_clean_error(cli("bench", merged, "--adapter", extra), "every artifact", "adapters merged in")
