"""Chat rendering shared by training, evaluation and every runtime.

One function turns a user prompt into the exact text a model sees, via the tokenizer's own
chat template, so PyTorch, llama.cpp and ONNX Runtime are all scored on identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One prompt/completion pair; ``prompt`` is the user turn (or the chat turns before the answer),
    before any chat template."""

    prompt: str | list[dict]
    completion: str


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The text a runtime must complete: chat template applied, assistant turn opened.

    ``prompt`` is a user message or a list of chat messages ending before the assistant
    reply. The text carries special tokens literally (``<|im_start|>`` ...): tokenize it with
    special-token parsing on and without adding a BOS of your own (llama.cpp:
    ``tokenize(text.encode(), add_bos=False, special=True)``).
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return render_messages(tokenizer, messages, add_generation_prompt=True)


def render_messages(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """``messages`` as the model sees them: the tokenizer's chat template, or without one (Gemma 3 270M's
    base GGUF has none) a plain transcript, ``role: content`` lines.

    In the plain transcript every assistant turn ends with the tokenizer's EOS, so training teaches the
    model to stop and generation stops there (:func:`edgepeft.evaluate.stop_markers`). Without it the
    Gemma 3 adapter answered correctly, then repeated the answer up to the token limit and scored 0 %."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    eos = getattr(tokenizer, "eos_token", None)
    end = eos if isinstance(eos, str) else ""
    text = "".join(f"{m['role']}: {m['content']}{end if m['role'] == 'assistant' else ''}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template as an artifact carries it (GGUF ``tokenizer.chat_template``, an ONNX folder's
    tokenizer files), usable wherever :func:`render_prompt` takes a tokenizer."""

    chat_template: str | None
    bos_token: str = ""
    eos_token: str = ""

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True) -> str:
        from transformers.utils.chat_template_utils import _compile_jinja_template  # the renderer HF uses

        return _compile_jinja_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
            eos_token=self.eos_token)


def folder_template(folder) -> ChatTemplate:
    """The template a transformers tokenizer folder holds (``chat_template.jinja`` or tokenizer_config.json)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    jinja = folder / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else cfg.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)

    def token(v) -> str:
        return (v.get("content", "") if isinstance(v, dict) else v) or ""

    return ChatTemplate(template or None, token(cfg.get("bos_token")), token(cfg.get("eos_token")))
