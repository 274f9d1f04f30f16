"""Held-out calibration text and the one completion NLL every engine is scored with.

A calibration set is a list of ``(prompt, completion)`` pairs: the exact text a model sees
(prompts already chat-rendered; ``text``-only lines have an empty prompt). The NLL is the mean
negative log-likelihood per completion token; prompt tokens are context only, and a pair
without a prompt scores every token after its first (the first has no prediction).

Engines differ only in how they produce logits, so each passes a ``logits(ids)`` function
returning ``(len(ids), vocab)`` float logits for every position::

    completion_nll(torch_logits(model), tok, pairs)      # PyTorch (merge-target choice)
    completion_nll(runtime_logits(rt), tok, pairs)       # any edgepeft.runtimes Runtime
    completion_nll(lambda ids: lm.logits(ids), tok, pairs)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgepeft.errors import EdgepeftError

if TYPE_CHECKING:
    import numpy as np

Pairs = list[tuple[str, str]]


def load_calibration(path, limit: int = 64, tokenizer=None) -> Pairs:
    """(prompt, completion) pairs from a JSONL file: keys prompt/completion, input/output, or text.

    Prompts are user turns: pass ``tokenizer`` to render them with its chat template, as training
    and evaluation do (``text`` lines are raw, with an empty prompt).
    """
    from edgepeft.train.chat import render_prompt

    path = Path(path)
    if not path.is_file():
        raise EdgepeftError(f"--calib {path} does not exist", "Pass a JSONL file with prompt/completion lines")
    pairs = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgepeftError(f"--calib {path} line {i} is not JSON ({e.msg})", "One JSON object per line") from e
        pair = _pair(row)
        if pair is None:
            raise EdgepeftError(f"--calib {path} line {i} has keys {sorted(row) if isinstance(row, dict) else row!r}",
                                "Each line needs prompt+completion, input+output, or text")
        prompt, completion = pair
        if tokenizer is not None and prompt:
            prompt = render_prompt(tokenizer, prompt)
        pairs.append((prompt, completion))
        if len(pairs) >= limit:
            break
    if not pairs:
        raise EdgepeftError(f"--calib {path} is empty", "Pass a JSONL file with prompt/completion lines")
    return pairs


def demo_calibration(tokenizer, n: int = 24) -> Pairs:
    """The default calibration set: the demo task's eval split, prompts chat-rendered."""
    from edgepeft.train.chat import render_prompt
    from edgepeft.train.tasks import get_task

    return [(render_prompt(tokenizer, ex.prompt), ex.completion) for ex in get_task("demo").examples("eval")[:n]]


def calibration_pairs(tokenizer, calib=None, limit: int = 32) -> Pairs:
    """``--calib FILE`` rendered with ``tokenizer``, or the demo eval split when no file is given."""
    return load_calibration(calib, limit=limit, tokenizer=tokenizer) if calib else demo_calibration(tokenizer)


def _pair(row) -> tuple[str, str] | None:
    if not isinstance(row, dict):
        return None
    for p, c in (("prompt", "completion"), ("input", "output"), ("prompt", "response")):
        if isinstance(row.get(p), str) and isinstance(row.get(c), str):
            return row[p], row[c]
    if isinstance(row.get("text"), str):
        return "", row["text"]
    return None


def token_nll(logits, targets: Sequence[int]) -> np.ndarray:
    """-log softmax(logits)[i, targets[i]] per row, in float64 (max-subtracted, so it never overflows)."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return -logp[np.arange(len(targets)), np.asarray(targets)]


def completion_nll(logits: Callable[[list[int]], np.ndarray], tokenizer, pairs: Pairs, max_len: int = 256) -> float:
    """Mean NLL per completion token; ``logits(ids)`` gives (len(ids), vocab) logits for every position."""
    total, count = 0.0, 0
    for prompt, completion in pairs:
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = (list(p_ids) + list(c_ids))[:max_len]
        n_ctx = max(len(p_ids), 1)  # the first token has no prediction
        if len(ids) <= n_ctx:
            continue
        nll = token_nll(logits(ids)[n_ctx - 1: len(ids) - 1], ids[n_ctx:])
        total += float(nll.sum())
        count += len(nll)
    if count == 0:
        raise EdgepeftError("the calibration set has no completion tokens to score",
                            "Pass --calib lines with non-empty completions (or text)")
    return total / count


def torch_logits(model) -> Callable[[list[int]], np.ndarray]:
    """``logits(ids)`` for a transformers/PEFT causal LM, fp32, no grad."""
    import torch

    model.eval()

    def run(ids: list[int]):
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()

    return run


def runtime_logits(rt) -> Callable[[list[int]], np.ndarray]:
    """``logits(ids)`` for any :class:`edgepeft.runtimes.base.Runtime`: fresh KV cache, every position kept."""

    def run(ids: list[int]):
        rt.reset()
        rt.prefill(ids, all_logits=True)
        return rt.logits()

    return run
