"""Shared CLI plumbing: common options, error reporting, console output.

``@edgepeft_command`` gives every subcommand ``--debug`` and ``--quiet`` and turns an
:class:`EdgepeftError` into one line on stderr with exit status 2. Unexpected errors
print one line too, unless ``--debug`` asks for the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys

import click

from edgepeft.errors import EXIT_USAGE, EdgepeftError


class _State:
    debug = False
    quiet = False


STATE = _State()


def _console(stderr=False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def info(msg: str) -> None:
    """Progress/status line (suppressed by --quiet), to stderr so stdout stays data."""
    if not STATE.quiet:
        _console(stderr=True).print(msg)


@contextlib.contextmanager
def native_stdout_to_stderr(enabled: bool = True):
    """Point file descriptor 1 at stderr while native runtimes run.

    llama.cpp, ONNX Runtime and the QNN HTP simulator print from C/C++ straight to fd 1, which
    Python's stream redirection cannot catch; under ``--json -`` that would corrupt the data on
    stdout. The real stdout comes back before the JSON is written.
    """
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def show_progress() -> bool:
    return not STATE.quiet and sys.stderr.isatty()


def fail(line: str, code: int = EXIT_USAGE):
    click.echo(f"edgepeft: error: {line}", err=True)
    sys.exit(code)


def edgepeft_command(name: str, json_option: bool = False, **kwargs):
    """Declare a subcommand with the shared --debug/--quiet (and optional --json) options."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, debug: bool, quiet: bool, **kw):
            STATE.debug, STATE.quiet = debug, quiet
            if quiet:
                os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
                os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            try:
                return fn(*args, **kw)
            except EdgepeftError as e:
                if debug:
                    raise
                fail(e.line())
            except KeyboardInterrupt:
                if debug:
                    raise
                fail("interrupted", 130)
            except (click.exceptions.Exit, click.ClickException, SystemExit):
                raise
            except Exception as e:  # a bug, not bad input: one line, traceback with --debug
                if debug:
                    raise
                fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", 1)

        opts = [
            click.option("--debug", is_flag=True, help="Show full tracebacks."),
            click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines."),
        ]
        if json_option:
            opts.append(click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON."))
        for opt in opts:
            wrapper = opt(wrapper)
        return click.command(name, **kwargs)(wrapper)

    return deco
