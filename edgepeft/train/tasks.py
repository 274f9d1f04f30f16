"""Named evaluation/training tasks (``--task NAME``), a plain dict registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

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
    if name not in TASKS:
        raise ConfigError("task", name, ", ".join(TASKS))
    return TASKS[name]
