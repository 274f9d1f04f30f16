"""Remote devices: resolve ``--device``, copy artifacts, run the benchmark there, bring JSON back.

Transports are plain ``ssh`` and ``adb`` subprocesses, each step under a wall-clock timeout,
so a dead link is an error, never a hang. ssh keeps host-key checking on
(StrictHostKeyChecking=yes, optionally against a given known_hosts file): an unknown or
changed key stops the run with the fix, it is never accepted silently.

On the device we run ``python -m edgepeft bench --json -`` when edgepeft is installed
there; otherwise llama.cpp's ``llama-bench`` from the profile (GGUF only, no adapters: it
has no LoRA option), and its JSON is turned into our records.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edgepeft.errors import ConfigError, EdgepeftError
from edgepeft.profiles import DeviceProfile, load_profile, local_profile_name
from edgepeft.ui import esc

# always fullmatch (`$` would accept a trailing newline); user, host and serial never start with '-',
# so none can be read as an ssh/adb option
_SSH = re.compile(r"ssh://(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]{0,63})@)?"
                  r"(?P<host>[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::(?P<port>\d{1,5}))?/?")
_ADB = re.compile(r"adb://(?P<serial>[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127})")


@dataclass(frozen=True)
class Target:
    kind: str  # local | ssh | adb
    profile: DeviceProfile
    uri: str = "local"
    user: str | None = None
    host: str | None = None
    port: int = 22
    serial: str | None = None


def parse_uri(uri: str, profile: DeviceProfile) -> Target:
    m = _SSH.fullmatch(uri)
    if m and 1 <= int(m["port"] or 22) <= 65535:
        return Target("ssh", profile, uri, m["user"], m["host"].strip("[]"), int(m["port"] or 22))
    m = _ADB.fullmatch(uri)
    if m:
        return Target("adb", profile, uri, serial=m["serial"])
    raise EdgepeftError(f"--device {uri!r} is not a valid device URI",
                        "Use ssh://user@host[:port] or adb://SERIAL (letters, digits, '.', '_', '-', ':'; "
                        "host, user and serial may not start with '-')")


def resolve_device(device: str, profile: str | None) -> Target:
    """--device local | profile name | profile.yaml | ssh://... | adb://..., plus optional --profile."""
    if device == "local":
        return Target("local", load_profile(profile or local_profile_name()))
    if device.startswith(("ssh://", "adb://")):
        default = "snapdragon-8-gen-3" if device.startswith("adb://") else local_profile_name()
        return parse_uri(device, load_profile(profile or default))
    prof = load_profile(device)  # unknown names list the known devices
    if prof.reach.kind == "local":
        return Target("local", prof)
    if not prof.reach.uri or "SERIAL" in prof.reach.uri:
        raise EdgepeftError(f"device profile {prof.name} has no usable reach.uri ({prof.reach.uri})",
                            f"Pass --device ssh://user@host or adb://SERIAL --profile {prof.name}")
    return parse_uri(prof.reach.uri, prof)


