"""edgepeft inspect BASE_OR_ARTIFACT"""

from __future__ import annotations

import click

from edgepeft.ui import edgepeft_command, print_json


@edgepeft_command("inspect", json_option=True)
@click.argument("target")
def command(target: str, as_json: bool):
    """Describe a base model (folder, .gguf, hub id, alias) or an exported artifact.

    Prints architecture, parameter count, dtype, layers, vocab, fingerprint and file sizes.
    """
    from edgepeft.inspect import describe, summary_rows

    info = describe(target)
    if as_json:
        print_json(info)
        return
    # Plain lines, never a fitted table: a terminal or a pipe at 80 columns must not cut the
    # fingerprint or a path (the identifiers a user copies and compares). Each line one line (esc).
    from edgepeft.ui import echo

    rows = summary_rows(info)
    width = max(len(k) for k, _ in rows)
    echo(f"edgepeft inspect {target}")
    for k, v in rows:
        echo(f"  {k:<{width}}  {v}".rstrip())
