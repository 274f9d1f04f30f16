"""What one benchmark run measures and how hard: :class:`BenchConfig`, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgepeft.errors import ConfigError, EdgepeftError

SCHEMA = "edgepeft.bench/1"
DEFAULT_TEXT = Path(__file__).parent.parent / "data" / "wikitext2-valid-slice.txt"


@dataclass
class BenchConfig:
    prompt_tokens: int = 512
    gen_tokens: int = 128
    repetitions: int = 5
    ppl_file: Path | None = DEFAULT_TEXT
    ppl_tokens: int = 512
    ppl_ctx: int = 256
    swap_cycles: int = 5
    task: str | None = None  # --task: a bundled task name ("demo") or a JSONL file, scored by edgepeft.evaluate
    task_limit: int = 20
    reference: str | None = None  # --base for top-1 agreement
    reference_adapters: dict = field(default_factory=dict)  # adapter name -> PEFT folder
    top1_tokens: int = 128

    def __post_init__(self):
        for name in ("prompt_tokens", "gen_tokens", "repetitions", "ppl_tokens", "ppl_ctx", "swap_cycles",
                     "task_limit"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')}", v, "an integer >= 1")
        if self.ppl_file is not None:
            self.ppl_file = Path(self.ppl_file)
            if not self.ppl_file.is_file():
                raise EdgepeftError(f"--ppl-file {self.ppl_file} does not exist", "Pass a UTF-8 text file")
        if self.task is not None:
            from edgepeft.train.tasks import get_task

            get_task(self.task).examples("eval")  # a bad name or file fails before anything loads

    @property
    def n_ctx(self) -> int:
        return max(self.prompt_tokens + 8, self.gen_tokens + 8, self.ppl_ctx + 8, self.top1_tokens + 8)
