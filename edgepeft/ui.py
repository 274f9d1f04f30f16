"""Shared CLI plumbing: common options, error reporting, console output, progress.

``@edgepeft_command`` gives every subcommand ``--debug`` and ``--quiet`` and turns an
:class:`EdgepeftError` into one line on stderr with exit status 2. Unexpected errors
print one line too, unless ``--debug`` asks for the traceback.

Progress has one rule, here (:func:`stage`), for every command: on a TTY a live rich display
on stderr (stage name, elapsed time; a bar, count and ETA where the total is known); not on a
TTY, plain one-line messages ``[command] stage ...`` and ``[command] stage: done in 12.3 s``; a stage
shorter than two seconds shows nothing;
under ``--quiet``, nothing. Status lines (:func:`info`) follow the same rule, so every line
edgepeft writes to stderr outside a TTY starts with ``[command]`` (errors: ``edgepeft: error:``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import threading
import time

import click

from edgepeft.errors import EXIT_USAGE, EdgepeftError


class _State:
    debug = False
    quiet = False
    command = "edgepeft"  # the subcommand running, for the plain-line prefix


STATE = _State()


def _console(stderr=False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def esc(x) -> str:
    """``x`` as text that prints as exactly one line: control characters (newline, carriage return,
    ANSI escape, bidi overrides, ...) become their Python escapes. The one escaping helper for every
    name, key or path that came from a file or the command line; ``{x!r}`` is equally safe."""
    s = str(x)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def cell(x) -> str:
    """Text for a rich renderable (table cell, title): :func:`esc` plus rich-markup escaping."""
    from rich.markup import escape

    return escape(esc(x))


def result_console():
    """The stdout console a command prints its result tables on: the terminal's width, or 200
    columns in a pipe (cells fold, identifiers are never cut)."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def print_result(renderable) -> None:
    """A result table on stdout, never with a value cut: in a terminal narrower than the table the
    console takes the table's width and the terminal wraps its lines (rich would shorten cells to "14…")."""
    from rich.console import Console
    from rich.measure import Measurement

    console = result_console()
    need = Measurement.get(console, console.options.update_width(1000), renderable).maximum
    if sys.stdout.isatty() and need > console.width:
        console = Console(highlight=False, width=need)
    console.print(renderable)


def info(msg: str) -> None:
    """Status line (suppressed by --quiet), to stderr so stdout stays data. Never parsed as markup; every
    line passes :func:`esc` (a newline in ``msg`` starts a new status line, one inside a name must be escaped
    where the name is interpolated: use ``{name!r}`` or ``esc(name)``)."""
    if STATE.quiet:
        return
    msg = "\n".join(esc(line) for line in str(msg).splitlines())
    if _LIVE.progress is not None:  # above the live display, which keeps redrawing below
        _LIVE.progress.console.print(msg, markup=False, soft_wrap=True)  # paths/fingerprints never folded
    elif _live_ok():
        _console(stderr=True).print(msg, markup=False, soft_wrap=True)
    else:
        for line in str(msg).splitlines() or [""]:
            sys.stderr.write(f"[{STATE.command}] {line}\n")
        sys.stderr.flush()


def echo(msg: str) -> None:
    """A result line on stdout, one line whatever names it contains."""
    click.echo(esc(msg))


# ----------------------------------------------------------------------------- progress
def show_after_s() -> float:
    """A stage appears once it has run this long (live row, or its plain start and "done" lines)."""
    try:
        return float(os.environ.get("EDGEPEFT_SHOW_AFTER_S", "2"))
    except ValueError:
        return 2.0


def _live_ok() -> bool:
    return not STATE.quiet and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


class _Live:
    progress = None  # the one rich Progress while any stage is open on a TTY
    depth = 0


_LIVE = _Live()