def _timeout(given, t: Target) -> float:
    v = float(given if given is not None else t.profile.reach.timeout_s)
    if not math.isfinite(v) or v <= 0 or v > 86400:
        raise ConfigError("--timeout", given, "a number of seconds in (0, 86400]")
    return v


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ transports
class SSH:
    def __init__(self, t: Target, known_hosts: str | None = None, identity: str | None = None,
                 timeout: float | None = None):
        self.t = t
        self.timeout = _timeout(timeout, t)
        kh = known_hosts or t.profile.reach.known_hosts
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"ConnectTimeout={max(1, int(self.timeout))}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=2", "-o", "LogLevel=ERROR"]
        if kh:
            opts += ["-o", f"UserKnownHostsFile={Path(kh).expanduser()}"]
        if identity:
            opts += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
        dest = f"{t.user}@{t.host}" if t.user else t.host
        if dest.startswith("-"):  # parse_uri refuses this already; never let a destination become an option
            raise EdgepeftError(f"ssh destination {dest!r} starts with '-'", "Pass ssh://user@host")
        self.base = ["ssh", "-p", str(t.port), *opts, "--", dest]

    def argv(self, command: str) -> list[str]:
        """ssh's argv: options, ``--``, the destination, then ONE remote shell command whose every
        word was built with :func:`shlex.quote` by the callers below."""
        return [*self.base, command]

    def run(self, command: str, step: str, stdin=None, timeout: float | None = None) -> str:
        try:
            proc = subprocess.run(self.argv(command), stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                  capture_output=True, check=False, timeout=timeout or self.timeout)
        except FileNotFoundError as e:
            raise EdgepeftError("the ssh client is not installed", "Install OpenSSH (apt-get install openssh-client)") from e
        except subprocess.TimeoutExpired as e:
            raise EdgepeftError(f"ssh {self.t.uri} timed out after {timeout or self.timeout:g}s while {step}",
                                "Check the device is up and reachable, or raise --timeout") from e
        err = proc.stderr.decode("utf-8", "replace").strip()
        if proc.returncode == 255:
            raise ssh_error(self.t.uri, err, step)
        if proc.returncode != 0:
            last = err.splitlines()[-1] if err else f"exit status {proc.returncode}"
            raise EdgepeftError(f"on {self.t.uri}, {step} failed: {last}", "Run with --debug or try the command by hand")
        return proc.stdout.decode("utf-8", "replace")

    def put(self, local: Path, remote: str) -> None:
        # cat over the ssh channel: needs neither scp nor sftp on the device; rename makes it atomic
        q, part, parent = (shlex.quote(x) for x in (remote, remote + ".part", posixpath.dirname(remote) or "."))
        with open(local, "rb") as f:
            self.run(f"mkdir -p -- {parent} && cat > {part} && mv -f -- {part} {q}", f"copying {esc(local.name)}",
                     stdin=f, timeout=self.timeout + local.stat().st_size / 2e6)

    def hashes(self, paths: list[str]) -> dict[str, str]:
        quoted = " ".join(shlex.quote(p) for p in paths)
        out = self.run(f"for f in {quoted}; do [ -f \"$f\" ] && sha256sum \"$f\"; done; true", "hashing files")
        return {line.split(None, 1)[1].strip(): line.split()[0] for line in out.splitlines() if len(line.split()) == 2}


def ssh_error(uri: str, stderr: str, step: str) -> EdgepeftError:
    low = stderr.lower()
    last = stderr.splitlines()[-1] if stderr else "no message"
    if "host key verification failed" in low or "no matching host key" in low or "host key for" in low:
        return EdgepeftError(f"ssh {uri}: host key is unknown or changed ({last})",
                             "Verify the device's key, then add it: ssh-keyscan -p PORT HOST >> ~/.ssh/known_hosts "
                             "(or pass --known-hosts FILE)")
    if "permission denied" in low:
        return EdgepeftError(f"ssh {uri}: authentication failed ({last})", "Install your public key on the device (ssh-copy-id)")
    if any(s in low for s in ("connection refused", "could not resolve", "no route", "timed out", "name or service",
                              "network is unreachable", "connection closed", "connection reset", "broken pipe")):
        return EdgepeftError(f"ssh {uri} is unreachable while {step} ({last})",
                             "Check the host, port and network; is sshd running on the device?")
    return EdgepeftError(f"ssh {uri} failed while {step} ({last})", "Check the connection; rerun with --debug")


