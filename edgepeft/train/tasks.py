"""Evaluation/training tasks: the bundled ones (``--task NAME``, a plain dict registry) and the
user's own (``--task FILE.jsonl``, the training formats; the expected output of a line is its
completion or its last assistant turn, and the turns before it are the prompt)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

from edgepeft.errors import ConfigError
from edgepeft.train.chat import Example


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make_splits: Callable[[], dict[str, list[Example]]]
    max_new_tokens: int  # generation budget: longest completion plus slack

    @cached_property
    def splits(self) -> dict[str, list[Example]]:
        return self.make_splits()

    def examples(self, split: str) -> list[Example]:
        if split not in self.splits:
            raise ConfigError("split", split, ", ".join(self.splits))
        return self.splits[split]


def _demo_splits():
    from edgepeft.train.demo import demo_splits

    return demo_splits()


TASKS: dict[str, Task] = {
    "demo": Task("demo", "parcel-order sentence -> fixed compact JSON (bundled, seed 1234, 2000 train / 100 eval)",
                 _demo_splits, max_new_tokens=48),
}


def get_task(name: str) -> Task:
    """A bundled task by name, or a JSONL file as a one-split task (``eval``: every line)."""
    if name in TASKS and not Path(name).exists():
        return TASKS[name]
    if Path(name).is_file():  # read once per content: bench scores it per artifact and adapter
        st = Path(name).stat()
        return _cached_file_task(name, str(Path(name).resolve()), st.st_mtime_ns, st.st_size)
    if Path(name).exists() or name.endswith(".jsonl") or "/" in name or "\\" in name:
        return file_task(name)
    raise ConfigError("--task", name, f"a bundled task ({', '.join(TASKS)}) or a JSONL file")


@lru_cache(maxsize=8)
def _cached_file_task(path: str, resolved: str, mtime_ns: int, size: int) -> Task:
    return file_task(path)


def file_task(path: str) -> Task:
    """``path`` read and checked now (a bad line names ``file:line``), through the training data reader."""
    from edgepeft.train.data import load_jsonl

    examples = [example_of(r.messages, r.where) for r in load_jsonl(path, option="--task")]
    # a byte-level tokenizer never needs more tokens than bytes: no correct answer is cut short
    budget = max(len(e.completion.encode()) for e in examples) + 8
    return Task(str(path), f"{path} ({len(examples)} examples)", lambda: {"eval": examples}, max_new_tokens=budget)


def example_of(messages: list[dict], where: str = "") -> Example:
    """The last assistant turn is the expected answer; the turns before it are the prompt (a lone user
    turn stays a plain prompt string, so it renders exactly as a prompt/completion line does)."""
    i = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    before = messages[:i]
    if not before or not messages[i]["content"].strip():
        from edgepeft.errors import EdgepeftError

        problem = "the last assistant turn is empty" if before else "the assistant turn has no prompt before it"
        raise EdgepeftError(f"{where}: {problem}, so there is no expected answer to score",
                            "End every line with a non-empty assistant turn after a user turn")
    prompt = before[0]["content"] if len(before) == 1 and before[0]["role"] == "user" else before
    return Example(prompt, messages[i]["content"])
