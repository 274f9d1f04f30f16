# ruff: noqa: F811  (pytest fixtures imported from bench_artifacts are parameters by design)
"""Remote benches: a REAL ssh round trip against an sshd started on 127.0.0.1 with throwaway keys,
host-key checking, hangs and refused connections as one-line errors, adb command construction,
and parsing of llama-bench JSON/CSV captured from a real llama-bench run (tests/fixtures/llama-bench)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from bench_artifacts import gguf_sep, peft_adapters  # noqa: F401  (session fixtures)
from conftest import assert_clean_error, run_cli

from edgepeft.bench import BenchConfig, discover
from edgepeft.bench.remote import (
    ADB,
    llama_bench_argv,
    parse_llama_bench,
    parse_uri,
    resolve_device,
    to_records,
)
from edgepeft.errors import EdgepeftError
from edgepeft.profiles import load_profile

FIXTURES = Path(__file__).parent / "fixtures" / "llama-bench"
PROFILE = (Path(__file__).parents[1] / "devices" / "x86-64-cpu.yaml").read_text()
SMALL = ["--prompt-tokens", "16", "--gen-tokens", "4", "-r", "1", "--no-ppl", "--swap-cycles", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(binary).exists() or not shutil.which("ssh-keygen"):
        pytest.skip("OpenSSH server not installed (CI installs openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "client.pub", d / "authorized_keys")
    os.chmod(d / "authorized_keys", 0o600)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\nUsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin yes\nLogLevel ERROR\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation dir
    proc = subprocess.Popen([binary, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"sshd did not start: {proc.stderr.read().decode()}")
    host_pub = (d / "host.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    # the "device" runs edgepeft with this interpreter and keeps its files in its own folder
    (d / "device.yaml").write_text(PROFILE.replace("  kind: local", f"  kind: ssh\n  python: {sys.executable}\n"
                                                   f"  workdir: {d / 'remote'}"))
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True,
                                                          check=True).stdout.strip()
    yield {"port": port, "dir": d, "uri": f"ssh://{user}@127.0.0.1:{port}"}
    proc.terminate()
    proc.wait(timeout=10)


def _ssh_args(sshd, known_hosts=None):
    d = sshd["dir"]
    return ["--device", sshd["uri"], "--profile", d / "device.yaml", "--known-hosts", known_hosts or d / "known_hosts",
            "--ssh-identity", d / "client", "--timeout", "20"]


def test_ssh_round_trip_copies_with_sha256_and_skips(sshd, gguf_sep, tmp_path):
    out = tmp_path / "remote.json"
    proc = run_cli("bench", gguf_sep, *SMALL, *_ssh_args(sshd), "--json", out)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["transport"]["remote_runner"] == "edgepeft"
    assert len(doc["transport"]["copied"]) == 4 and not doc["transport"]["skipped"]  # base, 2 adapters, profile
    assert {r["adapter"] for r in doc["records"]} == {"none", "sql", "chat"}
    assert all(r["device"] == sshd["uri"] and r["tg"]["mean"] > 0 for r in doc["records"])
    for f in doc["transport"]["copied"]:  # really on the "device", byte for byte
        local = next(p for p in [*gguf_sep.iterdir(), sshd["dir"] / "device.yaml"] if p.name == Path(f).name)
        assert Path(f).read_bytes() == local.read_bytes()
    proc = run_cli("bench", gguf_sep, *SMALL, *_ssh_args(sshd), "--json", "-", "--quiet")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert not again["transport"]["copied"] and len(again["transport"]["skipped"]) == 4


def test_ssh_unknown_host_key_refused(sshd, gguf_sep, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    assert_clean_error(run_cli("bench", gguf_sep, *SMALL, *_ssh_args(sshd, empty)), "host key", "known_hosts")


def test_ssh_unreachable_and_hanging_hosts(gguf_sep, tmp_path):
    port = _free_port()  # nothing listens there
    proc = run_cli("bench", gguf_sep, "--device", f"ssh://me@127.0.0.1:{port}", "--profile", "x86-64-cpu",
                   "--timeout", "10", *SMALL)
    assert_clean_error(proc, "unreachable")
    # a server that accepts and then never speaks: the run ends on the timeout, never hangs
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    conns = []
    threading.Thread(target=lambda: conns.append(srv.accept()), daemon=True).start()
    t = time.time()
    proc = run_cli("bench", gguf_sep, "--device", f"ssh://me@127.0.0.1:{srv.getsockname()[1]}", "--profile",
                   "x86-64-cpu", "--timeout", "3", *SMALL, timeout=120)
    assert_clean_error(proc, "127.0.0.1")
    assert any(w in proc.stderr for w in ("timed out", "unreachable")), proc.stderr
    assert time.time() - t < 90
    srv.close()


def test_device_uri_parsing():
    prof = load_profile("x86-64-cpu")
    t = parse_uri("ssh://pi@raspberrypi.local:2222", prof)
    assert (t.kind, t.user, t.host, t.port) == ("ssh", "pi", "raspberrypi.local", 2222)
    assert parse_uri("adb://R5CT1234ABC", prof).serial == "R5CT1234ABC"
    with pytest.raises(EdgepeftError, match="not a valid device URI"):
        parse_uri("ssh://", prof)
    assert resolve_device("local", None).kind == "local"
    assert resolve_device("jetson-orin-nano-8gb", None).host == "orin-nano.local"
    with pytest.raises(EdgepeftError, match="SERIAL"):
        resolve_device("snapdragon-8-gen-3", None)  # the shipped adb profile needs a real serial
    with pytest.raises(EdgepeftError, match="unknown device"):
        resolve_device("pocket-calculator", None)


# ------------------------------------------------------------------ adb + llama-bench
def _fixture(name: str) -> str:
    path = FIXTURES / name  # committed captures: a missing one is a broken checkout, never a skip
    assert path.is_file(), f"committed fixture {path} is missing"
    return path.read_text()


def test_parse_real_llama_bench_json_and_csv():
    build = json.loads(_fixture("build-info.json"))
    js = parse_llama_bench(_fixture("llama-bench.json"), "json")
    cs = parse_llama_bench(_fixture("llama-bench.csv"), "csv")
    assert len(js) == len(cs) == 2
    for rows in (js, cs):
        pp = next(r for r in rows if r["n_prompt"] > 0)
        tg = next(r for r in rows if r["n_gen"] > 0)
        assert pp["avg_ts"] > 0 and tg["avg_ts"] > 0 and pp["n_gen"] == 0 and tg["n_prompt"] == 0
        assert str(pp["build_commit"]) == build["build_commit"]
    assert [(r["n_prompt"], r["n_gen"], r["model_size"]) for r in js] == \
        [(r["n_prompt"], r["n_gen"], r["model_size"]) for r in cs]  # two real runs: same tests, own timings
    with pytest.raises(EdgepeftError, match="no JSON"):
        parse_llama_bench("error: failed to load model", "json")


def test_adb_command_construction_and_records(gguf_sep, tmp_path, monkeypatch):
    """A fake adb on PATH logs argv and emulates the device filesystem; llama-bench prints the real capture."""
    fixture = FIXTURES / "llama-bench.json"
    _fixture(fixture.name)  # fails when the committed capture is missing
    root = tmp_path / "device"
    log = tmp_path / "adb.log"
    fake = tmp_path / "bin" / "adb"
    fake.parent.mkdir()
    fake.write_text(f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
open({str(log)!r}, "a").write(json.dumps(args) + "\\n")
assert args[:2] == ["-s", "R5CT1234ABC"], args
root = {str(root)!r}
if args[2] == "push":
    dst = root + args[4]
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy(args[3], dst)
elif args[2] == "shell":
    cmd = args[3]
    if "llama-bench" in cmd:
        sys.stdout.write(open({str(fixture)!r}).read())
    else:
        proc = subprocess.run(["bash", "-c", cmd.replace("/data/", root + "/data/")], capture_output=True, text=True)
        sys.stdout.write(proc.stdout.replace(root, ""))  # the device sees its own paths
        sys.exit(proc.returncode)
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    prof = tmp_path / "phone.yaml"
    text = (Path(__file__).parents[1] / "devices" / "snapdragon-8-gen-3.yaml").read_text()
    prof.write_text(text.replace("  gguf: [f16,", "  gguf: [f32, f16,"))
    out = tmp_path / "phone.json"
    proc = run_cli("bench", gguf_sep, "--device", "adb://R5CT1234ABC", "--profile", prof, *SMALL, "--json", out)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    pushes = [c for c in calls if c[2] == "push"]
    assert len(pushes) == 4 and all(c[4].startswith("/data/local/tmp/edgepeft/") for c in pushes)
    bench_call = next(c for c in calls if c[2] == "shell" and "llama-bench" in c[3])[3].split()
    assert bench_call[0] == "/data/local/tmp/edgepeft/llama-bench"
    assert bench_call[bench_call.index("-m") + 1].endswith(".gguf") and "-o" in bench_call
    assert bench_call[bench_call.index("-p") + 1] == "16" and bench_call[bench_call.index("-t") + 1] == "6"
    doc = json.loads(out.read_text())
    (rec,) = doc["records"]
    assert rec["runtime"] == "llama.cpp (llama-bench)" and rec["device"] == "adb://R5CT1234ABC"
    assert rec["tg"]["mean"] > 0 and rec["pp"]["mean"] > 0 and rec["bandwidth_gb_s"] == 76.8
    assert doc["transport"]["remote_runner"] == "llama-bench"


def test_adb_argv_shapes():
    prof = load_profile("snapdragon-8-gen-3")
    t = parse_uri("adb://emulator-5554", prof)
    adb = ADB(t)
    assert adb.push_argv(Path("/x/m.gguf"), "/data/local/tmp/edgepeft/m.gguf") == [
        "adb", "-s", "emulator-5554", "push", "/x/m.gguf", "/data/local/tmp/edgepeft/m.gguf"]
    assert adb.shell_argv("ls") == ["adb", "-s", "emulator-5554", "shell", "ls"]
    argv = llama_bench_argv("/data/local/tmp/edgepeft/llama-bench", "/data/m.gguf", BenchConfig(repetitions=3), prof)
    assert argv[:3] == ["/data/local/tmp/edgepeft/llama-bench", "-m", "/data/m.gguf"]
    assert argv[argv.index("-r") + 1] == "3" and argv[argv.index("-ngl") + 1] == "0"


def test_llama_bench_rows_to_record(gguf_sep):
    rows = parse_llama_bench(_fixture("llama-bench.json"), "json")
    t = parse_uri("adb://X", load_profile("snapdragon-8-gen-3"))
    (rec,) = to_records(rows, discover(gguf_sep), t, BenchConfig())
    assert rec["pp"]["tokens"] == rows[0]["n_prompt"] and rec["tg"]["mean"] == pytest.approx(rows[1]["avg_ts"], 0.01)
    assert 0 < rec["bw_util"] < 2