class ADB:
    def __init__(self, t: Target, timeout: float | None = None):
        self.t = t
        self.timeout = _timeout(timeout, t)
        if not t.serial or t.serial.startswith("-"):  # parse_uri refuses this already
            raise EdgepeftError(f"adb serial {t.serial!r} is not allowed", "Pass adb://SERIAL from `adb devices`")
        self.base = ["adb", "-s", t.serial]

    def push_argv(self, local: Path, remote: str) -> list[str]:
        return [*self.base, "push", str(Path(local).resolve()), remote]  # absolute: never read as an option

    def shell_argv(self, command: str) -> list[str]:
        return [*self.base, "shell", command]

    def _call(self, argv, step, timeout=None) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, check=False, timeout=timeout or self.timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError as e:
            raise EdgepeftError("adb is not installed", "Install Android platform-tools and put adb on PATH") from e
        except subprocess.TimeoutExpired as e:
            raise EdgepeftError(f"adb {self.t.serial} timed out after {timeout or self.timeout:g}s while {step}",
                                "Check the USB/wifi link (adb devices), or raise --timeout") from e
        out = proc.stdout.decode("utf-8", "replace")
        err = proc.stderr.decode("utf-8", "replace").strip()
        if proc.returncode != 0:
            last = (err or out).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise EdgepeftError(f"adb {self.t.serial}: {step} failed ({last[0]})",
                                "Check `adb devices` lists the device as 'device' (authorized)")
        return out

    def run(self, command: str, step: str, timeout: float | None = None) -> str:
        return self._call(self.shell_argv(command), step, timeout)

    def put(self, local: Path, remote: str) -> None:
        self._call(self.push_argv(local, remote), f"pushing {local.name}", self.timeout + local.stat().st_size / 2e6)

    def hashes(self, paths: list[str]) -> dict[str, str]:
        quoted = " ".join(shlex.quote(p) for p in paths)
        out = self.run(f"for f in {quoted}; do [ -f \"$f\" ] && sha256sum \"$f\"; done; true", "hashing files")
        return {line.split(None, 1)[1].strip(): line.split()[0] for line in out.splitlines() if len(line.split()) == 2}


# ------------------------------------------------------------------ copy + run
def sync(tr, files: dict[Path, str]) -> dict:
    """Copy local -> remote paths, skipping files whose sha256 already matches; verify after copying."""
    want = {remote: sha256(local) for local, remote in files.items()}
    have = tr.hashes(list(want))
    copied, skipped = [], []
    for local, remote in files.items():
        if have.get(remote) == want[remote]:
            skipped.append(remote)
            continue
        tr.put(local, remote)
        copied.append(remote)
    if copied:
        after = tr.hashes(copied)
        for remote in copied:
            if after.get(remote) != want[remote]:
                raise EdgepeftError(f"{remote} on the device does not match its sha256 after copying",
                                    "The link corrupted it or the disk is full; rerun to copy again")
    return {"copied": copied, "skipped": skipped}


def _remote_layout(arts, workdir: str) -> tuple[dict, list]:
    """Each artifact under workdir/<name>/ keeping its relative layout; returns files + remote artifact args."""
    files, args = {}, []
    for a in arts:
        root = a.path if a.path.is_dir() else a.path.parent
        rdir = f"{workdir}/{a.path.name if a.path.is_dir() else a.path.stem}"
        for f in a.files:
            named = a.names.get(f)
            rel = Path(named) if named else f.relative_to(root) if f.is_relative_to(root) else Path(f.name)
            files[f] = f"{rdir}/{rel.as_posix()}"
        args.append(rdir if a.path.is_dir() else files[a.path])
    return files, args


def bench_argv(arts_remote: list[str], runtimes: list[str], cfg, profile: str, task: str | None = None) -> list[str]:
    """The device's ``edgepeft bench`` command line; ``task`` is where a --task JSONL file was copied to."""
    argv = ["-m", "edgepeft", "bench", *arts_remote, "--json", "-", "--quiet", "--device", "local",
            "--profile", profile, "--prompt-tokens", str(cfg.prompt_tokens), "--gen-tokens", str(cfg.gen_tokens),
            "--repetitions", str(cfg.repetitions), "--swap-cycles", str(cfg.swap_cycles),
            "--ppl-tokens", str(cfg.ppl_tokens)]
    for r in runtimes:
        argv += ["--runtime", r]
    if cfg.ppl_file is None:
        argv.append("--no-ppl")
    if cfg.task:
        argv += ["--task", task or cfg.task, "--task-limit", str(cfg.task_limit)]
    return argv


