"""Training data: JSONL (or a bundled task) -> token ids with a completion-only loss mask.

Each JSONL line is ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}...]}``.
Both are rendered with the tokenizer's chat template. Loss covers completion / assistant
tokens only: the mask is found by rendering each conversation prefix, so it works with any
template (no ``{% generation %}`` markers needed) and marks *every* assistant turn.
Any bad line is an error naming ``file:line``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edgepeft.errors import EdgepeftError
from edgepeft.train.chat import Example, render_messages

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Record:
    """One training conversation plus where it came from (for error messages)."""

    messages: list[dict]
    where: str


@dataclass
class TokenizedData:
    rows: list[dict]  # {"input_ids": [...], "completion_mask": [...]}
    n_truncated: int
    n_tokens: int
    n_completion_tokens: int


def _fail(where: str, problem: str, fix: str):
    raise EdgepeftError(f"{where}: {problem}", fix)


_FORMAT = 'Each line must be {"prompt": "...", "completion": "..."} or {"messages": [{"role": ..., "content": ...}]}'


def parse_line(obj, where: str) -> Record:
    if not isinstance(obj, dict):
        _fail(where, f"expected a JSON object, found {type(obj).__name__}", _FORMAT)
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            _fail(where, "'messages' must be a non-empty list", _FORMAT)
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                _fail(where, f"messages[{i}] needs 'role' and 'content'", _FORMAT)
            if m["role"] not in ROLES:
                _fail(where, f"messages[{i}] has role {m['role']!r}", "Allowed roles: " + ", ".join(ROLES))
            if not isinstance(m["content"], str):
                _fail(where, f"messages[{i}].content must be a string", _FORMAT)
        if not any(m["role"] == "assistant" for m in msgs):
            _fail(where, "'messages' has no assistant turn, so there is nothing to learn", _FORMAT)
        return Record([{"role": m["role"], "content": m["content"]} for m in msgs], where)
    missing = [k for k in ("prompt", "completion") if k not in obj]
    if missing:
        _fail(where, f"missing field {missing[0]!r} (found {', '.join(map(repr, obj)) or 'no fields'})", _FORMAT)
    for k in ("prompt", "completion"):
        if not isinstance(obj[k], str):
            _fail(where, f"field {k!r} must be a string, found {type(obj[k]).__name__}", _FORMAT)
    if not obj["completion"].strip():
        _fail(where, "field 'completion' is empty", "Give every line a non-empty completion")
    return Record([{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}],
                  where)


def load_jsonl(path: str | Path, option: str = "--data") -> list[Record]:
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise EdgepeftError(f"{option} {path} {what}", f"Pass a JSONL file, or {option} demo for the bundled demo")
    records = []
    try:
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    _fail(where, f"malformed JSON ({e.msg} at column {e.colno})", _FORMAT)
                records.append(parse_line(obj, where))
    except UnicodeDecodeError as e:
        _fail(f"{path}", f"not UTF-8 text (byte {e.start} of a line)", "Pass a JSONL file, one JSON object per line")
    if not records:
        _fail(f"{path}:1", "the file is empty (no JSON lines)", _FORMAT)
    return records


def records_from_examples(examples: list[Example], name: str) -> list[Record]:
    return [Record([{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.completion}],
                   f"{name}:{i + 1}") for i, e in enumerate(examples)]


def data_sha256(records: list[Record]) -> str:
    """Content hash of the parsed conversations (same for a file and the task it was dumped from)."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.messages, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def tokenize_record(tokenizer, record: Record) -> tuple[list[int], list[int]]:
    """(input_ids, completion_mask) for one conversation; mask=1 on assistant tokens and their end marker."""
    msgs = record.messages
    ids: list[int] = []
    mask: list[int] = []
    done = ""  # rendered text covered so far
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = render_messages(tokenizer, msgs[:i], add_generation_prompt=True)
        upto = render_messages(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        if not prefix.startswith(done) or not upto.startswith(prefix):
            raise EdgepeftError(f"{record.where}: the chat template re-renders earlier turns, so assistant tokens "
                                "cannot be located", "Use prompt/completion lines for this base")
        for chunk, is_completion in ((prefix[len(done):], 0), (upto[len(prefix):], 1)):
            new = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            ids += new
            mask += [is_completion] * len(new)
        done = upto
    full = render_messages(tokenizer, msgs, add_generation_prompt=False)
    tail = tokenizer(full[len(done):], add_special_tokens=False)["input_ids"] if full.startswith(done) else []
    ids += tail  # trailing non-assistant turns: context only
    mask += [0] * len(tail)
    return ids, mask


def tokenize_records(tokenizer, records: list[Record], max_seq_len: int) -> TokenizedData:
    rows, n_trunc, n_tok, n_comp = [], 0, 0, 0
    for r in records:
        ids, mask = tokenize_record(tokenizer, r)
        if len(ids) > max_seq_len:
            n_trunc += 1
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        if not any(mask):
            continue  # truncation cut every completion token: nothing to learn from this one
        rows.append({"input_ids": ids, "completion_mask": mask})
        n_tok += len(ids)
        n_comp += sum(mask)
    if not rows:
        raise EdgepeftError(f"every sample lost its completion to --max-seq-len {max_seq_len}",
                            "Raise --max-seq-len")
    return TokenizedData(rows, n_trunc, n_tok, n_comp)


def load_records(data: str) -> tuple[list[Record], str]:
    """``data`` is a JSONL path or a bundled task name; returns records and a display name."""
    from edgepeft.train.tasks import TASKS

    if data in TASKS and not Path(data).exists():
        return records_from_examples(TASKS[data].examples("train"), f"task:{data}"), f"task:{data}"
    if not Path(data).exists() and not data.endswith(".jsonl") and "/" not in data:
        raise EdgepeftError(f"--data {data} is neither a file nor a bundled task",
                            "Pass a JSONL file, or one of the tasks: " + ", ".join(TASKS))
    return load_jsonl(data), str(data)
