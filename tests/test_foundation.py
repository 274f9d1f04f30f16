"""Foundation: CLI plumbing, model resolution, fingerprints, install layout."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys

import pytest
from conftest import assert_clean_error


def heavy_modules_after(code: str, heavy=("torch", "transformers", "bitsandbytes", "onnxruntime", "llama_cpp")):
    """Run ``code`` in a fresh interpreter; return (its stdout, which heavy SDKs it imported)."""
    probe = f"{code}\nimport sys\nprint('HEAVY', [m for m in {heavy!r} if m in sys.modules])"
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    return p.stdout, ast.literal_eval(p.stdout.rsplit("HEAVY ", 1)[1])


def test_help_lists_only_registered_commands_and_imports_nothing_heavy(cli):
    out, heavy = heavy_modules_after("from edgepeft.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit: pass")
    assert heavy == []
    from edgepeft.cli import COMMANDS

    for name in COMMANDS:
        assert name in out


def test_version_and_module_entry(cli):
    from edgepeft import __version__

    p = cli("--version")
    assert p.returncode == 0 and __version__ in p.stdout


ENTRY = """
import atexit, sys
import torch  # a heavy module loaded, as a real command has: the teardown entry() skips
from edgepeft import cli
atexit.register(lambda: print("atexit ran", file=sys.stderr, flush=True))
sys.argv = ["edgepeft", *sys.argv[1:]]
cli.entry()
print("not reached", file=sys.stderr)
"""


@pytest.mark.parametrize("args, code, stdout", [(["--version"], 0, "edgepeft, version"),
                                                (["export", "--format", "gguf"], 2, "")])
def test_entry_keeps_the_status_output_and_atexit_handlers(args, code, stdout):
    """``edgepeft`` (the console script and ``python -m edgepeft``: cli.entry) skips the interpreter's
    teardown, but not the atexit handlers (child processes, temporary files) nor buffered output."""
    p = subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True, text=True, check=False)
    assert p.returncode == code, p.stderr
    assert stdout in p.stdout and "atexit ran" in p.stderr and "not reached" not in p.stderr, (p.stdout, p.stderr)
    if code == 2:
        assert p.stderr.count("edgepeft: error:") == 1 and "Traceback" not in p.stderr, p.stderr


def test_every_command_has_debug_and_quiet():
    from click.testing import CliRunner

    from edgepeft.cli import COMMANDS, cli

    for name in COMMANDS:
        out = CliRunner().invoke(cli, [name, "--help"]).output
        assert "--debug" in out and "--quiet" in out, name


def test_inspect_smollm2_prints_model_and_fingerprint(cli, smollm2):
    p = cli("inspect", "smollm2-135m", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["model_type"] == "llama"
    assert info["layers"] == 30 and info["vocab_size"] == 49152
    assert 130e6 < info["parameters"] < 140e6
    assert info["fingerprint"] == smollm2.fingerprint and len(info["fingerprint"]) == 64


@pytest.mark.integration
def test_smollm2_answers_paris(smollm2):
    import torch

    tok = smollm2.load_tokenizer()
    model = smollm2.load_model()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    assert tok.chat_template, "chat template must survive the GGUF -> HF conversion"


def test_fingerprint_stable_across_save_formats(tiny_llama, tmp_path):
    """Same weights -> same fingerprint, whether sharded or not; different weights differ."""
    from transformers import AutoModelForCausalLM

    from edgepeft.models import resolve_base

    a = resolve_base(str(tiny_llama))
    m = AutoModelForCausalLM.from_pretrained(tiny_llama)
    sharded = tmp_path / "sharded"
    m.save_pretrained(sharded, max_shard_size="1MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / f, sharded / f)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert resolve_base(str(sharded)).fingerprint == a.fingerprint
    import torch

    with torch.no_grad():
        m.model.norm.weight[0] += 1e-3
    changed = tmp_path / "changed"
    m.save_pretrained(changed)
    assert resolve_base(str(changed)).fingerprint != a.fingerprint


def test_gguf_base_is_cached_by_content(smollm2, tmp_path, monkeypatch):
    """A second resolve of the same GGUF reuses the dequantized folder (same path, no rewrite)."""
    from edgepeft.models import resolve_base

    again = resolve_base("smollm2-135m")
    assert again.path == smollm2.path
    mtime = (again.path / "config.json").stat().st_mtime_ns
    copy = tmp_path / "copy.gguf"
    shutil.copy(smollm2.origin, copy)
    via_file = resolve_base(str(copy))
    assert via_file.path == smollm2.path and via_file.source == "gguf"
    assert (via_file.path / "config.json").stat().st_mtime_ns == mtime


def test_tiny_models_resolve(tiny_model):
    from edgepeft.models import resolve_base

    b = resolve_base(str(tiny_model))
    assert b.model_type in ("llama", "qwen2") and b.has_tokenizer()


# --- bad input: one line, exit 2, no traceback, nothing written -----------------------------------

def test_bad_nonexistent_path(cli, tmp_path):
    assert_clean_error(cli("inspect", str(tmp_path / "nope")), "nope")


def test_bad_folder_without_model(cli, tmp_path):
    assert_clean_error(cli("inspect", str(tmp_path)), "config.json")


def test_bad_unknown_alias(cli):
    assert_clean_error(cli("inspect", "smollm9-1b"), "unknown base", "smollm2-135m")


def test_bad_hub_id_offline(cli):
    p = cli("inspect", "someorg/somemodel", env={"HF_HUB_OFFLINE": "1"})
    assert_clean_error(p, "someorg/somemodel", "--base /path")


def test_bad_truncated_gguf(cli, smollm2, tmp_path):
    bad = tmp_path / "trunc.gguf"
    with open(smollm2.origin, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    assert_clean_error(cli("inspect", str(bad)), "trunc")
    before = set(tmp_path.iterdir())
    from edgepeft.models import cache_dir

    p = cli("inspect", "--json", str(tmp_path / "x"), env={"EDGEPEFT_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 2
    assert set(tmp_path.iterdir()) == before  # nothing written
    assert cache_dir()  # importable


def test_bad_corrupt_gguf_magic(cli, tmp_path):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    assert_clean_error(cli("inspect", str(bad)), "not a GGUF")


def test_bad_zero_byte_gguf(cli, tmp_path):
    bad = tmp_path / "empty.gguf"
    bad.touch()
    assert_clean_error(cli("inspect", str(bad)), "empty")


def test_bad_unsupported_architecture(cli, tiny_llama, tmp_path):
    d = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(cli("inspect", str(d)), "unsupported architecture", "llama")


def test_bad_pickle_only_folder(cli, tiny_llama, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert_clean_error(cli("inspect", str(d)), "pickle")


def test_debug_shows_traceback(cli, tmp_path):
    p = cli("inspect", "--debug", str(tmp_path / "nope"))
    assert p.returncode != 0 and "Traceback" in p.stderr


# --- install layout (the built wheel: tests/test_wheel.py) ------------------------------------------

def test_runtimes_and_fit_checks_import_without_torch_or_the_exporter():
    """`edgepeft bench` on a device: the runtime modules and the fit checks they call stay torch-free, and
    runtimes import core only (data flows export -> runtimes, never back)."""
    _, heavy = heavy_modules_after(
        "import sys\nfrom edgepeft.fit import check_gguf_pair, check_onnx_adapter_fits\n"
        "import edgepeft.runtimes.llamacpp, edgepeft.runtimes.ort, edgepeft.runtimes.ortgenai\n"
        "import edgepeft.runtimes.qnn_htp, edgepeft.bundle, edgepeft.bench\n"
        "exported = sorted(m for m in sys.modules if m.startswith('edgepeft.export'))\n"
        "assert not exported, exported",
        heavy=("torch",))
    assert heavy == []


def test_native_stdout_noise_goes_to_stderr_under_json():
    """C/C++ runtimes (the QNN HTP simulator, llama.cpp) write to fd 1 directly; `--json -` must stay parseable."""
    code = (
        "import ctypes, os, sys\n"
        "from edgepeft.ui import native_stdout_to_stderr, print_json\n"
        "with native_stdout_to_stderr():\n"
        "    os.write(1, b'native noise\\n')\n"
        "    libc = ctypes.CDLL(None); libc.printf(b'printf noise\\n'); libc.fflush(None)\n"
        "    print('python noise')\n"
        "print_json({'ok': 1})\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(p.stdout) == {"ok": 1}
    assert "native noise" in p.stderr and "printf noise" in p.stderr and "python noise" in p.stderr
