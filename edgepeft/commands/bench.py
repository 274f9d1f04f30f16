"""edgepeft bench ARTIFACT... [--device local|NAME|ssh://user@host|adb://SERIAL] [--compare A B]"""

from __future__ import annotations

import math

import click

from edgepeft.ui import edgepeft_command, info


def _pairs(values, option: str) -> dict:
    from edgepeft.errors import EdgepeftError

    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise EdgepeftError(f"{option} {v!r} is not NAME=PATH", f"Example: {option} sql=out/sql.lora.gguf")
        out[name] = path
    return out


@edgepeft_command("bench")
@click.argument("artifacts", nargs=-1)
@click.option("--runtime", "runtimes", multiple=True, help="llama.cpp | onnxruntime-genai | onnxruntime (repeatable; default: by format).")
@click.option("--device", default="local", show_default=True,
              help="local, a profile name/.yaml, ssh://user@host[:port] or adb://SERIAL.")
@click.option("--profile", default=None, help="Device profile for --device ssh:// or adb:// (name or .yaml).")
@click.option("--adapter", "adapters", multiple=True, help="Extra adapter NAME=PATH (repeatable).")
@click.option("--prompt-tokens", default=512, show_default=True, type=int)
@click.option("--gen-tokens", default=128, show_default=True, type=int)
@click.option("--repetitions", "-r", default=5, show_default=True, type=int)
@click.option("--ppl-file", type=click.Path(), default=None, help="Text for perplexity (default: bundled wikitext-2 slice).")
@click.option("--ppl-tokens", default=512, show_default=True, type=int)
@click.option("--no-ppl", is_flag=True, help="Skip perplexity.")
@click.option("--swap-cycles", default=5, show_default=True, type=int)
@click.option("--task", default=None, help="Score exact-match accuracy: a bundled task (demo) or a JSONL file "
              "(prompt/completion or messages lines; the answer is the completion or the last assistant turn).")
@click.option("--task-limit", default=20, show_default=True, type=int, help="Examples scored for --task.")
@click.option("--reference", default=None, help="PyTorch base (--base syntax) for top-1 agreement.")
@click.option("--reference-adapter", "ref_adapters", multiple=True, help="NAME=PEFT_DIR for the reference, per adapter.")
@click.option("--json", "json_out", default=None, help="Write the JSON results here ('-' = stdout).")
@click.option("--png", default=None, type=click.Path(), help="Write a PNG chart here.")
@click.option("--compare", nargs=2, default=None, type=click.Path(), help="Print B/A ratios of two result files.")
@click.option("--known-hosts", default=None, type=click.Path(), help="ssh: known_hosts file to check the host key against.")
@click.option("--timeout", default=None, type=float, help="ssh/adb: seconds per remote step (default from profile).")
@click.option("--ssh-identity", default=None, type=click.Path(), help="ssh: private key file to log in with.")
def command(artifacts, runtimes, device, profile, adapters, prompt_tokens, gen_tokens, repetitions, ppl_file,
            ppl_tokens, no_ppl, swap_cycles, task, task_limit, reference, ref_adapters, json_out, png, compare, known_hosts,
            timeout, ssh_identity):
    """Benchmark artifacts on real runtimes, here or on a device over SSH/adb.

    Speed (load_ms, ttft_ms, pp/tg tok/s), peak RSS, bytes, adapter swap time, perplexity,
    task accuracy, top-1 agreement with PyTorch and bandwidth utilisation, one record per
    artifact x runtime x device x adapter.
    """
    from edgepeft import bench
    from edgepeft.errors import EdgepeftError

    if compare:
        a, b = (bench.load_document(p) for p in compare)
        _show(bench.compare_table(bench.compare(a, b), compare[0], compare[1]))
        return
    if not artifacts:
        raise EdgepeftError("no artifact given", "Usage: edgepeft bench ARTIFACT... (a .gguf, an export folder, an .onnx)")
    cfg = bench.BenchConfig(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repetitions=repetitions,
                            ppl_file=None if no_ppl else (ppl_file or bench.DEFAULT_TEXT), ppl_tokens=ppl_tokens,
                            swap_cycles=swap_cycles, task=task, task_limit=task_limit, reference=reference,
                            reference_adapters=_pairs(ref_adapters, "--reference-adapter"))
    extra = _pairs(adapters, "--adapter")
    from edgepeft.bench.remote import resolve_device
    from edgepeft.ui import native_stdout_to_stderr

    if timeout is not None and not (math.isfinite(timeout) and 0 < timeout <= 86400):
        from edgepeft.errors import ConfigError

        raise ConfigError("--timeout", timeout, "a number of seconds in (0, 86400]")
    target = resolve_device(device, profile)
    arts = _with_extra_adapters([bench.discover(a) for a in artifacts], extra, artifacts)
    with native_stdout_to_stderr(json_out == "-"):
        if target.kind == "local":
            doc = bench.run(arts, list(runtimes), target.profile, cfg)
        else:
            from edgepeft.bench.remote import run_remote

            doc = run_remote(target, arts, list(runtimes), cfg, known_hosts=known_hosts, timeout=timeout,
                             identity=ssh_identity)
    _emit(doc, json_out, png)


def _with_extra_adapters(arts, extra: dict, typed):
    """``--adapter NAME=PATH`` joins every artifact that can take an adapter; merged ones are measured as
    they are (one status line says so). None that can take it is an error, before any measurement."""
    if not extra:
        return arts
    from edgepeft import bench
    from edgepeft.bench.artifacts import accepts_adapters
    from edgepeft.errors import EdgepeftError

    takers = [accepts_adapters(a) for a in arts]
    if not any(takers):
        raise EdgepeftError(f"--adapter {', '.join(extra)} given, but every artifact ({', '.join(typed)}) has its "
                            "adapters merged in", "Pass the --mode separate export (its base takes adapter files)")
    out = []
    for a, label, takes in zip(arts, typed, takers):
        if takes:
            a = bench.discover(label, extra)
        else:
            info(f"{label}: adapters merged in, so --adapter {', '.join(extra)} is not applied to it")
        out.append(a)
    return out


def _emit(doc: dict, json_out: str | None, png: str | None) -> None:
    import json
    from pathlib import Path

    from edgepeft import bench

    if json_out == "-":
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        if json_out:
            bench.write_document(doc, json_out)
            info(f"wrote {json_out}")
        _show(bench.table(doc))
    if png:
        bench.chart(doc, Path(png))
        info(f"wrote {png}")


def _show(renderable) -> None:
    from edgepeft.ui import print_result

    print_result(renderable)