def run_remote(t: Target, arts, runtimes: list[str], cfg, known_hosts=None, timeout=None, identity=None) -> dict:
    from edgepeft import bench

    for a in arts:  # refuse before copying anything
        for r in bench.pick_runtimes(a, t.profile, runtimes):
            bench.check_fits(a, t.profile, r, cfg.n_ctx)
    tr = SSH(t, known_hosts, identity, timeout) if t.kind == "ssh" else ADB(t, timeout)
    workdir = t.profile.reach.workdir
    if workdir.startswith("~/"):
        home = tr.run('printf %s "$HOME"', "finding the home directory").strip()
        if not home.startswith("/") or any(c in home for c in "\n\r\0"):
            raise EdgepeftError(f"{t.uri}: $HOME is {home!r}, not an absolute path", "Set reach.workdir to an absolute path")
        workdir = home + workdir[1:]
    files, remote_arts = _remote_layout(arts, workdir)
    prof_arg = t.profile.name
    if Path(t.profile.source).resolve().parent != Path(__file__).resolve().parent.parent / "devices":
        files[Path(t.profile.source)] = f"{workdir}/profiles/{Path(t.profile.source).name}"
        prof_arg = files[Path(t.profile.source)]
    task_remote = None
    if cfg.task and Path(cfg.task).is_file():  # the user's task file travels with the artifacts
        task_remote = files[Path(cfg.task)] = f"{workdir}/task/{Path(cfg.task).name}"
    copy = sync(tr, files)
    py = shlex.quote(t.profile.reach.python)
    has_edgepeft = t.kind == "ssh" and tr.run(f"{py} -c 'import edgepeft' >/dev/null 2>&1 && echo yes || echo no",
                                              "looking for edgepeft").strip() == "yes"
    budget = tr.timeout + 60 + 30 * len(arts) * (cfg.repetitions + 1) * (1 + sum(len(a.adapters) for a in arts))
    if has_edgepeft:
        argv = bench_argv(remote_arts, runtimes, cfg, prof_arg, task_remote)
        out = tr.run(" ".join([py, *map(shlex.quote, argv)]), "running edgepeft bench", timeout=budget)
        try:
            doc = json.loads(out)
        except json.JSONDecodeError as e:
            raise EdgepeftError(f"edgepeft bench on {t.uri} printed no JSON ({out[:80]!r})",
                                "Run it there by hand with --debug") from e
        bench.load_document_obj(doc, t.uri)
    else:
        doc = _llama_bench_remote(tr, t, arts, remote_arts, cfg, budget)
    for r in doc["records"]:
        r["device"] = t.uri
    doc["transport"] = {"kind": t.kind, "uri": t.uri, **copy, "remote_runner": "edgepeft" if has_edgepeft else "llama-bench"}
    return doc


def _llama_bench_remote(tr, t: Target, arts, remote_arts, cfg, budget) -> dict:
    from edgepeft import bench

    spec = t.profile.runtimes.get("llama.cpp")
    binary = (spec.binaries.get("llama_bench") if spec else None)
    if not binary:
        raise EdgepeftError(f"edgepeft is not installed on {t.uri} and profile {t.profile.name} names no llama-bench",
                            "pip install edgepeft on the device, or set runtimes.llama.cpp.binaries.llama_bench")
    records = []
    for a, ra in zip(arts, remote_arts):
        if a.format != "gguf":
            raise EdgepeftError(f"{a.path.name}: without edgepeft on {t.uri} only GGUF runs (via llama-bench)",
                                "pip install edgepeft on the device to bench ONNX artifacts")
        model = ra if a.path.is_file() else f"{ra}/{a.model.relative_to(a.path).as_posix()}"
        out = tr.run(" ".join(llama_bench_argv(binary, model, cfg, t.profile)), "running llama-bench", timeout=budget)
        recs = parse_llama_bench(out, "json")
        records += to_records(recs, a, t, cfg)
    bandwidth = {"bandwidth_gb_s": t.profile.bandwidth.gb_s, "bandwidth_source": t.profile.bandwidth.source}
    return bench.document(records, t.profile, cfg, bandwidth)


