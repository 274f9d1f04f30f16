"""Exact-match accuracy: the one metric every format and runtime is scored with.

The metric is runtime-agnostic. A runtime only supplies ``generate(text) -> str``: greedy
decoding of the rendered prompt text, returning the new text only. Everything else (which
examples, how prompts are rendered, how answers are compared) lives here, so PyTorch,
llama.cpp and ONNX Runtime numbers are comparable by construction::

    from edgepeft.evaluate import exact_match, eval_prompts
    from edgepeft.train.tasks import get_task

    task = get_task("demo")
    tok = resolve_base("smollm2-135m").load_tokenizer()   # the template lives with the tokenizer
    acc = exact_match(lambda text: my_runtime.greedy(text, max_tokens=task.max_new_tokens),
                      task.examples("eval"), tokenizer=tok)

``generate`` receives ``render_prompt(tokenizer, example.prompt)`` (chat template applied,
special tokens as literal text; see :func:`edgepeft.train.chat.render_prompt`). Without a
``tokenizer`` it receives the raw user prompt. A prediction matches when, after
:func:`normalize` (cut at the first end-of-turn marker, strip whitespace), it equals the
reference completion exactly.

A task is a bundled name (``demo``) or a JSONL file (:func:`edgepeft.train.tasks.get_task`);
:func:`score_task` scores one with a batch generator: :func:`hf_generate_batch` (PyTorch) or
:func:`runtime_generate_batch` (llama.cpp, ONNX Runtime, ORT-genai, QNN). Both stop at the same
markers (:func:`stop_markers`) after at most ``task.max_new_tokens`` tokens and return the text
before the marker, so every engine answers under one rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edgepeft.train.chat import Example, render_prompt

# Markers that end an assistant turn, in every base we support; a generation stops at the first one
# (plus the tokenizer's own EOS) and the prediction is the text before it, in PyTorch and in every runtime.
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<end_of_turn>", "<|end|>", "<eos>")


def normalize(text: str) -> str:
    for marker in END_MARKERS:
        text = text.split(marker, 1)[0]
    return text.strip()


def is_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def stop_markers(tokenizer) -> tuple[str, ...]:
    """The strings that end a generation: :data:`END_MARKERS` and the tokenizer's EOS (a transformers
    tokenizer or an artifact's :class:`~edgepeft.train.chat.ChatTemplate`)."""
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    return END_MARKERS + ((eos,) if isinstance(eos, str) and eos and eos not in END_MARKERS else ())


def cut(text: str, markers: Sequence[str]) -> str:
    """``text`` up to its first stop marker."""
    for m in markers:
        text = text.split(m, 1)[0]
    return text


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    misses: list[dict] = field(default_factory=list)  # first few wrong answers, for the report

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "misses": self.misses}


def score(predictions: Sequence[str], examples: Sequence[Example], keep_misses: int = 5) -> EvalResult:
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    correct, misses = 0, []
    for pred, ex in zip(predictions, examples):
        if is_match(pred, ex.completion):
            correct += 1
        elif len(misses) < keep_misses:
            misses.append({"prompt": ex.prompt, "expected": ex.completion, "got": normalize(pred)})
    total = len(examples)
    return EvalResult(correct / total if total else 0.0, correct, total, misses)


def eval_prompts(examples: Sequence[Example], tokenizer=None) -> list[str]:
    """The exact texts a runtime is asked to complete, in example order."""
    return [render_prompt(tokenizer, ex.prompt) if tokenizer is not None else ex.prompt for ex in examples]


def exact_match(generate: Callable[[str], str], examples: Sequence[Example], tokenizer=None) -> float:
    """Fraction of ``examples`` whose greedy completion equals the reference exactly."""
    prompts = eval_prompts(examples, tokenizer)
    return score([generate(p) for p in prompts], examples).accuracy


def exact_match_detail(generate_batch: Callable[[list[str]], list[str]], examples: Sequence[Example],
                       tokenizer=None) -> EvalResult:
    """Same metric, for runtimes that generate a whole batch of prompts at once."""
    return score(generate_batch(eval_prompts(examples, tokenizer)), examples)


