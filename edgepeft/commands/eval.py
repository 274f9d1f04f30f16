"""edgepeft eval --base BASE [--adapter DIR] --task demo|FILE.jsonl"""

from __future__ import annotations

import click

from edgepeft.ui import echo, edgepeft_command, info, print_json


@edgepeft_command("eval", json_option=True)
@click.option("--base", default="smollm2-135m", show_default=True, help="Base model (folder, .gguf, hub id, alias).")
@click.option("--adapter", default=None, help="RUN_DIR or RUN_DIR/adapter (PEFT folder).")
@click.option("--task", default="demo", show_default=True,
              help="A bundled task (demo) or a JSONL file (prompt/completion or messages lines; the answer is the "
              "completion or the last assistant turn).")
@click.option("--split", default="eval", show_default=True, help="Task split.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N examples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
def command(base: str, adapter: str | None, task: str, split: str, limit: int | None, batch_size: int,
            as_json: bool):
    """Exact-match accuracy of a base (+ adapter) on a task's held-out split, with PyTorch."""
    from edgepeft.evaluate import evaluate_hf
    from edgepeft.train.tasks import get_task

    get_task(task).examples(split)  # bad names fail before the model loads
    result = evaluate_hf(base, adapter, task, split, limit, batch_size)
    if as_json:
        print_json(result)
        return
    echo(f"{result['task']}/{split}: exact match {result['accuracy']:.1%} ({result['correct']}/{result['total']})"
         f" base {base}" + (f" + adapter {adapter}" if adapter else ""))
    for m in result["misses"][:3]:
        info(f"  expected {m['expected']}")
        info(f"  got      {m['got']}")
