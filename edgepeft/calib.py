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

Which data calibrates a quantizer (an importance matrix, ONNX int4's GPTQ/AWQ) is chosen in one place,
:func:`select_calibration`: ``--calib FILE`` when given; else, when an ``--adapter`` is a training run
dir, that run's own data (its manifest records the path and sha256; the hash is checked before use):
the held-out part when the manifest records one (``data.held_out``), else a seeded sample of the training
data. A bundled task's ``eval`` split is NOT taken as held-out: it is the set eval and bench score, so
calibrating on it would grade the quantizer on its own data. Without either, the bundled wikitext-2
slice, named in the record and in one status line.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgepeft.errors import EdgepeftError
from edgepeft.fingerprint import sha256_file

if TYPE_CHECKING:
    import numpy as np

Pairs = list[tuple[str, str]]


def load_calibration(path, limit: int = 64, tokenizer=None) -> Pairs:
    """(prompt, completion) pairs from a JSONL file: keys prompt/completion, input/output, messages (the last
    assistant turn is the completion, the turns before it the prompt), or text.

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
                                "Each line needs prompt+completion, input+output, messages with an assistant turn, "
                                "or text")
        prompt, completion = pair
        if prompt and (tokenizer is not None or isinstance(prompt, list)):
            prompt = render_prompt(tokenizer, prompt)
        pairs.append((prompt, completion))
        if len(pairs) >= limit:
            break
    if not pairs:
        raise EdgepeftError(f"--calib {path} is empty", "Pass a JSONL file with prompt/completion lines")
    return pairs


def demo_calibration(tokenizer, n: int = 24) -> Pairs:
    """The demo task's eval split, prompts chat-rendered (torch_loss_evaluator's pairs when none are given)."""
    from edgepeft.train.chat import render_prompt
    from edgepeft.train.tasks import get_task

    return [(render_prompt(tokenizer, ex.prompt), ex.completion) for ex in get_task("demo").examples("eval")[:n]]


# --- which data calibrates a quantizer --------------------------------------------------------------

BUNDLED_TEXT = Path(__file__).parent / "data" / "wikitext2-valid-slice.txt"
BUNDLED_NAME = "bundled wikitext-2 slice"
# export/verify.py scores perplexity on the slice's first 2 x 64 tokens: calibration starts well after them
BUNDLED_SKIP_CHARS = 4096
BUNDLED_CHUNK_CHARS = 768  # ~200 tokens per text: 80 texts in the slice
SAMPLE_SEED = 0  # the sample of a run's training data is the same on every export
DEFAULT_LIMIT = 64


@dataclass(frozen=True)
class CalibRequest:
    """What :func:`select_calibration` reads (an ``ExportRequest`` has the same fields)."""

    adapters: Sequence[Path] = ()
    calib: Path | None = None
    calib_limit: int = DEFAULT_LIMIT


@dataclass(frozen=True)
class Calibration:
    """The calibration set one export uses, and where it came from.

    ``pairs`` are chat-rendered (prompt, completion), exactly what the model sees (``text`` rows and the
    bundled slice have an empty prompt); ``texts`` joins each pair. ``sha256`` is the hash of the data the
    pairs were drawn from: for a training run, the hash its manifest recorded (checked on load); for a file
    or the bundled slice, of the file's bytes.
    """

    pairs: Pairs
    source: str  # one line for a user: "training run data (task:demo): 64-sample of 2000"
    kind: str  # run-held-out | run-sample | file | bundled
    sha256: str

    @property
    def texts(self) -> list[str]:
        return [p + c for p, c in self.pairs]

    def record(self) -> dict:
        """The record's ``calibration`` entry (and what an artifact's metadata carries): no host path."""
        return {"source": self.source, "kind": self.kind, "sha256": self.sha256, "texts": len(self.pairs)}


def calibration_passes(req, plans) -> list[list]:
    """The adapters each calibration set is selected from (``select_calibration``'s ``adapters``), one per pass:
    separate mode, one per adapter plan, on its own run's data; merged, one on every ``--adapter``."""
    if req.mode == "separate":
        return [[p.source] if p.source else [] for p in plans]
    return [list(req.adapters)]


def select_calibration(req, tokenizer, *, say: Callable[[str], None] | None = None) -> Calibration:
    """The calibration set for ``req`` (``.calib``, ``.adapters``, optional ``.calib_limit``); one status line.

    Order: ``--calib FILE``; else the first ``--adapter`` that is a training run (its held-out part, else a
    seeded sample of its training data, hash-checked); else the bundled wikitext-2 slice.
    """
    limit = int(getattr(req, "calib_limit", None) or DEFAULT_LIMIT)
    calib = getattr(req, "calib", None)
    if calib:
        pairs = load_calibration(calib, limit=limit, tokenizer=tokenizer)
        found = Calibration(pairs, f"--calib {calib}", "file", sha256_file(Path(calib)))
    else:
        found = next((c for c in (_from_run(Path(a), tokenizer, limit) for a in getattr(req, "adapters", ()) or ())
                      if c is not None), None)
        if found is None:
            found = bundled_calibration(limit)
    if say is None:
        from edgepeft.ui import info as say
    say(f"calibration: {found.source} ({len(found.pairs)} texts, sha256 {found.sha256[:12]})")
    return found


def bundled_calibration(limit: int = DEFAULT_LIMIT, start: int = 0) -> Calibration:
    """Text chunks of the bundled wikitext-2 slice (after the part the verifier scores), empty prompts: ``limit``
    of them from chunk ``start`` on (so two users of the slice can take disjoint chunks)."""
    raw = BUNDLED_TEXT.read_text(encoding="utf-8")
    body = raw[raw.index("\n", BUNDLED_SKIP_CHARS) + 1:]  # from a paragraph start
    words = " ".join(p.strip() for p in body.split("\n") if p.strip() and not p.strip().startswith("=")).split(" ")
    chunks, cur = [], []
    for w in words:
        cur.append(w)
        if sum(map(len, cur)) + len(cur) >= BUNDLED_CHUNK_CHARS:
            chunks.append(" ".join(cur))
            cur = []
            if len(chunks) >= start + limit:
                break
    return Calibration([("", c) for c in chunks[start:]], BUNDLED_NAME, "bundled", sha256_file(BUNDLED_TEXT))


# --- what GPTQ's Hessians are collected on ----------------------------------------------------------
# GPTQ moves each column's rounding error where the calibration inputs do not look, so what they leave out
# pays. The fine-tune's data alone kept the task and raised held-out wikitext-2 perplexity past plain RTN's;
# task + generic text kept both better (merged int4 on smollm2-135m + the quickstart adapter, fp32 merged 28.48 /
# demo 96 %: RTN 33.25 / 87 %, GPTQ on 32 task texts 35.64 / 98 %, on 32 task texts + 16 wikitext chunks
# 31.85 / 97 %; benchmarks/results/onnx_gptq.json)
GPTQ_TASK_TEXTS = 32
GPTQ_TEXT_CHUNKS = 16


def with_generic_text(found: Calibration) -> tuple[Calibration, Calibration | None]:
    """``found`` cut to ``GPTQ_TASK_TEXTS``, and the generic text to add to it: ``GPTQ_TEXT_CHUNKS`` bundled
    wikitext-2 chunks, disjoint from the ones ``--merge-into auto`` scores on; None when ``found`` is the bundled
    slice itself (or the chunk count is 0)."""
    task = Calibration(found.pairs[:GPTQ_TASK_TEXTS], found.source, found.kind, found.sha256)
    if found.kind == "bundled" or GPTQ_TEXT_CHUNKS <= 0:
        return task, None
    return task, bundled_calibration(GPTQ_TEXT_CHUNKS, start=MERGE_TEXT_CHUNKS)


# --- what --merge-into auto scores ---------------------------------------------------------------
MERGE_TASK_LIMIT = 24  # task pairs per candidate
MERGE_TEXT_CHUNKS = 4  # bundled wikitext-2 chunks per candidate (~200 tokens each)


@dataclass(frozen=True)
class MergeChoice:
    """The two sets ``--merge-into auto`` scores each candidate on, after its quantization, in the target runtime.

    ``task``: the fine-tune's own data (``--calib``, else the training run's held-out part or a seeded sample of
    its data, as :func:`select_calibration` picks; None when neither exists). ``text``: generic text (the bundled
    wikitext-2 slice, after the part the verifier scores). A candidate's loss is the sum of both mean NLLs per
    token: the task alone picked a merge into the NF4-dequantized base that kept the demo (96 vs 92 % for the
    original base) at 1.31x the original's perplexity on held-out wikitext (smollm2-135m, Q4_K_M, session 12).
    ``tokenizer`` (the base's; a merge keeps it) turns both into ids.
    """

    task: Calibration | None
    text: Calibration
    tokenizer: object = field(repr=False, compare=False)

    @classmethod
    def for_request(cls, req, tokenizer, also: str = "") -> MergeChoice:
        """The sets for ``req`` (``.calib``, ``.adapters``); a run whose data moved or changed is refused with a
        fix naming ``--merge-into`` (``also``: further options the same data needs, e.g. `` --imatrix none``)."""
        try:
            found = select_calibration(CalibRequest(adapters=req.adapters, calib=req.calib,
                                                    calib_limit=MERGE_TASK_LIMIT), tokenizer, say=lambda _line: None)
        except EdgepeftError as e:
            if req.calib:
                raise
            raise EdgepeftError(f"--merge-into auto: {e.problem}", "Restore the run's data, pass --calib FILE, "
                                f"or choose --merge-into original (or dequantized){also}") from e
        task = found if found.kind != "bundled" else None
        if task:
            require_scoreable(tokenizer, task.pairs)
        return cls(task, bundled_calibration(MERGE_TEXT_CHUNKS), tokenizer)

    def losses(self, logits: Callable[[list[int]], np.ndarray]) -> dict[str, float]:
        """{"task": mean NLL, "text": mean NLL} of one candidate's ``logits(ids)``."""
        out = {"task": completion_nll(logits, self.tokenizer, self.task.pairs)} if self.task else {}
        out["text"] = completion_nll(logits, self.tokenizer, self.text.pairs)
        return out

    def record(self) -> dict:
        return {"task": self.task.record() if self.task else None, "text": self.text.record()}

    def describe(self) -> str:
        task = f"{len(self.task.pairs)} task pairs" if self.task else "no task data"
        return f"{task} + {len(self.text.pairs)} wikitext-2 chunks"


def _from_run(adapter: Path, tokenizer, limit: int) -> Calibration | None:
    """The calibration a training run's manifest names, or None when ``adapter`` is no training run."""
    from edgepeft.keys import TRAIN_MANIFEST
    from edgepeft.train.manifest import read_manifest

    manifest = read_manifest(adapter)
    data = manifest.get("data") if isinstance(manifest.get("data"), dict) else None
    if not data or not isinstance(data.get("source"), str) or not isinstance(data.get("sha256"), str):
        return None
    where = next(c for c in (adapter / TRAIN_MANIFEST, adapter.resolve().parent / TRAIN_MANIFEST) if c.is_file())
    held = data.get("held_out")
    if isinstance(held, dict) and isinstance(held.get("source"), str) and isinstance(held.get("sha256"), str):
        records, name = _run_records(held["source"], held["sha256"], where, "held-out data")
        return Calibration(_render_records(records[:limit], tokenizer), f"training run held-out data ({name})",
                           "run-held-out", held["sha256"])
    records, name = _run_records(data["source"], data["sha256"], where, "training data")
    picked = records if len(records) <= limit else random.Random(SAMPLE_SEED).sample(records, limit)
    part = f"{len(picked)}-sample of {len(records)}" if len(picked) < len(records) else f"all {len(records)} rows"
    return Calibration(_render_records(picked, tokenizer), f"training run data ({name}): {part}", "run-sample",
                       data["sha256"])


def _run_records(source: str, recorded: str, manifest: Path, what: str):
    """The records a manifest names (a bundled task or a JSONL path relative to it), hash-checked."""
    from edgepeft.paths import from_record
    from edgepeft.train.data import data_sha256, load_jsonl, records_from_examples
    from edgepeft.train.tasks import TASKS

    if source.startswith("task:"):
        task = TASKS.get(source[len("task:"):])
        if task is None:
            raise EdgepeftError(f"{manifest} records {what} {source}, which this edgepeft does not bundle",
                                f"Pass --calib FILE, or --imatrix none. Bundled tasks: {', '.join(TASKS)}")
        records, name = records_from_examples(task.examples("train"), source), source
    else:
        path = from_record(source, manifest)
        if not path.is_file():
            raise EdgepeftError(f"{manifest} records {what} {source}, which is not there ({path})",
                                "Put the file back, pass --calib FILE, or --imatrix none")
        records, name = load_jsonl(path), source
    found = data_sha256(records)
    if found != recorded:
        raise EdgepeftError(f"the {what} {name} has sha256 {found[:12]}, but {manifest} records {recorded[:12]} "
                            "(it changed since training)",
                            "Restore the data the run was trained on, pass --calib FILE, or --imatrix none")
    return records, name


def _render_records(records, tokenizer) -> Pairs:
    """Training conversations as (rendered prompt, last assistant turn): what the model sees at inference."""
    from edgepeft.train.chat import render_prompt

    out = []
    for r in records:
        last = max(i for i, m in enumerate(r.messages) if m["role"] == "assistant")
        out.append((render_prompt(tokenizer, r.messages[:last]), r.messages[last]["content"]))
    return out



def _pair(row) -> tuple[str, str | list[dict]] | None:
    """(user prompt or chat messages before the last assistant turn, completion) of one JSONL row."""
    if not isinstance(row, dict):
        return None
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
        if last is None:
            return None
        return [{"role": m["role"], "content": m["content"]} for m in msgs[:last]], msgs[last]["content"]
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


def _scored(tokenizer, pairs: Pairs, max_len: int):
    """(ids, index of the first scored token) of each pair with a completion token to score."""
    for prompt, completion in pairs:
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = (list(p_ids) + list(c_ids))[:max_len]
        n_ctx = max(len(p_ids), 1)  # the first token has no prediction
        if len(ids) > n_ctx:
            yield ids, n_ctx


def require_scoreable(tokenizer, pairs: Pairs, max_len: int = 256) -> None:
    """Raise the one-line error :func:`completion_nll` would, before any work is done on ``pairs``."""
    if next(_scored(tokenizer, pairs, max_len), None) is None:
        raise _no_tokens()


def _no_tokens() -> EdgepeftError:
    return EdgepeftError("the calibration set has no completion tokens to score",
                         "Pass --calib lines with non-empty completions (or text)")


def completion_nll(logits: Callable[[list[int]], np.ndarray], tokenizer, pairs: Pairs, max_len: int = 256) -> float:
    """Mean NLL per completion token; ``logits(ids)`` gives (len(ids), vocab) logits for every position."""
    total, count = 0.0, 0
    for ids, n_ctx in _scored(tokenizer, pairs, max_len):
        nll = token_nll(logits(ids)[n_ctx - 1: len(ids) - 1], ids[n_ctx:])
        total += float(nll.sum())
        count += len(nll)
    if count == 0:
        raise _no_tokens()
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
