"""The demo task and the exact-match metric every runtime is scored with."""

from __future__ import annotations

import json

import pytest
from conftest import assert_clean_error


def test_demo_splits_are_deterministic_disjoint_and_parseable():
    from edgepeft.train.demo import demo_splits
    from edgepeft.train.tasks import get_task

    a, b = demo_splits(), demo_splits()
    assert a == b
    assert len(a["train"]) == 2000 and len(a["eval"]) == 100
    assert not {e.prompt for e in a["eval"]} & {e.prompt for e in a["train"]}
    for ex in a["eval"][:20]:
        obj = json.loads(ex.completion)
        assert list(obj) == ["to", "who", "n", "item", "color", "size"]
        assert obj["to"] in ex.prompt and obj["who"] in ex.prompt and str(obj["n"]) in ex.prompt
    assert get_task("demo").examples("eval") == a["eval"]


def test_exact_match_metric_normalizes_only_end_markers_and_whitespace():
    from edgepeft.evaluate import exact_match, is_match, score
    from edgepeft.train.chat import Example

    exs = [Example("p1", '{"a":1}'), Example("p2", '{"a":2}'), Example("p3", '{"a":3}'), Example("p4", "x")]
    answers = {"p1": ' {"a":1}<|im_end|>\nrest', "p2": '{"a": 2}', "p3": '{"a":3}\n', "p4": "y"}
    assert exact_match(lambda p: answers[p], exs) == 0.5
    assert is_match('{"a":1}<|eot_id|>', '{"a":1}') and not is_match('{"a":1} extra', '{"a":1}')
    r = score(["x", "y"], exs[2:])
    assert (r.correct, r.total) == (0, 2) and r.misses[0]["expected"] == '{"a":3}'


def test_generate_receives_the_chat_rendered_prompt(smollm2):
    from edgepeft.evaluate import eval_prompts, exact_match
    from edgepeft.train.chat import render_prompt
    from edgepeft.train.tasks import get_task

    tok = smollm2.load_tokenizer()
    exs = get_task("demo").examples("eval")[:3]
    seen = []
    oracle = {render_prompt(tok, e.prompt): e.completion for e in exs}
    assert exact_match(lambda text: seen.append(text) or oracle[text], exs, tokenizer=tok) == 1.0
    assert seen == eval_prompts(exs, tok)
    assert seen[0].endswith("<|im_start|>assistant\n") and exs[0].prompt in seen[0]


def test_eval_cli_scores_tiny_model_and_rejects_unknown_task(cli, tiny_llama):
    p = cli("eval", "--base", tiny_llama, "--task", "demo", "--limit", "2", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["total"] == 2 and r["accuracy"] == 0.0 and r["runtime"] == "pytorch"
    assert_clean_error(cli("eval", "--base", tiny_llama, "--task", "nope"), "task", "nope", "demo")
    assert_clean_error(cli("eval", "--base", tiny_llama, "--adapter", tiny_llama), "adapter_config.json")


def test_task_file_is_the_training_formats_with_the_last_answer_expected(tmp_path):
    from edgepeft.train.tasks import get_task

    rows = [{"prompt": "hi", "completion": "there"},
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                          {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                          {"role": "assistant", "content": "dé"}]}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = get_task(str(tmp_path / "t.jsonl"))
    a, b = t.examples("eval")
    assert (a.prompt, a.completion) == ("hi", "there")  # a lone user turn renders as a plain prompt
    assert b.completion == "dé" and b.prompt == rows[1]["messages"][:4]
    assert t.max_new_tokens == len(b"there") + 8  # bytes bound every byte-level tokenizer
    assert get_task("demo").name == "demo"


def test_eval_cli_rejects_bad_task_files(cli, tiny_llama, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "completion": "y"}\nnot json\n')
    (tmp_path / "empty.jsonl").write_text('{"prompt": "x", "completion": " "}\n')
    assert_clean_error(cli("eval", "--base", tiny_llama, "--task", "missing.jsonl", cwd=tmp_path),
                       "--task missing.jsonl does not exist")
    assert_clean_error(cli("eval", "--base", tiny_llama, "--task", "bad.jsonl", cwd=tmp_path), "bad.jsonl:2", "JSON")
    assert_clean_error(cli("eval", "--base", tiny_llama, "--task", "empty.jsonl", cwd=tmp_path), "empty.jsonl:1",
                       "completion")
    (tmp_path / "ok.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    assert_clean_error(cli("eval", "--base", tiny_llama, "--task", "ok.jsonl", "--split", "train", cwd=tmp_path),
                       "split", "train", "eval")


def test_quickstart_reports_pytorch_and_every_artifact_with_the_adapter_on_the_same_examples():
    from edgepeft.quickstart import task_scores

    def rec(artifact, adapter, acc, merged=(), ref=False, total=50):
        return {"artifact": artifact, "runtime": "pytorch" if ref else "x", "adapter": adapter, "reference": ref,
                "merged_adapters": list(merged), "accuracy": {"accuracy": acc, "correct": int(acc * total), "total": total}}

    doc = {"records": [rec("pytorch:b", "none", 0.0, ref=True), rec("pytorch:b", "demo", 0.96, ref=True),
                       rec("/o/gguf-merged", "none", 0.94, merged=["demo"]), rec("/o/gguf-separate", "none", 0.0),
                       rec("/o/gguf-separate", "demo", 0.96), rec("/o/onnx-separate", "demo", 0.9)]}
    got = {(r["artifact"], r["points_vs_pytorch"]) for r in task_scores(doc)}
    assert got == {("pytorch", None), ("gguf-merged", -2.0), ("gguf-separate", 0.0), ("onnx-separate", -6.0)}
    doc["records"].append(rec("/o/onnx-merged", "none", 0.9, merged=["demo"], total=20))
    from edgepeft.errors import EdgepeftError

    with pytest.raises(EdgepeftError, match="different example counts"):
        task_scores(doc)
