"""Embed a Hugging Face BPE tokenizer in a GGUF so llama.cpp needs no other file.

Two kinds of BPE: byte-level (GPT-2 style: Llama 3, SmolLM, Qwen) and SentencePiece-style
(Gemma: the normalizer turns spaces into ``▁``, merges run on raw UTF-8 and unknown bytes fall
back to ``<0xXX>`` tokens). Both are written as llama.cpp's ``gpt2`` vocab type, as the
pinned ``convert_hf_to_gguf.py`` writes a Gemma 3 folder that has no ``tokenizer.model``; only
the pre-tokenizer name tells llama.cpp which of the two it is.

gguf-py's ``SpecialVocab`` carries merges, special ids, add_bos/eos and the chat template.
The token list itself is built here because gguf-py's ``BpeVocab`` marks special tokens
that live inside the main vocab (SmolLM2's ``<|im_start|>`` …) as NORMAL, and llama.cpp
then splits them into pieces instead of parsing them as one control token.

llama.cpp selects its pre-tokenizer regex by name (``tokenizer.ggml.pre``). We recognise
the tokenizer.json pre-tokenizer by its structure, as data in ``PRE_TOKENIZERS``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Self

from edgepeft.errors import EdgepeftError
from edgepeft.keys import PREFIX

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
    # SentencePiece-style BPE (Gemma 3 as transformers builds it). The name is the one the pinned
    # convert_hf_to_gguf.py picks for the Gemma 3 vocabulary (its hash table lists that model
    # first); llama.cpp maps it and "gemma4" to one pre-tokenizer: split at newlines only, spaces
    # as U+2581, no byte-level encoding. Under "default" llama.cpp byte-encodes the text instead
    # (a space becomes "Ġ", which this vocab lacks) and no id matches Hugging Face's.
    (("Replace", " ", "\u2581"), ("Split", " ")): "granite-embed-multi-311m",
    (("Replace", " ", "\u2581"),): "granite-embed-multi-311m",
}
DEFAULT_PRE = "default"


def _steps(node: dict | None, key: str) -> list[dict]:
    if not node:
        return []
    return node[key] if node.get("type") == "Sequence" else [node]


def pre_signature(pre: dict | None, normalizer: dict | None = None) -> tuple:
    """Structure of the normalizer's Replace steps (SentencePiece-style spaces) and of the pre-tokenizer."""
    sig = []
    for n in _steps(normalizer, "normalizers"):
        if n.get("type") == "Replace":
            pat = n.get("pattern", {})
            sig.append(("Replace", pat.get("String") or pat.get("Regex"), n.get("content")))
    for s in _steps(pre, "pretokenizers"):
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
    return json.loads(_effective_tokenizer_text(folder))


def _effective_tokenizer_text(folder: Path) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    return (folder / "tokenizer.json").read_text(encoding="utf-8")


# Files whose content decides what AutoTokenizer builds (config.json: the model type picks the class).
_TOKENIZER_INPUTS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                     "config.json")
_RESOLVED: dict[str, dict] = {}  # content key -> effective tokenizer.json, for this process
_RUNNING: dict[str, TokenizerJob] = {}


def tokenizer_job(folder: Path) -> TokenizerJob:
    """The job resolving ``folder``'s tokenizer: already done, already running, or started now.

    Use it as a context manager; leaving the block stops a child that is still running.
    """
    key = _content_key(Path(folder))
    return _RUNNING.get(key) or TokenizerJob(Path(folder), key)


class TokenizerJob:
    """``effective_tokenizer_json(folder)``, computed in a child process while the caller goes on.

    Why a child: AutoTokenizer means importing transformers and torch and building the fast
    tokenizer, about 6 s of one core for SmolLM2 (measured), which was more than half of a
    Q4_K_M export. Writing the tensors and llama.cpp's quantizer need no vocabulary, so the
    export runs them meanwhile and asks for the result only when it writes the tokenizer keys.

    Results are kept by the content of the tokenizer files: in this process (the candidate
    GGUFs of ``--merge-into auto`` resolve once) and in ``<cache>/tokenizers/`` with the
    transformers and tokenizers versions in the key (a second export of a base starts no child).
    """

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key
        self._proc = self._out = self._log = None
        if key in _RESOLVED or self._load_disk_cache():
            return
        fd, name = tempfile.mkstemp(prefix="edgepeft-tokenizer-", suffix=".json")
        os.close(fd)
        self._out = Path(name)
        from edgepeft.ui import STATE

        # a file, not a pipe (no full-pipe stall); it lives as long as the job, closed in close()
        self._log = None if STATE.debug else tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen([sys.executable, "-m", "edgepeft.export.gguf_tokenizer", str(folder),
                                       str(self._out)], stdout=subprocess.DEVNULL, stderr=self._log)
        _RUNNING[key] = self

    def done(self) -> bool:
        return self.key in _RESOLVED or self._proc is None or self._proc.poll() is not None

    def result(self) -> dict:
        if self.key not in _RESOLVED:
            self._proc.wait()
            try:
                if self._proc.returncode != 0:
                    err = b""
                    if self._log is not None:
                        self._log.seek(0)
                        err = self._log.read()
                    lines = err.decode(errors="replace").strip().splitlines()
                    raise EdgepeftError(f"transformers could not load the tokenizer in {self.folder}: "
                                        f"{lines[-1] if lines else f'exit status {self._proc.returncode}'}",
                                        "Check that AutoTokenizer.from_pretrained(folder) works; "
                                        "rerun with --debug for the full error")
                text = self._out.read_text(encoding="utf-8")
                _RESOLVED[self.key] = json.loads(text)
                self._store_disk_cache(text)
            finally:
                self.close()
        return _RESOLVED[self.key]

    def close(self) -> None:
        """Stop the child (if still running) and remove its output; safe to call twice."""
        if _RUNNING.get(self.key) is self:
            del _RUNNING[self.key]
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._out is not None:
            self._out.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _disk_cache(self) -> Path:
        return _disk_cache_path(self.key)

    def _load_disk_cache(self) -> bool:
        try:
            _RESOLVED[self.key] = json.loads(self._disk_cache().read_text(encoding="utf-8"))
            return True
        except (OSError, ValueError):  # missing or damaged: resolve it again
            return False

    def _store_disk_cache(self, text: str) -> None:
        from edgepeft import atomic

        try:
            path = self._disk_cache()
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(path, text)
        except (OSError, EdgepeftError):  # only a cache: an unwritable one costs the next export a child
            pass