class Stage:
    """Handle of an open :func:`stage`: ``advance()`` by units, ``update()`` the total or a note."""

    def __init__(self, name: str, total: int | None, unit: str):
        self.name, self.total, self.unit = name, total, unit
        self.completed = 0
        self.note = ""
        self.t0 = time.perf_counter()
        self.task = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def advance(self, n: int = 1) -> None:
        self.completed += n
        self._push()

    def update(self, *, completed: int | None = None, total: int | None = None, note: str | None = None) -> None:
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        if note is not None:
            self.note = note
        self._push()

    def _push(self) -> None:
        if self.task is not None and _LIVE.progress is not None:
            _LIVE.progress.update(self.task, completed=self.completed, total=self.total, note=self.note)


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn
    from rich.table import Column
    from rich.text import Text

    class Bar(BarColumn):  # a bar only where the total is known; a spinner says "running" otherwise
        def render(self, task):
            return super().render(task) if task.fields.get("known") else Text("")

    class Count(ProgressColumn):
        def render(self, task):
            if not task.fields.get("known"):
                return Text("")
            unit = task.fields.get("unit") or ""
            return Text(f"{int(task.completed)}/{int(task.total)}{' ' + unit if unit else ''}")

    class Elapsed(ProgressColumn):  # the stage's own time: a bar can fill before a nested step ends
        def render(self, task):
            secs = task.fields.get("final")
            secs = int(task.elapsed or 0) if secs is None else int(secs)
            return Text(f"{secs // 60}:{secs % 60:02d}", style="progress.elapsed")

    class Eta(ProgressColumn):
        max_refresh = 0.5

        def render(self, task):
            if not task.fields.get("known") or task.finished or not task.completed:
                return Text("")
            left = task.time_remaining
            if left is None:
                return Text("")
            m, sec = divmod(int(left), 60)
            return Text(f"ETA {m}:{sec:02d}", style="progress.remaining")

    def fixed():  # counts and times never fold: a long note (a final loss) shrinks the name column instead
        return Column(no_wrap=True)

    return Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"), Bar(bar_width=30),
                    Count(table_column=fixed()), Elapsed(table_column=fixed()), Eta(table_column=fixed()),
                    TextColumn("{task.fields[note]}", markup=False),
                    console=Console(file=sys.stderr, highlight=False), transient=False, refresh_per_second=8)


@contextlib.contextmanager
def stage(name: str, total: int | None = None, unit: str = ""):
    """One named step of a command; yields a :class:`Stage`. Stages nest (one live display).

    A stage shows itself once it has run for :func:`show_after_s` (2 s): quick steps stay silent, so
    bad input caught in the first second still gives exactly one ``edgepeft: error:`` line.
    """
    st = Stage(name, total, unit)
    if STATE.quiet:
        yield st
        return
    live = _live_ok()
    if live:
        if _LIVE.progress is None:
            _LIVE.progress = _progress()
            _LIVE.progress.start()
        _LIVE.depth += 1
        prog = _LIVE.progress
        indent = "  " * (_LIVE.depth - 1)
        st.task = prog.add_task(indent + name, total=total, known=total is not None, unit=unit, note="",
                                visible=False)
        reveal = functools.partial(prog.update, st.task, visible=True)
    else:
        reveal = functools.partial(info, f"{name} ...")
    shown = []

    def show():
        shown.append(True)
        reveal()

    after = show_after_s()
    timer = threading.Timer(after, show)
    timer.daemon = True
    if after <= 0:
        show()
    else:
        timer.start()
    ok = False
    try:
        yield st
        ok = True
    finally:
        timer.cancel()
        if not live:
            if ok and shown:
                info(f"{name}: done in {st.elapsed:.1f} s")
        else:
            if shown:
                done = max(st.completed, st.total or 0, 1)
                desc = indent + name if ok else f"{indent}[red]✗ {name}[/red]"
                prog.update(st.task, description=desc, total=done, completed=done, note=st.note, visible=True,
                            final=st.elapsed)
            else:
                prog.remove_task(st.task)
            _LIVE.depth -= 1
            if _LIVE.depth == 0:
                prog.stop()
                _LIVE.progress = None


def track(items, name: str, unit: str = ""):
    """Iterate ``items`` inside a :func:`stage` whose total is ``len(items)``."""
    items = list(items)
    with stage(name, total=len(items), unit=unit) as st:
        for item in items:
            yield item
            st.advance()


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


@contextlib.contextmanager
def native_quiet():
    """Send what a native library prints from C/C++ (fd 1 and 2) to a scratch file while it runs.

    For libraries whose banner gives the user nothing to do: the QNN HTP libraries print
    ``# LIBNATIVE: No alternate configuration present in libnative_tls.conf ...`` to fd 1 on every
    session. A failure still reaches the user, as the Python exception the call raises. Under
    ``--debug`` the output goes to stderr instead.
    """
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        target = saved[1] if STATE.debug else sink.fileno()
        os.dup2(target, 1)
        os.dup2(target, 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def show_progress() -> bool:
    return _live_ok()


def fail(line: str, code: int = EXIT_USAGE):
    click.echo(f"edgepeft: error: {esc(line)}", err=True)
    sys.exit(code)


def edgepeft_command(name: str, json_option: bool = False, **kwargs):
    """Declare a subcommand with the shared --debug/--quiet (and optional --json) options."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, debug: bool, quiet: bool, **kw):
            STATE.debug, STATE.quiet, STATE.command = debug, quiet, name
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
