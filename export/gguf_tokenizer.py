"""Embed a Hugging Face BPE tokenizer in a GGUF so llama.cpp needs no other file.

gguf-py's ``SpecialVocab`` carries merges, special ids, add_bos/eos and the chat template.
The token list itself is built here because gguf-py's ``BpeVocab`` marks special tokens
that live inside the main vocab (SmolLM2's ``<|im_start|>`` …) as NORMAL, and llama.cpp
then splits them into pieces instead of parsing them as one control token.

llama.cpp selects its pre-tokenizer regex by name (``tokenizer.ggml.pre``). We recognise
the tokenizer.json pre-tokenizer by its structure, as data in ``PRE_TOKENIZERS``.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgepeft.errors import EdgepeftError

_LLAMA3_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
              "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
             "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")

# structural signature of tokenizer.json "pre_tokenizer" -> llama.cpp pre-tokenizer name
PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_RE), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_RE), ("ByteLevel", False)): "qwen2",
}
DEFAULT_PRE = "default"


def pre_signature(pre: dict | None) -> tuple:
    if not pre:
        return ()
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    sig = []
    for s in steps:
        kind = s.get("type")
        if kind == "ByteLevel":
            sig.append((kind, bool(s.get("use_regex", True))))
        elif kind == "Digits":
            sig.append((kind, bool(s.get("individual_digits", False))))
        elif kind == "Split":
            pat = s.get("pattern", {})
            sig.append((kind, pat.get("Regex") or pat.get("String")))
        else:
            sig.append((kind, None))
    return tuple(sig)


def effective_tokenizer_json(folder: Path) -> dict:
    """The tokenizer as transformers actually runs it, serialised.

    transformers may rebuild parts of tokenizer.json from the model type (a Qwen2 folder gets
    Qwen2's split regex whatever the file says), so the file alone can lie about what the
    PyTorch model saw in training. Falls back to the file for non-fast tokenizers.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return json.loads(backend.to_str())
    return json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))


def detect_pre(folder: Path) -> str | None:
    """The llama.cpp pre-tokenizer name for this tokenizer, or None if we do not know it."""
    return PRE_TOKENIZERS.get(pre_signature(effective_tokenizer_json(folder).get("pre_tokenizer")))


def token_list(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and types in id order, padded to the model's vocab_size like llama.cpp expects.

    From the serialised tokenizer: the BPE vocab plus
    ``added_tokens``, whose ``special`` flag makes them CONTROL tokens.
    """
    import gguf

    reverse = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    added = {a["id"]: a for a in tokenizer_json.get("added_tokens") or []}
    reverse.update({i: a["content"] for i, a in added.items()})
    if reverse and max(reverse) >= vocab_size:
        raise EdgepeftError(f"tokenizer has token id {max(reverse)} but the model's vocab_size is {vocab_size}",
                            "Resize the embeddings (model.resize_token_embeddings) and save the model again")
    tokens, types = [], []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(tok)
            special = added[i].get("special") or (tok.startswith("<|") and tok.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def add_tokenizer(writer, folder: Path, vocab_size: int) -> dict:
    """Write tokenizer.* keys for the BPE tokenizer in ``folder``. Returns what was written, for the record."""
    import gguf

    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise EdgepeftError(f"base {folder} has no tokenizer.json (GGUF export embeds the tokenizer)",
                            "Save the tokenizer next to the weights: tokenizer.save_pretrained(folder)")
    data = effective_tokenizer_json(folder)
    model_type = data.get("model", {}).get("type")
    if model_type != "BPE":
        raise EdgepeftError(f"base {folder}: tokenizer model {model_type!r} is not supported for GGUF export",
                            "Supported: byte-level BPE tokenizers (Llama 3, SmolLM, Qwen2)")
    tokens, types = token_list(data, vocab_size)
    pre = PRE_TOKENIZERS.get(pre_signature(data.get("pre_tokenizer")))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or DEFAULT_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    add_bos = special.add_special_token.get("bos")
    if add_bos is None:  # say it explicitly: llama.cpp's default for BPE vocabs is to add one
        add_bos = _template_adds_bos(data)
        writer.add_add_bos_token(add_bos)
    return {"model": "gpt2", "pre": pre or DEFAULT_PRE, "pre_recognised": pre is not None, "tokens": len(tokens),
            "merges": len(special.merges), "special_ids": dict(special.special_token_ids),
            "chat_template": bool(special.chat_template), "add_bos": bool(add_bos)}


def _template_adds_bos(tokenizer_json: dict) -> bool:
    """Does the tokenizer's post-processor put a special token before the text?"""
    post = tokenizer_json.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            return bool(single) and "SpecialToken" in single[0]
    return False