def llama_bench_argv(binary: str, model: str, cfg, profile: DeviceProfile, fmt: str = "json") -> list[str]:
    """llama-bench's argv, every word shell-quoted (options are typed by the profile loader, quoted anyway)."""
    opts = profile.runtimes["llama.cpp"].options if "llama.cpp" in profile.runtimes else {}
    argv = [binary, "-m", model, "-p", str(int(cfg.prompt_tokens)), "-n", str(int(cfg.gen_tokens)),
            "-r", str(int(cfg.repetitions)), "-o", fmt]
    if opts.get("n_threads"):
        argv += ["-t", str(int(opts["n_threads"]))]
    if "n_gpu_layers" in opts:
        argv += ["-ngl", str(int(opts["n_gpu_layers"]))]
    return [_home_quote(argv[0]), *(shlex.quote(a) for a in argv[1:])]


def _home_quote(path: str) -> str:
    """Shell-quote a path, keeping a leading ``~/`` expandable (as "$HOME"/...)."""
    return f'"$HOME"/{shlex.quote(path[2:])}' if path.startswith("~/") else shlex.quote(path)


# ------------------------------------------------------------------ llama-bench output
def parse_llama_bench(text: str, fmt: str) -> list[dict]:
    """llama-bench ``-o json`` / ``-o csv`` output -> list of test dicts (numbers converted)."""
    import csv
    import io

    text = text.strip()
    if fmt == "json":
        start = text.find("[")
        try:
            rows = json.loads(text[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            rows = None
        if not isinstance(rows, list):
            raise EdgepeftError("llama-bench printed no JSON array", "Check the llama-bench path and model on the device")
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        for r in rows:
            for k, v in r.items():
                r[k] = _num(v)
    else:
        raise EdgepeftError(f"unknown llama-bench output format {fmt!r}", "Use json or csv")
    for r in rows:
        if not {"n_prompt", "n_gen", "avg_ts"} <= set(r):
            raise EdgepeftError("llama-bench output lacks n_prompt/n_gen/avg_ts", "Use a llama-bench from 2024 or later")
    return rows


def _num(v: str):
    for kind in (int, float):
        try:
            return kind(v)
        except (TypeError, ValueError):
            pass
    return {"true": True, "false": False}.get(v, v)


def to_records(rows: list[dict], artifact, t: Target, cfg) -> list[dict]:
    """Fold llama-bench's pp and tg tests into one edgepeft record (base model only: no LoRA there)."""
    pp = next((r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0), None)
    tg = next((r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0), None)

    def m(r):
        return None if r is None else {"mean": round(float(r["avg_ts"]), 2), "std": round(float(r.get("stddev_ts", 0)), 2),
                                       "n": len(r.get("samples_ts", [])) or cfg.repetitions,
                                       "tokens": r["n_prompt"] or r["n_gen"]}

    first = pp or tg
    bw = t.profile.bandwidth.gb_s
    tgm = m(tg)
    bpt = int(first.get("model_size", 0))
    return [{
        "artifact": str(artifact.path), "model_file": str(artifact.model), "format": "gguf", "quant": artifact.quant,
        "runtime": "llama.cpp (llama-bench)", "providers": [str(first.get("backends", "cpu"))], "device": t.uri,
        "profile": t.profile.name, "adapter": "none", "model_bytes": artifact.model_bytes, "adapter_bytes": 0,
        "load_ms": None, "ttft_ms": None if pp is None else {"mean": round(pp["n_prompt"] / pp["avg_ts"] * 1e3, 3),
                                                            "std": None, "n": m(pp)["n"]},
        "pp": m(pp), "tg": tgm, "swap_ms": None, "perplexity": None, "accuracy": None, "top1_agree": None,
        "peak_rss_mb": None, "bytes_per_token": bpt, "bandwidth_gb_s": bw,
        "bw_util": round(tgm["mean"] * bpt / (bw * 1e9), 4) if tgm else None,
        "llama_bench": {"build_commit": first.get("build_commit"), "build_number": first.get("build_number"),
                        "cpu_info": first.get("cpu_info"), "n_threads": first.get("n_threads"),
                        "type": first.get("model_type")},
    }]