def _disk_cache_path(key: str) -> Path:
    from importlib.metadata import version

    from edgepeft.models import cache_dir

    versions = f"transformers={version('transformers')} tokenizers={version('tokenizers')}"
    key = hashlib.sha256(f"{key}\0{versions}".encode()).hexdigest()[:32]
    return cache_dir() / "tokenizers" / f"{key}.json"


def cached_tokenizer_text(folder: Path) -> str | None:
    """The effective tokenizer.json of ``folder`` as an earlier job stored it on disk, or None (no child started)."""
    try:
        return _disk_cache_path(_content_key(Path(folder))).read_text(encoding="utf-8")
    except OSError:
        return None


def _content_key(folder: Path) -> str:
    h = hashlib.sha256()
    for name in _TOKENIZER_INPUTS:
        f = folder / name
        h.update(name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"-") + b"\0")
    return h.hexdigest()


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


def add_tokenizer(writer, folder: Path, vocab_size: int, data: dict) -> dict:
    """Write tokenizer.* keys for the BPE tokenizer in ``folder``. Returns what was written, for the record.

    ``data`` is the effective tokenizer.json (:class:`TokenizerJob`'s result).
    """
    import gguf

    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise EdgepeftError(f"base {folder} has no tokenizer.json (GGUF export embeds the tokenizer)",
                            "Save the tokenizer next to the weights: tokenizer.save_pretrained(folder)")
    model_type = data.get("model", {}).get("type")
    if model_type != "BPE":
        raise EdgepeftError(f"base {folder}: tokenizer model {model_type!r} is not supported for GGUF export",
                            "Supported: BPE tokenizers, byte-level (Llama 3, SmolLM, Qwen) or "
                            "SentencePiece-style (Gemma 3)")
    tokens, types = token_list(data, vocab_size)
    pre = PRE_TOKENIZERS.get(pre_signature(data.get("pre_tokenizer"), data.get("normalizer")))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or DEFAULT_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # gguf-py warns on stderr about templates llama.cpp ignores anyway (Gemma's pair template has
    # <bos> as separator); our stderr stays the stage lines
    log = logging.getLogger("gguf.vocab")
    level, _ = log.level, log.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    finally:
        log.setLevel(level)
    special.add_to_gguf(writer, quiet=True)
    add_bos = special.add_special_token.get("bos")
    if add_bos is None:  # say it explicitly: llama.cpp's default for BPE vocabs is to add one
        add_bos = _template_adds_bos(data)
        writer.add_add_bos_token(add_bos)
    return {"model": "gpt2", "pre": pre or DEFAULT_PRE, "pre_recognised": pre is not None, "tokens": len(tokens),
            "merges": len(special.merges), "special_ids": dict(special.special_token_ids),
            "chat_template": bool(special.chat_template), "add_bos": bool(add_bos)}


def copy_with_tokenizer(src: Path, dst: Path, folder: Path, vocab_size: int, job: TokenizerJob,
                        extra: dict[str, str] | None = None) -> dict:
    """Write ``dst`` = GGUF ``src`` plus the tokenizer keys (and ``extra`` string keys last), tensors copied
    byte for byte.

    The exporter quantizes an intermediate that has no tokenizer (llama.cpp's quantizer copies
    the keys it finds and reads no vocabulary) while ``job`` is still running, then adds the
    tokenizer here. The keys go before our ``edgepeft.*`` keys, where a converter puts them.
    """
    import gguf

    reader = gguf.GGUFReader(str(src))
    data = job.result()  # after parsing src: that much less to do once the child is done
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(dst), arch, use_temp_file=False)
    written = None
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # GGUFWriter writes these itself
        if written is None and field.name.startswith(PREFIX):
            written = add_tokenizer(writer, folder, vocab_size, data)
        vtype = field.types[0]
        writer.add_key_value(field.name, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    if written is None:
        written = add_tokenizer(writer, folder, vocab_size, data)
    for k, v in (extra or {}).items():
        writer.add_string(k, v)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return written


def _template_adds_bos(tokenizer_json: dict) -> bool:
    """Does the tokenizer's post-processor put a special token before the text?"""
    post = tokenizer_json.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            return bool(single) and "SpecialToken" in single[0]
    return False


def _child_main(folder: str, out: str) -> None:
    """The child :class:`TokenizerJob` starts: write the effective tokenizer.json to ``out``."""
    text = _effective_tokenizer_text(Path(folder))
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    # Skip interpreter teardown: unloading torch and transformers costs ~0.9 s (measured) and
    # the parent is waiting; the file is closed and there is nothing else to flush.
    os._exit(0)


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