def score_task(task, generate_batch: Callable[[list[str]], list[str]], tokenizer, split: str = "eval",
               limit: int | None = None) -> dict:
    """The one task score (eval, bench and the quickstart): the first ``limit`` examples of ``task``'s
    ``split``, rendered with ``tokenizer``'s chat template, greedy, exact match. ``task`` is a
    :class:`~edgepeft.train.tasks.Task` or what ``--task`` takes (a bundled name or a JSONL path)."""
    from edgepeft.train.tasks import get_task

    t = get_task(task) if isinstance(task, str) else task
    examples = t.examples(split)[:limit] if limit else t.examples(split)
    res = exact_match_detail(generate_batch, examples, tokenizer)
    return {"task": t.name, "split": split, "accuracy": round(res.accuracy, 4), "correct": res.correct,
            "total": res.total, "max_new_tokens": t.max_new_tokens, "misses": res.misses}


def runtime_generate_batch(rt, max_new_tokens: int, markers: Sequence[str] = END_MARKERS,
                           label: str = "task accuracy") -> Callable[[list[str]], list[str]]:
    """Greedy generation on any :class:`edgepeft.runtimes.base.Runtime`, one prompt at a time: the
    prompt text is tokenized with special-token parsing, and generation stops after the first token
    whose text holds a stop marker, or after ``max_new_tokens``."""
    from edgepeft.ui import track

    def run(texts: list[str]) -> list[str]:
        preds = []
        for prompt in track(texts, label, "examples"):
            rt.reset()
            rt.prefill(rt.tokenize(prompt, special=True))
            out: list[int] = []
            for _ in range(max_new_tokens):
                out.append(int(rt.logits()[-1].argmax()))
                if any(m in rt.detokenize(out[-1:]) for m in markers):
                    break
                rt.decode(1, tokens=out[-1:])
            preds.append(cut(rt.detokenize(out), markers))
        return preds

    return run


def hf_generate_batch(model, tokenizer, max_new_tokens: int, batch_size: int = 16) -> Callable[[list[str]], list[str]]:
    """Greedy batched generation with a transformers/PEFT model (left padding), with the stopping
    rule of :func:`runtime_generate_batch`: the stop markers' token ids end a row, and the text is
    decoded with special tokens kept and no space clean-up (as a runtime's detokenizer does), then
    cut at the first marker."""
    import torch

    from edgepeft.ui import stage

    markers = stop_markers(tokenizer)
    vocab = tokenizer.get_vocab()
    stop_ids = sorted({vocab[m] for m in markers if m in vocab})

    def generate(texts: list[str], device) -> list[str]:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids or None)
        texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        return [cut(t, markers) for t in texts]

    def run(texts: list[str]) -> list[str]:
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        outs: list[str] = []
        device = next(model.parameters()).device
        try:
            with stage("generate with PyTorch", total=len(texts), unit="examples") as st:
                for i in range(0, len(texts), batch_size):
                    outs.extend(generate(texts[i:i + batch_size], device))
                    st.update(completed=len(outs))
        finally:
            tokenizer.padding_side = side
        return outs

    return run


def evaluate_hf(base_spec: str, adapter: str | None = None, task: str = "demo", split: str = "eval",
                limit: int | None = None, batch_size: int = 16) -> dict:
    """Score a base (plus optional PEFT adapter folder) on a task with PyTorch."""
    import torch

    from edgepeft.models import resolve_base
    from edgepeft.train.tasks import get_task

    t = get_task(task)
    t.examples(split)  # a bad task or split fails before the model loads
    base = resolve_base(base_spec)
    if adapter is not None:
        from edgepeft.train.adapter import adapter_dir, check_base

        check_base(adapter_dir(adapter), base)  # a wrong or missing adapter fails before the model loads
    tok = base.load_tokenizer()
    model = base.load_model(torch.float32)
    if adapter is not None:
        from edgepeft.train.adapter import load_adapter

        model = load_adapter(model, adapter, base)
    model.eval()
    result = score_task(t, hf_generate_batch(model, tok, t.max_new_tokens, batch_size), tok, split, limit)
    return {**result, "base": base_spec, "adapter": adapter, "runtime": "pytorch"}
