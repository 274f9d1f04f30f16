"""Identifiers (fingerprints, hashes, paths) are printed whole: at 80 columns, through a pipe.

rich falls back to 80 columns when stdout is not a terminal, and a fitted table ends a long
cell in "…". The fingerprint is the one string a user must copy and compare, so every command
that prints one (inspect, pack, verify, bench tables) is run here with COLUMNS=80 and its output
read through a pipe (subprocess: no TTY).
"""

from __future__ import annotations

import hashlib
import json

import pytest
from bundle_factory import write_adapter, write_base
from conftest import run_cli

NARROW = {"COLUMNS": "80", "LINES": "24", "TERM": "dumb"}
FP = hashlib.sha256(b"a base nobody else has").hexdigest()


def _whole(text: str, *needles: str) -> None:
    assert "…" not in text, text
    for n in needles:
        assert n in text, (n, text)


@pytest.mark.integration
def test_inspect_prints_the_whole_fingerprint_and_paths(smollm2):
    proc = run_cli("inspect", "smollm2-135m", env=NARROW)
    assert proc.returncode == 0, proc.stderr
    _whole(proc.stdout, smollm2.fingerprint, str(smollm2.path), str(smollm2.origin))


def test_pack_verify_inspect_print_whole_identifiers(tmp_path):
    deep = tmp_path / ("a-folder-with-a-long-name-" * 3) / "bundles"
    deep.mkdir(parents=True)
    base = write_base(deep / "base-q4_k_m.gguf", fingerprint=FP)
    adapter = write_adapter(deep / "sql.lora.gguf", fingerprint=FP, name="sql")
    bundle = deep / "bundle"
    assert len(str(bundle)) > 80
    packed = run_cli("pack", "--base", base, "--adapter", adapter, "--out", bundle, env=NARROW)
    assert packed.returncode == 0, packed.stderr
    _whole(packed.stderr, FP, str(bundle))
    verified = run_cli("verify", bundle, env=NARROW)
    assert verified.returncode == 0, verified.stderr
    _whole(verified.stdout, FP, str(bundle))
    inspected = run_cli("inspect", bundle, env=NARROW)
    assert inspected.returncode == 0, inspected.stderr
    _whole(inspected.stdout, FP)


def _doc(names: list[str], tg: float) -> dict:
    recs = [{"artifact": f"out/{n}", "model_file": f"out/{n}/m.gguf", "runtime": "llama.cpp", "device": "local",
             "adapter": "adapter-" + hashlib.sha256(n.encode()).hexdigest()[:24], "pp": {"mean": 10.0},
             "tg": {"mean": tg}, "ttft_ms": {"mean": 5.0}, "load_ms": 3.0, "peak_rss_mb": 100.0,
             "swap_ms": None, "perplexity": None, "bw_util": 0.1} for n in names]
    return {"schema": "edgepeft.bench/1", "device": {"profile": "x86-64-cpu"}, "records": recs}


def test_bench_compare_table_keeps_long_names_whole(tmp_path):
    names = ["gguf-" + hashlib.sha256(str(i).encode()).hexdigest()[:40] for i in range(2)]
    (tmp_path / "a.json").write_text(json.dumps(_doc(names, 10.0)))
    (tmp_path / "b.json").write_text(json.dumps(_doc(names, 20.0)))
    proc = run_cli("bench", "--compare", tmp_path / "a.json", tmp_path / "b.json", env=NARROW)
    assert proc.returncode == 0, proc.stderr
    _whole(proc.stdout, *names, *(r["adapter"] for r in _doc(names, 1)["records"]))


def test_result_table_in_a_narrow_terminal_cuts_no_value(monkeypatch):
    """A table wider than the terminal is printed at its own width (the terminal wraps lines): rich alone
    shortened the quickstart's perplexity and top-1 cells to '14…' and '0.…' at 110 columns."""
    import io

    from rich.table import Table

    from edgepeft import ui

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setenv("COLUMNS", "60")
    t = Table()
    values = [f"{i}.{i}234567 ± 19.{i}" for i in range(8)]
    for i in range(8):
        t.add_column(f"column {i}")
    t.add_row(*values)
    ui.print_result(t)
    text = out.getvalue()
    assert "…" not in text and all(v in text for v in values), text
