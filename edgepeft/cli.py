"""The ``edgepeft`` command line.

The root imports nothing heavy: each subcommand lives in ``edgepeft/commands/<name>.py``
and is imported only when it is invoked (or when ``--help`` lists it), so ``edgepeft
bench`` on a Jetson never imports bitsandbytes and ``edgepeft --help`` starts fast.
"""

from __future__ import annotations

import importlib

import click

from edgepeft import __version__

# name -> module under edgepeft.commands exposing ``command`` (a click.Command).
COMMANDS: dict[str, str] = {
    "inspect": "inspect",
    "train": "train",
    "eval": "eval",
    "export": "export",
    "pack": "pack",
    "verify": "verify",
    "bench": "bench",
    "quickstart": "quickstart",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        mod = COMMANDS.get(name)
        if mod is None:
            return None
        return importlib.import_module(f"edgepeft.commands.{mod}").command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgepeft")
def cli():
    """Train, export, benchmark and ship quantized LoRA adapters for edge devices."""


def main(argv=None):
    import sys

    args = sys.argv[1:] if argv is None else list(argv)
    if "--debug" not in args:
        # Library chatter (bitsandbytes, transformers) must not bury the one-line errors.
        from edgepeft.quiet import silence_libraries

        silence_libraries()
    try:
        cli.main(args=args, prog_name="edgepeft", standalone_mode=False)
    except click.UsageError as e:
        # click's own usage error is four lines (usage, hint, blank, error); ours is one, as for
        # every other bad input: what was asked, what was found, where the options are listed.
        from edgepeft.ui import fail

        sub = next((a for a in args if not a.startswith("-")), None)
        path = e.ctx.command_path if e.ctx is not None and e.ctx.parent is not None else (
            f"edgepeft {sub}" if sub in COMMANDS else "edgepeft")
        fail(f"{path}: {e.format_message().rstrip('.')}. Run '{path} --help' for its options", e.exit_code)
    except click.ClickException as e:
        from edgepeft.ui import fail

        fail(e.format_message(), e.exit_code)
    except click.Abort:
        click.echo("edgepeft: interrupted", err=True)
        sys.exit(130)


def entry() -> None:
    """The ``edgepeft`` command (and ``python -m edgepeft``): ``main``, then the exit without the interpreter's
    teardown.

    Once a command has loaded torch, transformers and llama.cpp, Python's own shutdown (freeing every module)
    took 1.2 s of a 19 s verified export here, after the last output (measured). What the interpreter does
    before that teardown still happens, in its order: non-daemon threads are waited for, then the atexit
    handlers run (they stop child processes, remove temporary files, flush logging); then stdout and stderr
    are flushed and the process ends with the command's status. ``main`` itself, which tests and notebooks
    call in-process, exits as usual."""
    import atexit
    import os
    import signal
    import sys
    import threading

    def terminated(signum, frame):
        # `kill`, a CI timeout, a closed terminal: unwind like Ctrl-C, so every atomic write and temp
        # folder (export/merge.py's merge-auto candidates, the ONNX work dir) is removed, not left in /tmp
        print("edgepeft: terminated", file=sys.stderr)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminated)
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    for t in threading.enumerate():  # as the interpreter does first: wait for the non-daemon threads
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or a closed stream: nothing more to say
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    entry()
