"""Shared fixtures: tiny random models built from config with the real SmolLM2 tokenizer.

The tokenizer comes from the embedded smollm2-135m GGUF (no network). Tiny models have
2 layers and hidden size 64, GQA (4 query heads, 2 KV heads) so Q/K permutations and
head grouping are exercised, and a larger-than-default init so logits are peaked and
top-1 comparisons are meaningful.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "initializer_range": 0.08}


# The suite runs on xdist workers (pyproject: -n 2 --dist loadfile; one file stays on one worker, so its
# module fixtures are built once). The files that take longest go first, so none starts last and runs alone.
FIRST = ("test_wheel.py", "test_verify.py", "test_gemma.py", "test_cpu_4bit.py", "test_onnx_integration.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: the rest keep their order


def pytest_configure(config):
    """Under xdist the controller resolves the embedded base once, before any worker starts, so the workers
    never dequantize it at the same time into the same cache (a clean machine's first run)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        from edgepeft.models import resolve_base

        resolve_base("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded base (dequantized once, then cached)."""
    from edgepeft.models import resolve_base

    return resolve_base("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer_dir(smollm2, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(smollm2.path).save_pretrained(d)
    return d


def make_tiny(model_type: str, out: Path, tokenizer_dir: Path, seed: int = 0, **config) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = {"tie_word_embeddings": model_type == "qwen2", "pad_token_id": tok.pad_token_id, **TINY, **config}
    cfg = AutoConfig.for_model(
        model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        torch_dtype="float32", **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def make_gemma_tokenizer(out: Path, vocab_size: int = 700) -> Path:
    """A tiny tokenizer built the way Gemma's is: BPE over raw UTF-8 with spaces as U+2581, ``<0xXX>``
    byte fallback, ``<bos>`` added; merges trained on the package's held-out text and the verifier's
    prompts (so they tokenize into real merges), saved through transformers' own GemmaTokenizer."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    import edgepeft
    from edgepeft.export.verify import PROMPTS

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    text = (Path(edgepeft.__file__).parent / "data" / "wikitext2-valid-slice.txt").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip()] + list(PROMPTS)
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tk.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                      show_progress=False))
    trained = json.loads(tk.to_str())["model"]
    learned = [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + learned)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny("qwen2", tmp_path_factory.mktemp("tiny-qwen2"), tokenizer_dir)


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request, tiny_llama, tiny_qwen2) -> Path:
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}[request.param]


def run_cli(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (as a user would), capturing output."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "edgepeft", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=e, timeout=timeout, check=False)


@pytest.fixture
def cli():
    return run_cli


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Bad input: exit 2, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("edgepeft: error: "), err
    for n in needles:
        assert n.lower() in err.lower(), (n, err)
