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
    from rich.console import Console
    from rich.table import Table

    from edgepeft.ui import cell

    table = Table(title=cell(f"edgepeft inspect {target}"), show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for k, v in summary_rows(info):
        table.add_row(cell(k), cell(v))
    Console(highlight=False).print(table)
